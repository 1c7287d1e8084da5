// CPU: the loss forms on the mined pairs (section 3) and their backward. The pair distances are
// measured here, inside the loss (one op and one autograd node per step).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_kernels.h"

namespace crl {
namespace cpu {

namespace {

void check_partner_range(const int64_t* partners, int64_t count, int64_t batch) {
  for (int64_t m = 0; m < count; ++m) {
    TORCH_CHECK_VALUE(partners[m] >= -1 && partners[m] < batch, "crl_ops: partner index ", partners[m],
                      " is outside -1..", batch - 1);
  }
}

// d[B, A, 2K] in the accumulation type, 0 where the partner slot is empty; `overflow` tells
// whether a pair's squared distance was infinite. partners: contiguous.
Tensor pair_distances(const Tensor& features, const Tensor& partners, bool& overflow) {
  const int64_t batch = features.size(0), attributes = features.size(1), dim = features.size(2);
  const int64_t width = partners.size(2);
  Tensor distances = at::empty(partners.sizes(), features.options().dtype(accumulation_type(features.scalar_type())));
  const int64_t* p = partners.data_ptr<int64_t>();
  const int64_t sb = features.stride(0), sa = features.stride(1), sd = features.stride(2);
  std::atomic<bool> infinite{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "crl_ops::distances", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* x = features.data_ptr<scalar_t>();
    acc* out = distances.data_ptr<acc>();
    at::parallel_for(0, batch * attributes, grain_for(width * dim), [&](int64_t begin, int64_t end) {
      bool any = false;
      for (int64_t row = begin; row < end; ++row) {
        const int64_t i = row / attributes, j = row % attributes;
        for (int64_t m = 0; m < width; ++m) {
          const int64_t other = p[row * width + m];
          if (other < 0) {
            out[row * width + m] = acc(0);
            continue;
          }
          const acc squared = squared_distance<acc>(x + i * sb + j * sa, sd, x + other * sb + j * sa, sd, dim);
          any |= std::isinf(squared);
          out[row * width + m] = distance_from_squared(squared);
        }
      }
      if (any) infinite = true;
    });
  });
  overflow = infinite.load();
  return distances;
}

// d loss / d features from grad[B, A, 2K] = d loss / d distances: each pair adds s * (x_i - x_p)
// to its sample's row and subtracts it from its partner's. All of partners, distances, grad: contiguous.
Tensor features_gradient(const Tensor& grad, const Tensor& features, const Tensor& partners, const Tensor& distances) {
  const int64_t batch = features.size(0), attributes = features.size(1), dim = features.size(2);
  const int64_t width = partners.size(2);
  Tensor grad_features = at::zeros(features.sizes(), features.options().dtype(distances.scalar_type()));
  const int64_t* p = partners.data_ptr<int64_t>();
  const int64_t sb = features.stride(0), sa = features.stride(1), sd = features.stride(2);
  constexpr int64_t kDims = 16;  // a task owns one attribute and kDims feature dimensions
  const int64_t chunks = (dim + kDims - 1) / kDims;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "crl_ops::features_gradient",
                                  [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* x = features.data_ptr<scalar_t>();
    const acc* g = grad.data_ptr<acc>();
    const acc* dist = distances.data_ptr<acc>();
    acc* gx = grad_features.data_ptr<acc>();  // contiguous [B, A, D]
    at::parallel_for(0, attributes * chunks, grain_for(batch * width * kDims), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t j = task / chunks, d0 = (task % chunks) * kDims, d1 = std::min(dim, d0 + kDims);
        for (int64_t i = 0; i < batch; ++i) {  // rows in order: a fixed summation order
          const int64_t row = i * attributes + j;
          for (int64_t m = 0; m < width; ++m) {
            const int64_t other = p[row * width + m];
            if (other < 0) continue;
            const acc s = distance_gradient_scale(g[row * width + m], dist[row * width + m]);
            if (s == acc(0)) continue;
            for (int64_t d = d0; d < d1; ++d) {
              const acc diff = static_cast<acc>(x[i * sb + j * sa + d * sd]) -
                               static_cast<acc>(x[other * sb + j * sa + d * sd]);
              gx[row * dim + d] += s * diff;
              gx[(other * attributes + j) * dim + d] -= s * diff;
            }
          }
        }
      }
    });
  });
  return grad_features.to(features.scalar_type());
}

// Calls row_fn(row, first, second) for every row (sample i, attribute j) in parallel, then adds
// the rows' two values into per-attribute sums in row order: out[2 j], out[2 j + 1].
template <typename Acc, typename RowFn>
void attribute_sums(int64_t batch, int64_t attributes, int64_t row_work, RowFn row_fn, Acc* out) {
  std::vector<Acc> partial(2 * batch * attributes);
  at::parallel_for(0, batch * attributes, grain_for(row_work), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row_fn(r, partial[2 * r], partial[2 * r + 1]);
  });
  for (int64_t j = 0; j < attributes; ++j) {
    Acc first = Acc(0), second = Acc(0);
    for (int64_t i = 0; i < batch; ++i) {
      first += partial[2 * (i * attributes + j)];
      second += partial[2 * (i * attributes + j) + 1];
    }
    out[2 * j] = first;
    out[2 * j + 1] = second;
  }
}

// The distribution form of attribute j: fills its normalised histograms h[2 * bins] and returns
// (its loss, the scale (bins - 1) / R).
template <typename Acc>
std::pair<Acc, Acc> attribute_histograms(const Acc* d, const int64_t* p, int64_t batch, int64_t attributes,
                                         int64_t width, int64_t j, int64_t bins, const int64_t* counts, Acc* h) {
  const int64_t k = width / 2;
  Acc longest = Acc(0);
  for (int64_t i = 0; i < batch; ++i) {
    for (int64_t m = 0; m < width; ++m) {
      const int64_t at = (i * attributes + j) * width + m;
      if (p[at] >= 0) longest = std::max(longest, d[at]);
    }
  }
  const Acc scale = longest > Acc(0) ? static_cast<Acc>(bins - 1) / longest : Acc(0);
  std::fill(h, h + 2 * bins, Acc(0));  // [positives | negatives]
  for (int64_t i = 0; i < batch; ++i) {
    for (int64_t m = 0; m < width; ++m) {
      const int64_t at = (i * attributes + j) * width + m;
      if (p[at] < 0) continue;
      int64_t node;
      Acc w;
      histogram_node(d[at], scale, bins, node, w);
      Acc* kind = h + (m >= k ? bins : 0);
      kind[node] += Acc(1) - w;
      kind[node + 1] += w;
    }
  }
  const int64_t n_pos = counts[kPositivesColumn], n_neg = counts[kNegativesColumn];
  for (int64_t t = 0; t < bins; ++t) {
    h[t] /= static_cast<Acc>(std::max<int64_t>(n_pos, 1));
    h[bins + t] /= static_cast<Acc>(std::max<int64_t>(n_neg, 1));
  }
  const Acc overlap = n_pos > 0 && n_neg > 0 ? histogram_overlap(h, h + bins, bins) : Acc(0);
  return {overlap, scale};
}

}  // namespace

Tensor pair_counts(const Tensor& anchors, const Tensor& partners) {
  const int64_t batch = anchors.size(0), attributes = anchors.size(1), width = partners.size(2), k = width / 2;
  Tensor counts = at::empty({attributes, 4}, partners.options());
  const bool* anchor = anchors.data_ptr<bool>();
  const int64_t* p = partners.data_ptr<int64_t>();
  int64_t* out = counts.data_ptr<int64_t>();
  at::parallel_for(0, attributes, grain_for(batch * width), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      int64_t n_anchors = 0, n_pos = 0, n_neg = 0, n_triplets = 0;
      for (int64_t i = 0; i < batch; ++i) {
        const int64_t row = i * attributes + j;
        int64_t pos = 0, neg = 0;
        for (int64_t m = 0; m < k; ++m) {
          pos += p[row * width + m] >= 0;
          neg += p[row * width + k + m] >= 0;
        }
        n_anchors += anchor[row];
        n_pos += pos;
        n_neg += neg;
        n_triplets += pos * neg;
      }
      out[4 * j + kAnchorsColumn] = n_anchors;
      out[4 * j + kPositivesColumn] = n_pos;
      out[4 * j + kNegativesColumn] = n_neg;
      out[4 * j + kTripletsColumn] = n_triplets;
    }
  });
  return counts;
}

LossOutputs loss(const Tensor& features, const Tensor& partners, const Tensor& margins_in, const Tensor& pair_counts,
                 Form form, double apc_margin, int64_t bins, Reduction reduction, bool validate, bool finite) {
  bool overflow = false;
  const Tensor distances = pair_distances(features, partners, overflow);
  TORCH_CHECK_VALUE(!(validate && overflow), overflow_message(distances.scalar_type()));
  const int64_t batch = distances.size(0), attributes = distances.size(1), width = distances.size(2), k = width / 2;
  const auto options = distances.options();
  Tensor sums = at::empty({attributes, 2}, options);
  Tensor histograms = at::empty({attributes, 2, form == Form::Distribution ? bins : 0}, options);
  Tensor loss = at::empty({}, options);
  const int64_t* p = partners.data_ptr<int64_t>();
  const int64_t* counts = pair_counts.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::loss", [&] {
    const scalar_t* d = distances.data_ptr<scalar_t>();
    scalar_t* s = sums.data_ptr<scalar_t>();
    if (form == Form::Relative) {
      const Tensor margins = margins_in.to(distances.scalar_type()).contiguous();
      const scalar_t* margin = margins.data_ptr<scalar_t>();
      attribute_sums<scalar_t>(batch, attributes, k * k, [&](int64_t r, scalar_t& hinges, scalar_t& unused) {
        int64_t triplets = 0;
        hinges = scalar_t(0);
        unused = scalar_t(0);
        relative_row(d + r * width, p + r * width, k, margin[r % attributes], hinges, triplets);
      }, s);
    } else if (form == Form::Absolute) {
      attribute_sums<scalar_t>(batch, attributes, width, [&](int64_t r, scalar_t& pos, scalar_t& neg) {
        int64_t pos_pairs = 0, neg_pairs = 0;
        pos = neg = scalar_t(0);
        absolute_row(d + r * width, p + r * width, k, static_cast<scalar_t>(apc_margin), pos, neg, pos_pairs,
                     neg_pairs);
      }, s);
    } else {
      scalar_t* h = histograms.data_ptr<scalar_t>();
      at::parallel_for(0, attributes, grain_for(batch * width), [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          std::tie(s[2 * j], s[2 * j + 1]) =
              attribute_histograms(d, p, batch, attributes, width, j, bins, counts + 4 * j, h + j * 2 * bins);
        }
      });
    }
    std::vector<scalar_t> weights(2 * attributes);
    term_weights(form, reduction, counts, attributes, weights.data());
    scalar_t total = scalar_t(0);
    for (int64_t j = 0; j < attributes; ++j) {
      total += weights[2 * j] * s[2 * j];
      if (form == Form::Absolute) total += weights[2 * j + 1] * s[2 * j + 1];
    }
    loss.fill_(finite && !overflow ? total : std::numeric_limits<scalar_t>::quiet_NaN());
  });
  return {loss, distances, sums, histograms};
}

std::tuple<Tensor, Tensor> loss_backward(const Tensor& grad, const Tensor& loss, const Tensor& features,
                                         const Tensor& partners, const Tensor& distances, const Tensor& margins_in,
                                         const Tensor& pair_counts, const Tensor& sums, const Tensor& histograms,
                                         Form form, double apc_margin, int64_t bins, Reduction reduction,
                                         bool margins_grad) {
  const int64_t batch = distances.size(0), attributes = distances.size(1), width = distances.size(2), k = width / 2;
  const int64_t* p = partners.data_ptr<int64_t>();
  check_partner_range(p, partners.numel(), batch);  // the backward op may be called on its own
  const int64_t* counts = pair_counts.data_ptr<int64_t>();
  Tensor grad_margins = at::zeros({margins_grad ? attributes : 0}, margins_in.options());
  if (std::isnan(loss.item<double>())) {  // non-finite inputs under validate=False: NaN everywhere
    grad_margins.fill_(std::numeric_limits<double>::quiet_NaN());
    return {at::full(features.sizes(), std::numeric_limits<double>::quiet_NaN(), features.options()), grad_margins};
  }
  Tensor grad_d = at::zeros_like(distances);
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::loss_backward", [&] {
    const scalar_t g = grad.item<scalar_t>();
    const scalar_t* d = distances.data_ptr<scalar_t>();
    scalar_t* out = grad_d.data_ptr<scalar_t>();
    std::vector<scalar_t> weights(2 * attributes);
    term_weights(form, reduction, counts, attributes, weights.data());
    if (form == Form::Relative) {
      const Tensor margins = margins_in.to(distances.scalar_type()).contiguous();
      const scalar_t* margin = margins.data_ptr<scalar_t>();
      std::vector<int64_t> open(batch * attributes);
      at::parallel_for(0, batch * attributes, grain_for(k * k), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t j = r % attributes;
          open[r] = relative_row_backward(d + r * width, p + r * width, k, margin[j], g * weights[2 * j],
                                          out + r * width);
        }
      });
      if (margins_grad) {  // d loss / d m_j: the weight of a hinge times the open hinges of attribute j
        Tensor grad_m = at::empty({attributes}, distances.options());
        scalar_t* gm = grad_m.data_ptr<scalar_t>();
        for (int64_t j = 0; j < attributes; ++j) {
          int64_t hinges = 0;
          for (int64_t i = 0; i < batch; ++i) hinges += open[i * attributes + j];
          gm[j] = g * weights[2 * j] * static_cast<scalar_t>(hinges);
        }
        grad_margins.copy_(grad_m);
      }
    } else if (form == Form::Absolute) {
      at::parallel_for(0, batch * attributes, grain_for(width), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t j = r % attributes;
          // d/dd of w * d^2 is 2 w d; of w * hinge(m - d)^2 is -2 w hinge.
          absolute_row_backward(d + r * width, p + r * width, k, static_cast<scalar_t>(apc_margin),
                                scalar_t(2) * g * weights[2 * j], scalar_t(2) * g * weights[2 * j + 1],
                                out + r * width);
        }
      });
    } else {
      const scalar_t* hist = histograms.data_ptr<scalar_t>();
      const scalar_t* s = sums.data_ptr<scalar_t>();
      at::parallel_for(0, attributes, grain_for(batch * width), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> g_pos(bins), g_neg(bins);
        for (int64_t j = begin; j < end; ++j) {
          const int64_t n_pos = counts[4 * j + kPositivesColumn], n_neg = counts[4 * j + kNegativesColumn];
          if (n_pos == 0 || n_neg == 0) continue;
          histogram_overlap_gradient(hist + j * 2 * bins, hist + j * 2 * bins + bins, bins, g_pos.data(),
                                     g_neg.data());
          // The histograms are divided by the pair counts: each pair's weight enters as 1 / n.
          const scalar_t pos_factor = g * weights[2 * j] / static_cast<scalar_t>(n_pos);
          const scalar_t neg_factor = g * weights[2 * j] / static_cast<scalar_t>(n_neg);
          const scalar_t scale = s[2 * j + 1];
          for (int64_t i = 0; i < batch; ++i) {
            for (int64_t m = 0; m < width; ++m) {
              const int64_t at = (i * attributes + j) * width + m;
              if (p[at] < 0) continue;
              const bool negative = m >= k;
              out[at] = (negative ? neg_factor : pos_factor) *
                        histogram_pair_gradient(d[at], scale, bins, negative ? g_neg.data() : g_pos.data());
            }
          }
        }
      });
    }
  });
  return {features_gradient(grad_d, features, partners, distances), grad_margins};
}

}  // namespace cpu
}  // namespace crl
