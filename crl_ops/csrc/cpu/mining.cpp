// CPU: hard mining (section 2), class level by class probability and instance level by a fused
// distance scan with top-K selection (no [B, B] matrix).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu_kernels.h"

namespace crl {
namespace cpu {

namespace {

// Outputs of the mining ops: anchors[R, A] false, partners[R, A, 2K] all empty (-1).
std::tuple<Tensor, Tensor> new_mined(const Tensor& labels, int64_t rows, int64_t k) {
  const auto options = labels.options();
  return {at::zeros({rows, labels.size(1)}, options.dtype(at::kBool)),
          at::full({rows, labels.size(1), 2 * k}, -1, options.dtype(at::kLong))};
}

// Column j of labels as the kernels read it: the label where annotated, -1 elsewhere.
void annotated_column(const int64_t* labels, int64_t batch, int64_t attributes, int64_t j, int64_t classes,
                      std::vector<int64_t>& column) {
  column.resize(batch);
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t label = labels[i * attributes + j];
    column[i] = is_annotated(label, classes) ? label : kEmpty;
  }
}

template <typename T>
LogitsRow<T> logits_row(const T* z, const Tensor& logits, int64_t i, int64_t j, int64_t classes) {
  const bool binary = logits.dim() == 2;
  return {z + i * logits.stride(0) + j * logits.stride(1), binary ? 0 : logits.stride(2), binary,
          binary ? 2 : std::min(classes, logits.size(2))};
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

// Mines the anchors `members` (with their labels) of attribute j against all B candidates, whose
// labels (-1 where not annotated) and misclassified flags are `labels` and `misclassified`.
// x points at attribute j of features[B, A, D] (strides sb, sd), in their own dtype. Each block
// of candidates is copied once into the tile in the accumulation type, then scanned against
// every anchor, kGroup at a time. Writes the rows (member - first) of anchors and partners [R, A,
// 2K]; returns whether a mined pair's squared distance overflowed. Arguments by value: the
// compiler can keep them in registers across the stores to the lists.
template <typename T, typename Acc>
bool mine_instance_anchors(const T* x, int64_t sb, int64_t sd, int64_t batch, int64_t attributes, int64_t dim,
                           int64_t k, int64_t j, int64_t first, const int64_t* labels, const bool* misclassified,
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
          const int64_t other = labels[b];
          if (b == a || other < 0) continue;
          if (other != label) {
            offer_dynamic<false>(keys + k, index + k, n_neg, k, squared[t], static_cast<int32_t>(b));
          } else if (misclassified[b]) {
            offer_dynamic<true>(keys, index, n_pos, k, squared[t], static_cast<int32_t>(b));
          }
        }
        scratch.n_pos[m] = n_pos;
        scratch.n_neg[m] = n_neg;
      }
    }
  }
  bool overflow = false;
  for (int64_t m = 0; m < count; ++m) {
    const int64_t row = (members[m] - first) * attributes + j;
    const int32_t* index = scratch.index.data() + m * 2 * k;
    const Acc* keys = scratch.keys.data() + m * 2 * k;
    anchors[row] = true;
    for (int64_t q = 0; q < scratch.n_pos[m]; ++q) {
      partners[row * 2 * k + q] = index[q];
      overflow |= std::isinf(keys[q]);
    }
    for (int64_t q = 0; q < scratch.n_neg[m]; ++q) {
      partners[row * 2 * k + k + q] = index[k + q];
      overflow |= std::isinf(keys[k + q]);
    }
  }
  return overflow;
}

}  // namespace

std::tuple<Tensor, Tensor> mine_class(const Tensor& logits, const Tensor& labels, const Tensor& num_classes,
                                      const Tensor& active, int64_t k, int64_t first, int64_t rows) {
  const int64_t batch = labels.size(0), attributes = labels.size(1), max_classes = active.size(1);
  auto [anchors, partners] = new_mined(labels, rows, k);
  // The K hardest positives and negatives of each (attribute, class), shared by its anchors.
  std::vector<int32_t> hard_pos(attributes * max_classes * k, -1), hard_neg(attributes * max_classes * k, -1);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t* classes = num_classes.data_ptr<int64_t>();
  const bool* act = active.data_ptr<bool>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "crl_ops::mine_class", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    // Each sample's softmax normaliser per attribute, once: p_i(c) = exp(z_ic - max) / sum.
    std::vector<Softmax<acc>> softmax(batch * attributes);
    at::parallel_for(0, batch * attributes, grain_for(max_classes), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        softmax[r] = Softmax<acc>::of(logits_row(z, logits, r / attributes, r % attributes, classes[r % attributes]));
      }
    });
    at::parallel_for(0, attributes * max_classes, grain_for(batch), [&](int64_t begin, int64_t end) {
      std::vector<acc> pos_keys(k), neg_keys(k);
      for (int64_t jc = begin; jc < end; ++jc) {
        if (!act[jc]) continue;
        const int64_t j = jc / max_classes, c = jc % max_classes, c_j = std::min(classes[j], max_classes);
        int32_t* pos = hard_pos.data() + jc * k;
        int32_t* neg = hard_neg.data() + jc * k;
        int64_t n_pos = 0, n_neg = 0;
        for (int64_t i = 0; i < batch; ++i) {
          const int64_t label = lab[i * attributes + j];
          if (!is_annotated(label, c_j)) continue;
          const acc key = softmax[i * attributes + j].probability(logits_row(z, logits, i, j, c_j).template logit<acc>(c));
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
  at::parallel_for(0, rows * attributes, grain_for(2 * k), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = first + row / attributes, j = row % attributes;
      int64_t label;
      if (!is_anchor(lab, act, attributes, max_classes, classes[j], i, j, label)) continue;
      anchor[row] = true;
      const int64_t list = (j * max_classes + label) * k;
      write_class_row(hard_pos.data() + list, hard_neg.data() + list, k, i, out + row * 2 * k);
    }
  });
  return {anchors, partners};
}

// Instance mining reads the features where they are (any strides and floating dtype). Extra
// memory per thread: a tile and the top-K lists of its anchors, O(D + B*K).
std::tuple<Tensor, Tensor, bool> mine_instance(const Tensor& features, const Tensor& logits, const Tensor& labels,
                                               const Tensor& num_classes, const Tensor& active, int64_t k,
                                               int64_t first, int64_t rows) {
  const int64_t batch = labels.size(0), attributes = labels.size(1), dim = features.size(2);
  const int64_t max_classes = active.size(1);
  auto [anchors, partners] = new_mined(labels, rows, k);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t* classes = num_classes.data_ptr<int64_t>();
  const bool* act = active.data_ptr<bool>();
  bool* anchor = anchors.data_ptr<bool>();
  int64_t* out = partners.data_ptr<int64_t>();
  const int64_t sb = features.stride(0), sa = features.stride(1), sd = features.stride(2);
  std::atomic<bool> overflow{false};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "crl_ops::mine_instance", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* x = features.data_ptr<scalar_t>();
    // Rows in attribute-major order, so a thread's share is one or a few attributes' anchors.
    at::parallel_for(0, attributes * rows, grain_for(batch * dim), [&](int64_t begin, int64_t end) {
      InstanceScratch<acc> scratch;
      std::vector<int64_t> members, member_labels, column;
      std::vector<uint8_t> misclassified;
      for (int64_t task = begin; task < end;) {
        const int64_t j = task / rows, last = std::min(end, (j + 1) * rows);
        const int64_t c_j = std::min(classes[j], max_classes);
        members.clear();
        member_labels.clear();
        for (int64_t r = task; r < last; ++r) {
          int64_t label;
          if (!is_anchor(lab, act, attributes, max_classes, classes[j], first + r % rows, j, label)) continue;
          members.push_back(first + r % rows);
          member_labels.push_back(label);
        }
        if (!members.empty()) {
          annotated_column(lab, batch, attributes, j, c_j, column);
          misclassified.resize(batch);
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "crl_ops::predictions", [&] {
            const scalar_t* z = logits.data_ptr<scalar_t>();
            for (int64_t b = 0; b < batch; ++b) {
              misclassified[b] = predicted_class<acc_t<scalar_t>>(logits_row(z, logits, b, j, c_j)) != column[b];
            }
          });
          const bool over = mine_instance_anchors(x + j * sa, sb, sd, batch, attributes, dim, k, j, first,
                                                  column.data(), reinterpret_cast<const bool*>(misclassified.data()),
                                                  members, member_labels, scratch, anchor, out);
          if (over) overflow = true;
        }
        task = last;
      }
    });
  });
  return {anchors, partners, overflow.load()};
}

}  // namespace cpu
}  // namespace crl
