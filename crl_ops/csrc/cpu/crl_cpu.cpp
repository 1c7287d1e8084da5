// CPU kernels of the crl_ops ops (schemas in csrc/ops.cpp, semantics in docs/semantics.md).
//
// Parallel with at::parallel_for; every floating-point sum has a fixed order that does not
// depend on the thread count, so results (gradients included) are bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "common/crl_math.h"
#include "common/op_checks.h"

namespace crl {
namespace {

using at::Tensor;

// Grain size of a parallel loop whose items cost about `work` elementary steps each: small
// problems stay on one thread, where waking the pool would cost more than the work.
int64_t grain_for(int64_t work) {
  constexpr int64_t kTaskWork = 1 << 15;
  return std::max<int64_t>(1, kTaskWork / std::max<int64_t>(work, 1));
}

// Outputs of the mining ops: anchors[B, A] false, partners[B, A, 2K] all empty (-1).
std::tuple<at::Tensor, at::Tensor> new_mined(const at::Tensor& labels, int64_t k) {
  const auto options = labels.options();
  return {at::zeros({labels.size(0), labels.size(1)}, options.dtype(at::kBool)),
          at::full({labels.size(0), labels.size(1), 2 * k}, -1, options.dtype(at::kLong))};
}

// ---- 1. profiling -----------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> profile_cpu(const Tensor& labels_in, int64_t max_classes) {
  check_profile_args(labels_in, max_classes);
  const Tensor labels = labels_in.contiguous();
  const int64_t batch = labels.size(0), attributes = labels.size(1);
  Tensor counts = at::zeros({attributes, max_classes}, labels.options());
  Tensor minority = at::zeros({attributes, max_classes}, labels.options().dtype(at::kBool));
  Tensor active = at::zeros_like(minority);
  const int64_t* lab = labels.data_ptr<int64_t>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  bool* mino = minority.data_ptr<bool>();
  bool* act = active.data_ptr<bool>();

  at::parallel_for(0, attributes, grain_for(batch + max_classes), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(max_classes);
    for (int64_t j = begin; j < end; ++j) {
      int64_t* h = cnt + j * max_classes;
      int64_t valid = 0;
      for (int64_t i = 0; i < batch; ++i) {
        const int64_t label = lab[i * attributes + j];
        TORCH_CHECK(label >= -1 && label < max_classes, "crl_ops: labels[", i, ", ", j, "] = ", label,
                    " is outside -1..", max_classes - 1);
        if (label >= 0) {
          ++h[label];
          ++valid;
        }
      }
      std::iota(order.begin(), order.end(), int64_t(0));
      std::stable_sort(order.begin(), order.end(), [h](int64_t a, int64_t b) { return h[a] < h[b]; });
      int64_t prefix = 0;
      for (int64_t c : order) {  // the longest prefix of (count, class) order below half of n
        prefix += h[c];
        if (!(2 * prefix < valid)) break;
        mino[j * max_classes + c] = true;
        act[j * max_classes + c] = h[c] >= 2;
      }
    }
  });
  return {counts, minority, active};
}

// ---- 2. mining ---------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> mine_class_cpu(const Tensor& scores_in, const Tensor& labels_in,
                                          const Tensor& active_in, int64_t k) {
  check_mine_class_args(scores_in, labels_in, active_in, k);
  const Tensor scores = scores_in.contiguous(), labels = labels_in.contiguous(), active = active_in.contiguous();
  const int64_t batch = labels.size(0), attributes = labels.size(1), max_classes = active.size(1);
  auto [anchors, partners] = new_mined(labels, k);
  // The K hardest positives and negatives of each (attribute, class), shared by its anchors.
  std::vector<int32_t> hard_pos(attributes * max_classes * k, -1), hard_neg(attributes * max_classes * k, -1);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const bool* act = active.data_ptr<bool>();

  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "crl_ops::mine_class", [&] {
    const scalar_t* p = scores.data_ptr<scalar_t>();
    at::parallel_for(0, attributes * max_classes, grain_for(batch), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> pos_keys(k), neg_keys(k);
      for (int64_t jc = begin; jc < end; ++jc) {
        if (!act[jc]) continue;
        const int64_t j = jc / max_classes, c = jc % max_classes;
        int32_t* pos = hard_pos.data() + jc * k;
        int32_t* neg = hard_neg.data() + jc * k;
        int64_t n_pos = 0, n_neg = 0;
        for (int64_t i = 0; i < batch; ++i) {
          const int64_t label = lab[i * attributes + j];
          if (label < 0) continue;
          const scalar_t key = p[(i * attributes + j) * max_classes + c];
          if (label == c) {
            offer_dynamic<false>(pos_keys.data(), pos, n_pos, k, key, static_cast<int32_t>(i));
          } else {
            offer_dynamic<true>(neg_keys.data(), neg, n_neg, k, key, static_cast<int32_t>(i));
          }
        }
      }
    });
  });

  bool* anchor = anchors.data_ptr<bool>();
  int64_t* out = partners.data_ptr<int64_t>();
  at::parallel_for(0, batch * attributes, grain_for(2 * k), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row / attributes, j = row % attributes;
      int64_t label;
      if (!is_anchor(lab, act, attributes, max_classes, i, j, label)) continue;
      anchor[row] = true;
      const int64_t list = (j * max_classes + label) * k;
      write_class_row(hard_pos.data() + list, hard_neg.data() + list, k, i, out + row * 2 * k);
    }
  });
  return {anchors, partners};
}

constexpr int64_t kBlock = 256;  // candidates per scan block
constexpr int kGroup = 4;         // anchors scanned together: a candidate column is read once per group

// Row stride of a [D, kBlock] tile: one cache line more than kBlock, so that the D rows do not
// all fall into the same few cache sets (a power-of-two stride would).
template <typename T>
constexpr int64_t tile_stride() {
  return kBlock + 64 / static_cast<int64_t>(sizeof(T));
}

// squared[g * kBlock + t] = sum_d (anchors[g * dim + d] - tile[d * stride + t])^2 for g < kGroup,
// t < n, in order of d: the hot loop of instance mining, over a block of candidates laid out
// [D, kBlock] with row stride tile_stride<T>(). A 64-byte vector of candidates per anchor stays
// in registers while d runs. Each lane does the scalar steps of accumulate_squared in the same
// order, so the clones built for wider vector units (picked at load time where the CPU has
// them) give bitwise the same result.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CRL_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CRL_VECTOR_CLONES
#endif

template <typename T>
__attribute__((always_inline)) inline void squared_block_body(const T* tile, const T* anchors, int64_t dim, int64_t n,
                                                              T* squared) {
  typedef T Vector __attribute__((vector_size(64)));
  constexpr int64_t kLanes = 64 / sizeof(T), stride = tile_stride<T>();
  int64_t t0 = 0;
  for (; t0 + kLanes <= n; t0 += kLanes) {
    Vector acc[kGroup] = {};
    for (int64_t d = 0; d < dim; ++d) {
      Vector xb;
      std::memcpy(&xb, tile + d * stride + t0, sizeof(Vector));
      for (int g = 0; g < kGroup; ++g) accumulate_squared(acc[g], Vector{} + anchors[g * dim + d], xb);
    }
    for (int g = 0; g < kGroup; ++g) std::memcpy(squared + g * kBlock + t0, &acc[g], sizeof(Vector));
  }
  if (t0 == n) return;
  for (int g = 0; g < kGroup; ++g) std::fill(squared + g * kBlock + t0, squared + g * kBlock + n, T(0));
  for (int64_t d = 0; d < dim; ++d) {
    for (int g = 0; g < kGroup; ++g) {
      const T xa = anchors[g * dim + d];
      for (int64_t t = t0; t < n; ++t) accumulate_squared(squared[g * kBlock + t], xa, tile[d * stride + t]);
    }
  }
}

CRL_VECTOR_CLONES void squared_block(const float* tile, const float* anchors, int64_t dim, int64_t n,
                                     float* squared) {
  squared_block_body(tile, anchors, dim, n, squared);
}

CRL_VECTOR_CLONES void squared_block(const double* tile, const double* anchors, int64_t dim, int64_t n,
                                     double* squared) {
  squared_block_body(tile, anchors, dim, n, squared);
}

// One thread's scratch for instance mining: a [D, kBlock] candidate tile, the values of a group
// of anchors, their squared distances, and the top-K lists of the anchors being mined.
template <typename Acc>
struct InstanceScratch {
  std::vector<Acc> tile, group_values, squared, keys;
  std::vector<int32_t> index;
  std::vector<int64_t> n_pos, n_neg;
};

// Mines the anchors `members` (with their labels) of attribute j against all B candidates.
// x points at attribute j of features[B, A, D] (strides sb, sd), in their own dtype. Each block
// of candidates is copied once into the tile in the accumulation type, then scanned against
// every anchor, kGroup at a time. Arguments by value: the compiler can keep them in registers
// across the stores to the lists.
template <typename T, typename Acc>
void mine_instance_anchors(const T* x, int64_t sb, int64_t sd, int64_t batch, int64_t attributes, int64_t dim,
                           int64_t k, int64_t j, const int64_t* labels, const int64_t* predictions,
                           const std::vector<int64_t>& members, const std::vector<int64_t>& member_labels,
                           InstanceScratch<Acc>& scratch, bool* anchors, int64_t* partners) {
  const int64_t count = static_cast<int64_t>(members.size()), stride = tile_stride<Acc>();
  scratch.tile.resize(dim * stride);
  scratch.group_values.resize(kGroup * dim);
  scratch.squared.resize(kGroup * kBlock);
  scratch.keys.resize(count * 2 * k);
  scratch.index.resize(count * 2 * k);
  scratch.n_pos.assign(count, 0);
  scratch.n_neg.assign(count, 0);
  for (int64_t b0 = 0; b0 < batch; b0 += kBlock) {
    const int64_t n = std::min(kBlock, batch - b0);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t d = 0; d < dim; ++d) scratch.tile[d * stride + t] = static_cast<Acc>(x[(b0 + t) * sb + d * sd]);
    }
    for (int64_t g0 = 0; g0 < count; g0 += kGroup) {
      const int64_t size = std::min<int64_t>(kGroup, count - g0);
      for (int g = 0; g < kGroup; ++g) {  // a short last group repeats its first anchor: scanned, never used
        const int64_t a = members[g0 + (g < size ? g : 0)];
        for (int64_t d = 0; d < dim; ++d) scratch.group_values[g * dim + d] = static_cast<Acc>(x[a * sb + d * sd]);
      }
      squared_block(scratch.tile.data(), scratch.group_values.data(), dim, n, scratch.squared.data());
      for (int64_t g = 0; g < size; ++g) {
        const int64_t m = g0 + g, a = members[m], label = member_labels[m];
        const Acc* squared = scratch.squared.data() + g * kBlock;
        Acc* keys = scratch.keys.data() + m * 2 * k;  // [K positives | K negatives]
        int32_t* index = scratch.index.data() + m * 2 * k;
        int64_t n_pos = scratch.n_pos[m], n_neg = scratch.n_neg[m];
        for (int64_t t = 0; t < n; ++t) {
          const int64_t b = b0 + t;
          const int64_t other = labels[b * attributes + j];
          if (b == a || other < 0) continue;
          if (other != label) {
            offer_dynamic<false>(keys + k, index + k, n_neg, k, squared[t], static_cast<int32_t>(b));
          } else if (predictions[b * attributes + j] != label) {
            offer_dynamic<true>(keys, index, n_pos, k, squared[t], static_cast<int32_t>(b));
          }
        }
        scratch.n_pos[m] = n_pos;
        scratch.n_neg[m] = n_neg;
      }
    }
  }
  for (int64_t m = 0; m < count; ++m) {
    const int64_t row = members[m] * attributes + j;
    const int32_t* index = scratch.index.data() + m * 2 * k;
    anchors[row] = true;
    for (int64_t q = 0; q < scratch.n_pos[m]; ++q) partners[row * 2 * k + q] = index[q];
    for (int64_t q = 0; q < scratch.n_neg[m]; ++q) partners[row * 2 * k + k + q] = index[k + q];
  }
}

// Instance mining reads the features where they are (any strides and floating dtype). Extra
// memory per thread: a tile and the top-K lists of its anchors, O(D + B*K).
std::tuple<Tensor, Tensor> mine_instance_cpu(const Tensor& features, const Tensor& predictions_in,
                                             const Tensor& labels_in, const Tensor& active_in, int64_t k) {
  check_mine_instance_args(features, predictions_in, labels_in, active_in, k);
  const Tensor labels = labels_in.contiguous(), active = active_in.contiguous();
  const Tensor predictions = predictions_in.contiguous();
  const int64_t batch = labels.size(0), attributes = labels.size(1), dim = features.size(2);
  const int64_t max_classes = active.size(1);
  auto [anchors, partners] = new_mined(labels, k);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t* pred = predictions.data_ptr<int64_t>();
  const bool* act = active.data_ptr<bool>();
  bool* anchor = anchors.data_ptr<bool>();
  int64_t* out = partners.data_ptr<int64_t>();
  const int64_t sb = features.stride(0), sa = features.stride(1), sd = features.stride(2);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "crl_ops::mine_instance", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* x = features.data_ptr<scalar_t>();
    // Rows in attribute-major order, so a thread's share is one or a few attributes' anchors.
    at::parallel_for(0, attributes * batch, grain_for(batch * dim), [&](int64_t begin, int64_t end) {
      InstanceScratch<acc> scratch;
      std::vector<int64_t> members, member_labels;
      for (int64_t first = begin; first < end;) {
        const int64_t j = first / batch, last = std::min(end, (j + 1) * batch);
        members.clear();
        member_labels.clear();
        for (int64_t r = first; r < last; ++r) {
          int64_t label;
          if (!is_anchor(lab, act, attributes, max_classes, r % batch, j, label)) continue;
          members.push_back(r % batch);
          member_labels.push_back(label);
        }
        if (!members.empty()) {
          mine_instance_anchors(x + j * sa, sb, sd, batch, attributes, dim, k, j, lab, pred, members, member_labels,
                                scratch, anchor, out);
        }
        first = last;
      }
    });
  });
  return {anchors, partners};
}

// ---- 3. pair distances and their backward, inside the loss ops -------------------------------------------

void check_partner_range(const int64_t* partners, int64_t count, int64_t batch) {
  for (int64_t m = 0; m < count; ++m) {
    TORCH_CHECK(partners[m] >= -1 && partners[m] < batch, "crl_ops: partner index ", partners[m],
                " is outside -1..", batch - 1);
  }
}

// d[B, A, 2K] in the accumulation type; 0 where the partner slot is empty. partners: contiguous.
Tensor distances_cpu(const Tensor& features, const Tensor& partners) {
  const int64_t batch = features.size(0), attributes = features.size(1), dim = features.size(2);
  const int64_t width = partners.size(2);
  Tensor distances = at::empty(partners.sizes(), features.options().dtype(accumulation_type(features.scalar_type())));
  const int64_t* p = partners.data_ptr<int64_t>();
  check_partner_range(p, partners.numel(), batch);
  const int64_t sb = features.stride(0), sa = features.stride(1), sd = features.stride(2);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "crl_ops::distances", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* x = features.data_ptr<scalar_t>();
    acc* out = distances.data_ptr<acc>();
    at::parallel_for(0, batch * attributes, grain_for(width * dim), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t i = row / attributes, j = row % attributes;
        for (int64_t m = 0; m < width; ++m) {
          const int64_t other = p[row * width + m];
          if (other < 0) {
            out[row * width + m] = acc(0);
            continue;
          }
          out[row * width + m] = distance_from_squared(
              squared_distance<acc>(x + i * sb + j * sa, sd, x + other * sb + j * sa, sd, dim));
        }
      }
    });
  });
  return distances;
}

// d loss / d features from grad[B, A, 2K] = d loss / d distances: each pair adds s * (x_i - x_p)
// to its sample's row and subtracts it from its partner's. All of partners, distances, grad: contiguous.
Tensor features_gradient_cpu(const Tensor& grad, const Tensor& features, const Tensor& partners,
                             const Tensor& distances) {
  const int64_t batch = features.size(0), attributes = features.size(1), dim = features.size(2);
  const int64_t width = partners.size(2);
  Tensor grad_features = at::zeros(features.sizes(), features.options().dtype(distances.scalar_type()));
  const int64_t* p = partners.data_ptr<int64_t>();
  check_partner_range(p, partners.numel(), batch);  // the backward op may be called on its own
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

// ---- 4. the loss forms ---------------------------------------------------------------------------------

// Calls row_fn(row) for every row in parallel; then returns the rows' values summed in row order.
template <typename Value, typename RowFn>
Value sum_rows(int64_t rows, int64_t row_work, RowFn row_fn) {
  std::vector<Value> partial(rows);
  at::parallel_for(0, rows, grain_for(row_work), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) partial[r] = row_fn(r);
  });
  Value total{};
  for (const Value& v : partial) total += v;
  return total;
}

template <typename Acc>
struct RowSums {
  Acc pos = 0, neg = 0;
  int64_t pos_pairs = 0, neg_pairs = 0;
  RowSums& operator+=(const RowSums& o) {
    pos += o.pos;
    neg += o.neg;
    pos_pairs += o.pos_pairs;
    neg_pairs += o.neg_pairs;
    return *this;
  }
};

std::tuple<Tensor, Tensor, Tensor> relative_loss_cpu(const Tensor& features, const Tensor& partners_in,
                                                     const Tensor& margins_in) {
  check_relative_args(features, partners_in, margins_in);
  const Tensor partners = partners_in.contiguous();
  const Tensor distances = distances_cpu(features, partners);
  const Tensor margins = margins_in.to(distances.scalar_type()).contiguous();
  const int64_t attributes = distances.size(1), width = distances.size(2), k = width / 2;
  const int64_t rows = distances.size(0) * attributes;
  const int64_t* p = partners.data_ptr<int64_t>();
  Tensor loss = at::empty({}, distances.options());
  Tensor triplets = at::empty({}, partners.options());
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::relative_loss", [&] {
    const scalar_t* d = distances.data_ptr<scalar_t>();
    const scalar_t* margin = margins.data_ptr<scalar_t>();
    // RowSums' positive fields carry the hinge sum and the triplet count here.
    const RowSums<scalar_t> total = sum_rows<RowSums<scalar_t>>(rows, k * k, [&](int64_t r) {
      RowSums<scalar_t> s;
      relative_row(d + r * width, p + r * width, k, margin[r % attributes], s.pos, s.pos_pairs);
      return s;
    });
    loss.fill_(total.pos / static_cast<scalar_t>(std::max<int64_t>(total.pos_pairs, 1)));
    triplets.fill_(total.pos_pairs);
  });
  return {loss, distances, triplets};
}

Tensor relative_loss_backward_cpu(const Tensor& grad, const Tensor& features, const Tensor& partners_in,
                                  const Tensor& distances_in, const Tensor& margins_in, const Tensor& num_triplets) {
  check_loss_backward_args(grad, features, partners_in, distances_in);
  const Tensor distances = distances_in.contiguous(), partners = partners_in.contiguous();
  const Tensor margins = margins_in.to(distances.scalar_type()).contiguous();
  const int64_t attributes = distances.size(1), width = distances.size(2), k = width / 2;
  const int64_t rows = distances.size(0) * attributes;
  Tensor grad_d = at::empty_like(distances);
  const int64_t* p = partners.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::relative_loss_backward", [&] {
    const scalar_t scale = grad.item<scalar_t>() / static_cast<scalar_t>(std::max<int64_t>(num_triplets.item<int64_t>(), 1));
    const scalar_t* d = distances.data_ptr<scalar_t>();
    const scalar_t* margin = margins.data_ptr<scalar_t>();
    scalar_t* out = grad_d.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(k * k), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        relative_row_backward(d + r * width, p + r * width, k, margin[r % attributes], scale, out + r * width);
      }
    });
  });
  return features_gradient_cpu(grad_d, features, partners, distances);
}

std::tuple<Tensor, Tensor, Tensor> absolute_loss_cpu(const Tensor& features, const Tensor& partners_in,
                                                     double margin) {
  check_loss_args(features, partners_in);
  const Tensor partners = partners_in.contiguous();
  const Tensor distances = distances_cpu(features, partners);
  const int64_t width = distances.size(2), k = width / 2;
  const int64_t rows = distances.size(0) * distances.size(1);
  const int64_t* p = partners.data_ptr<int64_t>();
  Tensor loss = at::empty({}, distances.options());
  Tensor pairs = at::empty({2}, partners.options());
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::absolute_loss", [&] {
    const scalar_t* d = distances.data_ptr<scalar_t>();
    const RowSums<scalar_t> total = sum_rows<RowSums<scalar_t>>(rows, k * k, [&](int64_t r) {
      RowSums<scalar_t> s;
      absolute_row(d + r * width, p + r * width, k, static_cast<scalar_t>(margin), s.pos, s.neg, s.pos_pairs,
                   s.neg_pairs);
      return s;
    });
    const scalar_t pos_mean = total.pos / static_cast<scalar_t>(std::max<int64_t>(total.pos_pairs, 1));
    const scalar_t neg_mean = total.neg / static_cast<scalar_t>(std::max<int64_t>(total.neg_pairs, 1));
    loss.fill_(scalar_t(0.5) * (pos_mean + neg_mean));
    pairs[0] = total.pos_pairs;
    pairs[1] = total.neg_pairs;
  });
  return {loss, distances, pairs};
}

Tensor absolute_loss_backward_cpu(const Tensor& grad, const Tensor& features, const Tensor& partners_in,
                                  const Tensor& distances_in, double margin, const Tensor& num_pairs) {
  check_loss_backward_args(grad, features, partners_in, distances_in);
  const Tensor distances = distances_in.contiguous(), partners = partners_in.contiguous();
  const int64_t width = distances.size(2), k = width / 2;
  const int64_t rows = distances.size(0) * distances.size(1);
  Tensor grad_d = at::empty_like(distances);
  const int64_t* p = partners.data_ptr<int64_t>();
  const int64_t* n = num_pairs.contiguous().data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::absolute_loss_backward", [&] {
    const scalar_t g = grad.item<scalar_t>();
    // d/dd of 0.5 * d^2 / n_pos is d / n_pos; of 0.5 * hinge(m - d)^2 / n_neg is -hinge / n_neg.
    const scalar_t pos_scale = g / static_cast<scalar_t>(std::max<int64_t>(n[0], 1));
    const scalar_t neg_scale = g / static_cast<scalar_t>(std::max<int64_t>(n[1], 1));
    const scalar_t* d = distances.data_ptr<scalar_t>();
    scalar_t* out = grad_d.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(k * k), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        absolute_row_backward(d + r * width, p + r * width, k, static_cast<scalar_t>(margin), pos_scale, neg_scale,
                              out + r * width);
      }
    });
  });
  return features_gradient_cpu(grad_d, features, partners, distances);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> distribution_loss_cpu(const Tensor& features,
                                                                         const Tensor& partners_in, int64_t bins) {
  check_loss_args(features, partners_in);
  check_bins(bins);
  const Tensor partners = partners_in.contiguous();
  const Tensor distances = distances_cpu(features, partners);
  const int64_t batch = distances.size(0), attributes = distances.size(1), width = distances.size(2), k = width / 2;
  Tensor histograms = at::zeros({attributes, 2, bins}, distances.options());
  Tensor scale = at::zeros({attributes}, distances.options());
  Tensor pair_counts = at::zeros({attributes, 2}, partners.options());
  Tensor loss = at::empty({}, distances.options());
  const int64_t* p = partners.data_ptr<int64_t>();
  int64_t* counts = pair_counts.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::distribution_loss", [&] {
    const scalar_t* d = distances.data_ptr<scalar_t>();
    scalar_t* hist = histograms.data_ptr<scalar_t>();
    scalar_t* scl = scale.data_ptr<scalar_t>();
    std::vector<scalar_t> per_attribute(attributes, scalar_t(0));
    at::parallel_for(0, attributes, grain_for(batch * width), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        scalar_t longest = 0;
        for (int64_t i = 0; i < batch; ++i) {
          for (int64_t m = 0; m < width; ++m) {
            const int64_t at = (i * attributes + j) * width + m;
            if (p[at] < 0) continue;
            longest = std::max(longest, d[at]);
            ++counts[j * 2 + (m >= k)];
          }
        }
        scl[j] = longest > scalar_t(0) ? static_cast<scalar_t>(bins - 1) / longest : scalar_t(0);
        scalar_t* h = hist + j * 2 * bins;  // h[0..bins) positives, h[bins..2 bins) negatives
        for (int64_t i = 0; i < batch; ++i) {
          for (int64_t m = 0; m < width; ++m) {
            const int64_t at = (i * attributes + j) * width + m;
            if (p[at] < 0) continue;
            int64_t node;
            scalar_t w;
            histogram_node(d[at], scl[j], bins, node, w);
            scalar_t* kind = h + (m >= k ? bins : 0);
            kind[node] += scalar_t(1) - w;
            kind[node + 1] += w;
          }
        }
        for (int64_t side = 0; side < 2; ++side) {
          const scalar_t n = static_cast<scalar_t>(std::max<int64_t>(counts[j * 2 + side], 1));
          for (int64_t t = 0; t < bins; ++t) h[side * bins + t] /= n;
        }
        per_attribute[j] = histogram_overlap(h, h + bins, bins);
      }
    });
    scalar_t total = 0;
    int64_t counted = 0;
    for (int64_t j = 0; j < attributes; ++j) {
      if (counts[j * 2] > 0 && counts[j * 2 + 1] > 0) {
        total += per_attribute[j];
        ++counted;
      }
    }
    loss.fill_(total / static_cast<scalar_t>(std::max<int64_t>(counted, 1)));
  });
  return {loss, distances, histograms, scale, pair_counts};
}

Tensor distribution_loss_backward_cpu(const Tensor& grad, const Tensor& features, const Tensor& partners_in,
                                      const Tensor& distances_in, int64_t bins, const Tensor& histograms_in,
                                      const Tensor& scale_in, const Tensor& pair_counts_in) {
  check_distribution_backward_args(grad, features, partners_in, distances_in, bins, histograms_in, scale_in,
                                   pair_counts_in);
  const Tensor distances = distances_in.contiguous(), partners = partners_in.contiguous();
  const int64_t batch = distances.size(0), attributes = distances.size(1), width = distances.size(2), k = width / 2;
  const Tensor histograms = histograms_in.to(distances.scalar_type()).contiguous();
  const Tensor scale = scale_in.to(distances.scalar_type()).contiguous();
  const Tensor pair_counts = pair_counts_in.contiguous();
  Tensor grad_d = at::zeros_like(distances);
  const int64_t* p = partners.data_ptr<int64_t>();
  const int64_t* counts = pair_counts.data_ptr<int64_t>();
  int64_t counted = 0;
  for (int64_t j = 0; j < attributes; ++j) counted += counts[j * 2] > 0 && counts[j * 2 + 1] > 0;
  AT_DISPATCH_FLOATING_TYPES(distances.scalar_type(), "crl_ops::distribution_loss_backward", [&] {
    const scalar_t g = grad.item<scalar_t>() / static_cast<scalar_t>(std::max<int64_t>(counted, 1));
    const scalar_t* d = distances.data_ptr<scalar_t>();
    const scalar_t* hist = histograms.data_ptr<scalar_t>();
    const scalar_t* scl = scale.data_ptr<scalar_t>();
    scalar_t* out = grad_d.data_ptr<scalar_t>();
    at::parallel_for(0, attributes, grain_for(batch * width), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> g_pos(bins), g_neg(bins);
      for (int64_t j = begin; j < end; ++j) {
        if (counts[j * 2] == 0 || counts[j * 2 + 1] == 0) continue;
        histogram_overlap_gradient(hist + j * 2 * bins, hist + j * 2 * bins + bins, bins, g_pos.data(), g_neg.data());
        const scalar_t pos_factor = g / static_cast<scalar_t>(counts[j * 2]);
        const scalar_t neg_factor = g / static_cast<scalar_t>(counts[j * 2 + 1]);
        for (int64_t i = 0; i < batch; ++i) {
          for (int64_t m = 0; m < width; ++m) {
            const int64_t at = (i * attributes + j) * width + m;
            if (p[at] < 0) continue;
            const bool negative = m >= k;
            out[at] = (negative ? neg_factor : pos_factor) *
                      histogram_pair_gradient(d[at], scl[j], bins, negative ? g_neg.data() : g_pos.data());
          }
        }
      }
    });
  });
  return features_gradient_cpu(grad_d, features, partners, distances);
}

}  // namespace
}  // namespace crl

TORCH_LIBRARY_IMPL(crl_ops, CPU, m) {
  m.impl("profile", &crl::profile_cpu);
  m.impl("mine_class", &crl::mine_class_cpu);
  m.impl("mine_instance", &crl::mine_instance_cpu);
  m.impl("relative_loss", &crl::relative_loss_cpu);
  m.impl("relative_loss_backward", &crl::relative_loss_backward_cpu);
  m.impl("absolute_loss", &crl::absolute_loss_cpu);
  m.impl("absolute_loss_backward", &crl::absolute_loss_backward_cpu);
  m.impl("distribution_loss", &crl::distribution_loss_cpu);
  m.impl("distribution_loss_backward", &crl::distribution_loss_backward_cpu);
}
