// CPU: the pair distances and the loss forms on the mined pairs (section 3), and their backward.
// Two layers: the pair ops (pair_distances, pair_sums and their backward), which the sharded
// global batch of crl_ops.distributed calls on a rank's own anchors, and the fused loss built
// from them (one op and one autograd node per step).
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

// The column of vectors [N, Ax, D] that holds attribute j's vectors: j, or 0 where Ax = 1 (one
// vector shared by the attributes).
inline int64_t vector_column(int64_t per_sample, int64_t j) {
  return per_sample == 1 ? 0 : j;
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

// (bins - 1) / R by a true division, 0 where R = 0 (every pair on node 0).
template <typename Acc>
Acc histogram_scale(Acc longest, int64_t bins) {
  return longest > Acc(0) ? static_cast<Acc>(bins - 1) / longest : Acc(0);
}

// R_j: the largest pair distance of attribute j.
template <typename Acc>
Acc attribute_longest(const Acc* d, const int64_t* p, int64_t rows, int64_t attributes, int64_t width, int64_t j) {
  Acc longest = Acc(0);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t m = 0; m < width; ++m) {
      const int64_t at = (i * attributes + j) * width + m;
      if (p[at] >= 0) longest = std::max(longest, d[at]);
    }
  }
  return longest;
}

// The unnormalised histograms h[2 * bins] (positives | negatives) of attribute j's pairs, rows in order.
template <typename Acc>
void attribute_histograms(const Acc* d, const int64_t* p, int64_t rows, int64_t attributes, int64_t width, int64_t j,
                          int64_t bins, Acc scale, Acc* h) {
  const int64_t k = width / 2;
  std::fill(h, h + 2 * bins, Acc(0));
  for (int64_t i = 0; i < rows; ++i) {
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
}

// grad_d of every pair of attribute j from the gradient of its unnormalised histograms
// g[2 * bins], times factor[kind] (positives, negatives).
template <typename Acc>
void attribute_histograms_backward(const Acc* d, const int64_t* p, int64_t rows, int64_t attributes, int64_t width,
                                   int64_t j, int64_t bins, Acc scale, const Acc* g, const Acc* factor, Acc* out) {
  const int64_t k = width / 2;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t m = 0; m < width; ++m) {
      const int64_t at = (i * attributes + j) * width + m;
      if (p[at] < 0) continue;
      const bool negative = m >= k;
      out[at] = factor[negative] * histogram_pair_gradient(d[at], scale, bins, g + (negative ? bins : 0));
    }
  }
}

// d[R, A, 2K] -> d loss / d d, given the gradient of pair_sums' output: relative and absolute
// grad[A, 2]; distribution grad[A, 2, bins] on the nodes of the histogram scales scale[A] (each
// pair also times hist_factor[A, 2]).
// Returns the open hinges of each attribute (relative; for d loss / d margins).
template <typename Acc>
std::vector<int64_t> sums_backward(const Acc* d, const int64_t* p, int64_t rows, int64_t attributes, int64_t width,
                                   const Acc* margin, const Acc* scale, const Acc* grad, const Acc* hist_factor,
                                   Form form, Acc apc_margin, int64_t bins, Acc* out) {
  const int64_t k = width / 2;
  std::vector<int64_t> open(form == Form::Relative ? rows * attributes : 0);
  if (form == Form::Relative) {
    at::parallel_for(0, rows * attributes, grain_for(k * k), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t j = r % attributes;
        open[r] = relative_row_backward(d + r * width, p + r * width, k, margin[j], grad[2 * j], out + r * width);
      }
    });
  } else if (form == Form::Absolute) {
    at::parallel_for(0, rows * attributes, grain_for(width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t j = r % attributes;
        // d/dd of g * d^2 is 2 g d; of g * hinge(m - d)^2 is -2 g hinge.
        absolute_row_backward(d + r * width, p + r * width, k, apc_margin, Acc(2) * grad[2 * j],
                              Acc(2) * grad[2 * j + 1], out + r * width);
      }
    });
  } else {
    at::parallel_for(0, attributes, grain_for(rows * width), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        attribute_histograms_backward(d, p, rows, attributes, width, j, bins, scale[j],
                                      grad + j * 2 * bins, hist_factor + 2 * j, out);
      }
    });
  }
  return open;
}

// d / d m_j of the relative form: the gradient of attribute j's hinges (grad[2 j]) times its open hinges.
template <typename Acc>
Tensor margins_gradient(const std::vector<int64_t>& open, const Acc* grad, int64_t rows, int64_t attributes,
                        const at::TensorOptions& options) {
  std::vector<Acc> gm(attributes);
  for (int64_t j = 0; j < attributes; ++j) {
    int64_t hinges = 0;
    for (int64_t i = 0; i < rows; ++i) hinges += open[i * attributes + j];
    gm[j] = grad[2 * j] * static_cast<Acc>(hinges);
  }
  return at::tensor(gm, options);
}

}  // namespace

std::tuple<Tensor, bool> pair_distances(const Tensor& vectors, const Tensor& partners, int64_t first) {
  const int64_t rows = partners.size(0), attributes = partners.size(1), width = partners.size(2);
  const int64_t dim = vectors.size(2);
  const int64_t per_sample = vectors.size(1);
  Tensor distances = at::empty(partners.sizes(), vectors.options().dtype(accumulation_type(vectors.scalar_type())));
  const int64_t* p = partners.data_ptr<int64_t>();
  check_partner_range(p, partners.numel(), vectors.size(0));
  const int64_t sb = vectors.stride(0), sa = vectors.stride(1), sd = vectors.stride(2);
  std::atomic<bool> infinite{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vectors.scalar_type(), "crl_ops::pair_distances", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* x = vectors.data_ptr<scalar_t>();
    acc* out = distances.data_ptr<acc>();
    at::parallel_for(0, rows * attributes, grain_for(width * dim), [&](int64_t begin, int64_t end) {
      bool any = false;
      for (int64_t row = begin; row < end; ++row) {
        const int64_t i = first + row / attributes, a = vector_column(per_sample, row % attributes);
        for (int64_t m = 0; m < width; ++m) {
          const int64_t other = p[row * width + m];
          if (other < 0) {
            out[row * width + m] = acc(0);
            continue;
          }
          const acc squared = squared_distance<acc>(x + i * sb + a * sa, sd, x + other * sb + a * sa, sd, dim);
          any |= std::isinf(squared);
          out[row * width + m] = distance_from_squared(squared);
        }
      }
      if (any) infinite = true;
    });
  });
  return {distances, infinite.load()};
}

Tensor pair_distances_backward(const Tensor& grad, const Tensor& vectors, const Tensor& partners,
                               const Tensor& distances, int64_t first) {
  const int64_t rows = partners.size(0), attributes = partners.size(1), width = partners.size(2);
  const int64_t per_sample = vectors.size(1), dim = vectors.size(2);
  const int64_t* p = partners.data_ptr<int64_t>();
  check_partner_range(p, partners.numel(), vectors.size(0));  // the backward op may be called on its own
  Tensor grad_vectors = at::zeros(vectors.sizes(), vectors.options().dtype(distances.scalar_type()));
  const int64_t sb = vectors.stride(0), sa = vectors.stride(1), sd = vectors.stride(2);
  // A task owns kDims feature dimensions of one vector column (an attribute, or all of them when
  // they share one vector), so no two tasks write the same entry; rows in order within a task:
  // a fixed summation order.
  constexpr int64_t kDims = 16;
  const int64_t chunks = (dim + kDims - 1) / kDims;
  const int64_t attributes_per_task = attributes / per_sample;  // the attributes of one column
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vectors.scalar_type(), "crl_ops::pair_distances_backward",
                                  [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* x = vectors.data_ptr<scalar_t>();
    const acc* g = grad.data_ptr<acc>();
    const acc* dist = distances.data_ptr<acc>();
    acc* gx = grad_vectors.data_ptr<acc>();  // contiguous [N, Ax, D]
    at::parallel_for(0, per_sample * chunks, grain_for(rows * attributes_per_task * width * kDims),
                     [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t a = task / chunks, d0 = (task % chunks) * kDims, d1 = std::min(dim, d0 + kDims);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = first + r;
          for (int64_t j = a * attributes_per_task; j < (a + 1) * attributes_per_task; ++j) {
            const int64_t row = r * attributes + j;
            for (int64_t m = 0; m < width; ++m) {
              const int64_t other = p[row * width + m];
              if (other < 0) continue;
              const acc s = distance_gradient_scale(g[row * width + m], dist[row * width + m]);
              if (s == acc(0)) continue;
              for (int64_t d = d0; d < d1; ++d) {
                const acc diff = static_cast<acc>(x[i * sb + a * sa + d * sd]) -
                                 static_cast<acc>(x[other * sb + a * sa + d * sd]);
                gx[(i * per_sample + a) * dim + d] += s * diff;
                gx[(other * per_sample + a) * dim + d] -= s * diff;
              }
            }
          }
        }
      }
    });
  });
  return grad_vectors.to(vectors.scalar_type());
}

Tensor pair_sums(const Tensor& distances, const Tensor& partners, const Tensor& margins_in, const Tensor& longest_in,
                 Form form, double apc_margin, int64_t bins) {
  const int64_t rows = distances.size(0), attributes = distances.size(1), width = distances.size(2), k = width / 2;
  const auto options = distances.options();
  Tensor sums = form == Form::Distribution ? at::empty({attributes, 2, bins}, options) : at::empty({attributes, 2}, options);
  const int64_t* p = partners.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::pair_sums", [&] {
    const scalar_t* d = distances.data_ptr<scalar_t>();
    scalar_t* s = sums.data_ptr<scalar_t>();
    if (form == Form::Relative) {
      const Tensor margins = margins_in.to(distances.scalar_type()).contiguous();
      const scalar_t* margin = margins.data_ptr<scalar_t>();
      attribute_sums<scalar_t>(rows, attributes, k * k, [&](int64_t r, scalar_t& hinges, scalar_t& unused) {
        int64_t triplets = 0;
        hinges = unused = scalar_t(0);
        relative_row(d + r * width, p + r * width, k, margin[r % attributes], hinges, triplets);
      }, s);
    } else if (form == Form::Absolute) {
      attribute_sums<scalar_t>(rows, attributes, width, [&](int64_t r, scalar_t& pos, scalar_t& neg) {
        int64_t pos_pairs = 0, neg_pairs = 0;
        pos = neg = scalar_t(0);
        absolute_row(d + r * width, p + r * width, k, static_cast<scalar_t>(apc_margin), pos, neg, pos_pairs,
                     neg_pairs);
      }, s);
    } else {
      const Tensor longest = longest_in.to(distances.scalar_type()).contiguous();
      const scalar_t* R = longest.data_ptr<scalar_t>();
      at::parallel_for(0, attributes, grain_for(rows * width), [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          attribute_histograms(d, p, rows, attributes, width, j, bins, histogram_scale(R[j], bins), s + j * 2 * bins);
        }
      });
    }
  });
  return sums;
}

std::tuple<Tensor, Tensor> pair_sums_backward(const Tensor& grad_in, const Tensor& distances, const Tensor& partners,
                                              const Tensor& margins_in, const Tensor& longest_in, Form form,
                                              double apc_margin, int64_t bins, bool margins_grad) {
  const int64_t rows = distances.size(0), attributes = distances.size(1), width = distances.size(2);
  Tensor grad_d = at::zeros_like(distances);
  Tensor grad_margins = at::zeros({margins_grad ? attributes : 0}, margins_in.options());
  const int64_t* p = partners.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::pair_sums_backward", [&] {
    const Tensor grad = grad_in.to(distances.scalar_type()).contiguous();
    const Tensor margins = margins_in.to(distances.scalar_type()).contiguous();
    std::vector<scalar_t> scale(form == Form::Distribution ? attributes : 0);
    if (form == Form::Distribution) {
      const Tensor longest = longest_in.to(distances.scalar_type()).contiguous();
      for (int64_t j = 0; j < attributes; ++j) scale[j] = histogram_scale(longest.data_ptr<scalar_t>()[j], bins);
    }
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const std::vector<scalar_t> unit(2 * attributes, scalar_t(1));
    const auto open = sums_backward<scalar_t>(distances.data_ptr<scalar_t>(), p, rows, attributes, width,
                                              margins.data_ptr<scalar_t>(), scale.data(), g, unit.data(), form,
                                              static_cast<scalar_t>(apc_margin), bins, grad_d.data_ptr<scalar_t>());
    if (margins_grad && form == Form::Relative) {
      grad_margins.copy_(margins_gradient(open, g, rows, attributes, distances.options()));
    }
  });
  return {grad_d, grad_margins};
}

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

namespace {

// R [A] of the pairs of distances[B, A, 2K].
Tensor longest_distances(const Tensor& distances, const Tensor& partners) {
  const int64_t rows = distances.size(0), attributes = distances.size(1), width = distances.size(2);
  Tensor longest = at::empty({attributes}, distances.options());
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::longest", [&] {
    for (int64_t j = 0; j < attributes; ++j) {
      longest.data_ptr<scalar_t>()[j] = attribute_longest(distances.data_ptr<scalar_t>(),
                                                          partners.data_ptr<int64_t>(), rows, attributes, width, j);
    }
  });
  return longest;
}

}  // namespace

LossOutputs loss(const Tensor& features, const Tensor& partners, const Tensor& margins, const Tensor& pair_counts,
                 Form form, double apc_margin, int64_t bins, Reduction reduction, bool validate, bool finite) {
  auto [distances, overflow] = pair_distances(features, partners, 0);
  TORCH_CHECK_VALUE(!(validate && overflow), overflow_message(distances.scalar_type()));
  const int64_t attributes = distances.size(1);
  const auto options = distances.options();
  const Tensor longest = form == Form::Distribution ? longest_distances(distances, partners) : Tensor();
  Tensor sums = pair_sums(distances, partners, margins, longest, form, apc_margin, bins);
  Tensor histograms = at::empty({attributes, 2, 0}, options);
  Tensor loss = at::empty({}, options);
  const int64_t* counts = pair_counts.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::loss", [&] {
    if (form == Form::Distribution) {  // sums: (the attribute's loss, its histogram scale); normalised histograms
      histograms = sums;
      sums = at::empty({attributes, 2}, options);
      scalar_t* h = histograms.data_ptr<scalar_t>();
      scalar_t* s = sums.data_ptr<scalar_t>();
      for (int64_t j = 0; j < attributes; ++j) {
        const int64_t n_pos = counts[4 * j + kPositivesColumn], n_neg = counts[4 * j + kNegativesColumn];
        scalar_t* h_pos = h + j * 2 * bins;
        for (int64_t t = 0; t < bins; ++t) {
          h_pos[t] /= static_cast<scalar_t>(std::max<int64_t>(n_pos, 1));
          h_pos[bins + t] /= static_cast<scalar_t>(std::max<int64_t>(n_neg, 1));
        }
        s[2 * j] = n_pos > 0 && n_neg > 0 ? histogram_overlap(h_pos, h_pos + bins, bins) : scalar_t(0);
        s[2 * j + 1] = histogram_scale(longest.data_ptr<scalar_t>()[j], bins);
      }
    }
    std::vector<scalar_t> weights(2 * attributes);
    term_weights(form, reduction, counts, attributes, weights.data());
    const scalar_t total = weighted_terms(form, sums.data_ptr<scalar_t>(), weights.data(), attributes);
    loss.fill_(finite && !overflow ? total : std::numeric_limits<scalar_t>::quiet_NaN());
  });
  return {loss, distances, sums, histograms};
}

std::tuple<Tensor, Tensor> loss_backward(const Tensor& grad, const Tensor& loss, const Tensor& features,
                                         const Tensor& partners, const Tensor& distances, const Tensor& margins_in,
                                         const Tensor& pair_counts, const Tensor& sums, const Tensor& histograms,
                                         Form form, double apc_margin, int64_t bins, Reduction reduction,
                                         bool margins_grad) {
  const int64_t rows = distances.size(0), attributes = distances.size(1), width = distances.size(2);
  const int64_t* p = partners.data_ptr<int64_t>();
  check_partner_range(p, partners.numel(), features.size(0));  // the backward op may be called on its own
  const int64_t* counts = pair_counts.data_ptr<int64_t>();
  Tensor grad_margins = at::zeros({margins_grad ? attributes : 0}, margins_in.options());
  if (std::isnan(loss.item<double>())) {  // non-finite inputs under validate=False: NaN everywhere
    grad_margins.fill_(std::numeric_limits<double>::quiet_NaN());
    return {at::full(features.sizes(), std::numeric_limits<double>::quiet_NaN(), features.options()), grad_margins};
  }
  Tensor grad_d = at::zeros_like(distances);
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::loss_backward", [&] {
    const scalar_t g = grad.item<scalar_t>();
    std::vector<scalar_t> weights(2 * attributes);
    term_weights(form, reduction, counts, attributes, weights.data());
    // The gradient of the loss w.r.t. pair_sums' output, and (distribution) each pair kind's factor.
    std::vector<scalar_t> grad_sums(form == Form::Distribution ? 2 * attributes * bins : 2 * attributes, scalar_t(0));
    std::vector<scalar_t> hist_factor(2 * attributes, scalar_t(0));
    std::vector<scalar_t> scale(form == Form::Distribution ? attributes : 0);
    if (form == Form::Distribution) {
      const scalar_t* hist = histograms.data_ptr<scalar_t>();
      for (int64_t j = 0; j < attributes; ++j) {
        scale[j] = sums.data_ptr<scalar_t>()[2 * j + 1];
        const int64_t n_pos = counts[4 * j + kPositivesColumn], n_neg = counts[4 * j + kNegativesColumn];
        if (n_pos == 0 || n_neg == 0) continue;
        scalar_t* g_hist = grad_sums.data() + j * 2 * bins;
        histogram_overlap_gradient(hist + j * 2 * bins, hist + j * 2 * bins + bins, bins, g_hist, g_hist + bins);
        // The histograms are divided by the pair counts: each pair's weight enters as 1 / n.
        hist_factor[2 * j] = g * weights[2 * j] / static_cast<scalar_t>(n_pos);
        hist_factor[2 * j + 1] = g * weights[2 * j] / static_cast<scalar_t>(n_neg);
      }
    } else {
      for (int64_t m = 0; m < 2 * attributes; ++m) grad_sums[m] = g * weights[m];
    }
    const Tensor margins = margins_in.to(distances.scalar_type()).contiguous();
    const auto open = sums_backward<scalar_t>(distances.data_ptr<scalar_t>(), p, rows, attributes, width,
                                              margins.data_ptr<scalar_t>(), scale.data(), grad_sums.data(),
                                              hist_factor.data(), form, static_cast<scalar_t>(apc_margin), bins,
                                              grad_d.data_ptr<scalar_t>());
    if (margins_grad && form == Form::Relative) {
      grad_margins.copy_(margins_gradient(open, grad_sums.data(), rows, attributes, distances.options()));
    }
  });
  return {pair_distances_backward(grad_d, features, partners, distances, 0), grad_margins};
}

Tensor partial_vector(const Tensor& sums, const Tensor& pair_counts, const Tensor& overflow, const Tensor& checks_in,
                      const PartialLayout& layout) {
  Tensor partial = at::empty({layout.size()}, sums.options().dtype(at::kDouble));
  const Tensor checks = checks_in.contiguous();
  double* out = partial.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "crl_ops::partial_vector", [&] {
    for (int64_t e = 0; e < layout.size(); ++e) {
      out[e] = partial_entry(e, layout, sums.data_ptr<scalar_t>(), pair_counts.data_ptr<int64_t>(),
                             overflow.data_ptr<bool>(), checks.data_ptr<bool>());
    }
  });
  return partial;
}

std::tuple<Tensor, Tensor, Tensor> shard_loss(const Tensor& total_in, const PartialLayout& layout, Reduction reduction,
                                              at::ScalarType dtype, int64_t world_size, bool validate) {
  const Tensor total_tensor = total_in.contiguous();
  const double* total = total_tensor.data_ptr<double>();
  const int64_t attributes = layout.attributes;
  if (validate) {  // the single process's order of the value errors
    const double* flags = total + layout.flags();
    TORCH_CHECK_VALUE(flags[kLogitsFlag] <= 0, values_message("logits"));
    TORCH_CHECK_VALUE(flags[kFeaturesFlag] <= 0, values_message("features"));
    TORCH_CHECK_VALUE(flags[kOverflowFlag] <= 0, overflow_message(dtype));
  }
  Tensor pair_counts = at::empty({attributes, 4}, total_in.options().dtype(at::kLong));
  int64_t* counts = pair_counts.data_ptr<int64_t>();
  for (int64_t j = 0; j < attributes; ++j) partial_counts(total, layout, j, counts);
  const bool failed = partial_failed(total, layout);
  Tensor loss, grad_scale;
  AT_DISPATCH_FLOATING_TYPES(dtype, "crl_ops::shard_loss", [&] {
    std::vector<scalar_t> weights(2 * attributes), sums(2 * attributes);
    term_weights(layout.form, reduction, counts, attributes, weights.data());
    for (int64_t j = 0; j < attributes; ++j) attribute_terms(total, layout, counts, j, sums.data());
    const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
    const auto options = total_in.options().dtype(dtype);
    loss = at::scalar_tensor(failed ? nan : weighted_terms(layout.form, sums.data(), weights.data(), attributes),
                             options);
    grad_scale = at::scalar_tensor(failed ? nan : static_cast<scalar_t>(world_size), options);
  });
  return {loss, pair_counts, grad_scale};
}

Tensor shard_loss_backward(const Tensor& grad, const Tensor& total_in, const PartialLayout& layout,
                           Reduction reduction, at::ScalarType dtype) {
  const Tensor total_tensor = total_in.contiguous();
  const double* total = total_tensor.data_ptr<double>();
  const int64_t attributes = layout.attributes;
  Tensor result = at::zeros({layout.size()}, total_in.options());
  double* out = result.data_ptr<double>();
  if (partial_failed(total, layout)) {  // section 6: every entry of the gradient NaN
    return result.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  std::vector<int64_t> counts(4 * attributes);
  for (int64_t j = 0; j < attributes; ++j) partial_counts(total, layout, j, counts.data());
  AT_DISPATCH_FLOATING_TYPES(dtype, "crl_ops::shard_loss_backward", [&] {
    std::vector<scalar_t> weights(2 * attributes);
    term_weights(layout.form, reduction, counts.data(), attributes, weights.data());
    const scalar_t g = grad.item().to<scalar_t>();
    for (int64_t j = 0; j < attributes; ++j) {
      attribute_terms_gradient(g, total, layout, counts.data(), weights.data(), j, out);
    }
  });
  return result;
}

}  // namespace cpu
}  // namespace crl
