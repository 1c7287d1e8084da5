// CPU: hard mining (section 2), class level by class probability and instance level by a fused
// distance scan with top-K selection (no [B, B] matrix).
//
// Selection: each list holds its candidates as selection keys (common/select.h), best first, so
// one integer comparison orders them exactly as ranks_before does. Candidates are offered in
// increasing sample index, so a full list takes a candidate only if its key is strictly better
// than the K-th key: that test runs first (vectorised across anchors in instance mining), and the
// few candidates that pass are inserted. The lists, and so the mined rows in best-first order,
// are those of offer_dynamic (crl_math.h) for finite and infinite keys; with NaN keys (non-finite
// inputs: validate raises, else the loss is NaN) the mined sets are unspecified.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#include <immintrin.h>
#endif

#include "common/select.h"
#include "cpu/cpu_kernels.h"

namespace crl {
namespace cpu {

namespace {

// Inserts `candidate` into the sorted list items[0..count) of capacity k, dropping the k-th if the
// list is full; returns whether it was taken. The position is counted rather than searched (a
// loop without branches, which vectorises), then the tail moves up by one.
template <typename Selected>
inline bool insert_selected(Selected* items, int64_t& count, int64_t k, Selected candidate) {
  if (count == k) {
    if (!(candidate < items[k - 1])) return false;
    --count;
  }
  int64_t pos = 0;
  for (int64_t q = 0; q < count; ++q) pos += items[q] < candidate;
  if (count - pos > 16) {
    std::memmove(items + pos + 1, items + pos, (count - pos) * sizeof(Selected));
  } else {  // short moves: a loop costs less than the call
    for (int64_t q = count; q > pos; --q) items[q] = items[q - 1];
  }
  items[pos] = candidate;
  ++count;
  return true;
}

template <typename T>
LogitsRow<T> logits_row(const T* z, const Tensor& logits, int64_t i, int64_t j, int64_t classes) {
  const bool binary = logits.dim() == 2;
  return {z + i * logits.stride(0) + j * logits.stride(1), binary ? 0 : logits.stride(2), binary,
          binary ? 2 : std::min(classes, logits.size(2))};
}

// Writes one side of a mined row: the list's indices, then -1.
template <bool Largest, typename Acc>
bool write_side(const selection_key_t<Acc>* items, int64_t count, int64_t k, int64_t* out) {
  bool infinite = false;
  for (int64_t q = 0; q < count; ++q) {
    out[q] = selected_index<Acc>(items[q]);
    infinite |= std::isinf(selected_key<Largest, Acc>(items[q]));
  }
  std::fill(out + count, out + k, kEmpty);
  return infinite;
}

// ---- instance level: the distance scan ----------------------------------------------------------
//
// The anchors of one attribute are taken in groups of L (a 64-byte vector of the accumulation
// type: 16 floats or 8 doubles; half of that for a group of at most L/2 anchors), laid out
// [D, L]. Each candidate's row of D values is broadcast one value at a time against the group,
// four candidates at once, so every lane holds one (anchor, candidate) sum, accumulated with
// accumulate_squared in order of d: bitwise the squared_distance of every other kernel. Rows are
// read in place for float32/float64 features with unit stride along D, else converted a block
// at a time into a per-thread buffer.

constexpr int64_t kBlock = 256;  // candidates per block of keys
constexpr int kStep = 4;          // candidates whose sums run together

template <typename Acc>
constexpr int kLanes = 64 / static_cast<int>(sizeof(Acc));

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CRL_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CRL_VECTOR_CLONES
#endif

// accumulate_squared (crl_math.h) in every lane of `sum`, with b the same candidate value in
// every lane: the same two steps, but with GCC's vector-minus-scalar, which compiles to one
// subtraction with a broadcast operand (a vector built from b first costs an extra operation).
template <typename Vector, typename Acc>
__attribute__((always_inline)) inline void accumulate_squared_lanes(Vector& sum, const Vector& a, Acc b) {
  const Vector diff = a - b;
  sum += diff * diff;
}

// keys[t * L + l] = squared distance of anchor lane l ([D, L] in `anchors`) to candidate row
// rows[t], for t < n.
template <typename Acc, int L>
__attribute__((always_inline)) inline void group_keys_body(const Acc* anchors, int64_t dim, const Acc* const* rows,
                                                           int64_t n, Acc* keys) {
  typedef Acc Vector __attribute__((vector_size(L * sizeof(Acc))));
  int64_t t = 0;
  for (; t + kStep <= n; t += kStep) {
    const Acc *r0 = rows[t], *r1 = rows[t + 1], *r2 = rows[t + 2], *r3 = rows[t + 3];
    Vector s0 = {}, s1 = {}, s2 = {}, s3 = {};
    for (int64_t d = 0; d < dim; ++d) {
      Vector a;
      std::memcpy(&a, anchors + d * L, sizeof(Vector));
      accumulate_squared_lanes(s0, a, r0[d]);
      accumulate_squared_lanes(s1, a, r1[d]);
      accumulate_squared_lanes(s2, a, r2[d]);
      accumulate_squared_lanes(s3, a, r3[d]);
    }
    std::memcpy(keys + t * L, &s0, sizeof(Vector));
    std::memcpy(keys + (t + 1) * L, &s1, sizeof(Vector));
    std::memcpy(keys + (t + 2) * L, &s2, sizeof(Vector));
    std::memcpy(keys + (t + 3) * L, &s3, sizeof(Vector));
  }
  for (; t < n; ++t) {
    const Acc* r = rows[t];
    Vector s = {};
    for (int64_t d = 0; d < dim; ++d) {
      Vector a;
      std::memcpy(&a, anchors + d * L, sizeof(Vector));
      accumulate_squared_lanes(s, a, r[d]);
    }
    std::memcpy(keys + t * L, &s, sizeof(Vector));
  }
}

template <typename Acc>
__attribute__((always_inline)) inline void group_keys_any(const Acc* anchors, int64_t dim, bool half,
                                                          const Acc* const* rows, int64_t n, Acc* keys) {
  if (half) {
    group_keys_body<Acc, kLanes<Acc> / 2>(anchors, dim, rows, n, keys);
  } else {
    group_keys_body<Acc, kLanes<Acc>>(anchors, dim, rows, n, keys);
  }
}

CRL_VECTOR_CLONES void group_keys(const float* anchors, int64_t dim, bool half, const float* const* rows, int64_t n,
                                  float* keys) {
  group_keys_any(anchors, dim, half, rows, n, keys);
}

CRL_VECTOR_CLONES void group_keys(const double* anchors, int64_t dim, bool half, const double* const* rows, int64_t n,
                                  double* keys) {
  group_keys_any(anchors, dim, half, rows, n, keys);
}

// The top-K lists of a group's anchor lanes, and what the test of a candidate needs as lane bit
// masks: the lanes in use, the lanes whose list holds fewer than K ("open": it takes any
// candidate), and per class of the group's anchors the lanes of that class. A full list's
// threshold is its K-th key.
template <typename Acc>
struct GroupLists {
  using Selected = selection_key_t<Acc>;
  static constexpr int L = kLanes<Acc>;

  int64_t k = 0;
  int size = 0;
  const int32_t* members = nullptr;  // the lanes' anchors, increasing
  int next_member = 0;               // the first lane whose anchor is not below the next candidate
  uint32_t used = 0, pos_open = 0, neg_open = 0;
  int classes = 0;
  int64_t class_label[L];
  uint32_t class_lanes[L];
  std::vector<Selected> pos, neg;  // [L, K] each
  int64_t pos_count[L], neg_count[L];
  Acc pos_threshold[L], neg_threshold[L];

  void reset(int64_t capacity, int group_size, const int32_t* anchors, const int64_t* anchor_labels) {
    k = capacity;
    size = group_size;
    members = anchors;
    next_member = 0;
    used = pos_open = neg_open = (uint32_t(1) << size) - 1;
    classes = 0;
    for (int l = 0; l < size; ++l) {
      int c = 0;
      while (c < classes && class_label[c] != anchor_labels[l]) ++c;
      if (c == classes) {
        class_label[classes] = anchor_labels[l];
        class_lanes[classes++] = 0;
      }
      class_lanes[c] |= uint32_t(1) << l;
    }
    pos.resize(L * k);
    neg.resize(L * k);
    for (int l = 0; l < L; ++l) {
      pos_count[l] = neg_count[l] = 0;
      pos_threshold[l] = neg_threshold[l] = Acc(0);  // read only once the list is full
    }
  }

  uint32_t lanes_of_class(int64_t label) const {
    for (int c = 0; c < classes; ++c) {
      if (class_label[c] == label) return class_lanes[c];
    }
    return 0;
  }

  // The lane whose anchor is candidate b, as a bit (0 if none); candidates come in increasing order.
  uint32_t self_lane(int32_t b) {
    while (next_member < size && members[next_member] < b) ++next_member;
    return next_member < size && members[next_member] == b ? uint32_t(1) << next_member : 0;
  }

  const Selected* negatives(int l) const { return neg.data() + l * k; }
  const Selected* positives(int l) const { return pos.data() + l * k; }

  void offer_negative(int l, Acc key, int32_t b) {
    Selected* items = neg.data() + l * k;
    insert_selected(items, neg_count[l], k, selection_key<false>(key, b));
    if (neg_count[l] == k) {
      neg_open &= ~(uint32_t(1) << l);
      neg_threshold[l] = selected_key<false, Acc>(items[k - 1]);
    }
  }

  void offer_positive(int l, Acc key, int32_t b) {
    Selected* items = pos.data() + l * k;
    insert_selected(items, pos_count[l], k, selection_key<true>(key, b));
    if (pos_count[l] == k) {
      pos_open &= ~(uint32_t(1) << l);
      pos_threshold[l] = selected_key<true, Acc>(items[k - 1]);
    }
  }
};

// The lanes l < N where key[l] < threshold[l] (Below) or key[l] > threshold[l] (Above), as a bit
// mask; false for NaN, as the scalar comparison. One implementation per instruction set: a
// comparison of wide generic vectors would be split into scalar steps on AVX2.
struct PlainLanes {
  template <bool Below, int N, typename Acc>
  static uint32_t compare(const Acc* key, const Acc* threshold) {
    uint32_t bits = 0;
    for (int l = 0; l < N; ++l) bits |= uint32_t(Below ? key[l] < threshold[l] : key[l] > threshold[l]) << l;
    return bits;
  }
};

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CRL_X86_LANES 1
// key and threshold: readable for a full 64-byte vector (the arrays are padded); the lanes past
// N are masked off.
struct Avx512Lanes {
  template <bool Below, int N, typename Acc>
  __attribute__((target("avx512f"))) static inline uint32_t compare(const Acc* key, const Acc* threshold) {
    constexpr int predicate = Below ? _CMP_LT_OQ : _CMP_GT_OQ;
    constexpr uint32_t lanes = (uint32_t(1) << N) - 1;
    if constexpr (sizeof(Acc) == 4) {
      return _mm512_cmp_ps_mask(_mm512_loadu_ps(key), _mm512_loadu_ps(threshold), predicate) & lanes;
    } else {
      return _mm512_cmp_pd_mask(_mm512_loadu_pd(key), _mm512_loadu_pd(threshold), predicate) & lanes;
    }
  }
};

struct Avx2Lanes {
  template <bool Below, int N, typename Acc>
  __attribute__((target("avx2"))) static inline uint32_t compare(const Acc* key, const Acc* threshold) {
    constexpr int predicate = Below ? _CMP_LT_OQ : _CMP_GT_OQ;
    constexpr int per_vector = 32 / sizeof(Acc);
    uint32_t bits = 0;
    for (int h = 0; h < N / per_vector; ++h) {
      uint32_t half;
      if constexpr (sizeof(Acc) == 4) {
        half = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(key + h * per_vector),
                                                _mm256_loadu_ps(threshold + h * per_vector), predicate));
      } else {
        half = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(key + h * per_vector),
                                                _mm256_loadu_pd(threshold + h * per_vector), predicate));
      }
      bits |= half << (h * per_vector);
    }
    return bits;
  }
};
#endif

// Offers candidates cand[0..n) (their keys from group_keys, N per candidate) to the group's lists,
// in increasing order. Negatives: annotated candidates of another class than the lane's anchor;
// positives: misclassified ones of the same class, not the anchor itself. The vector test lets
// through exactly the lanes whose list is open or whose threshold the key beats.
template <typename Acc, int N, typename Lanes>
inline void select_body(GroupLists<Acc>& lists, const Acc* keys, const int32_t* cand, int64_t n, const int64_t* labels,
                        const uint8_t* misclassified) {
  for (int64_t t = 0; t < n; ++t) {
    const int32_t b = cand[t];
    const Acc* key = keys + t * N;
    const uint32_t same = lists.lanes_of_class(labels[b]);
    const uint32_t self = lists.self_lane(b);
    uint32_t negative = lists.used & ~same, positive = misclassified[b] ? same & ~self : 0;
    if (negative & ~lists.neg_open) negative &= lists.neg_open | Lanes::template compare<true, N>(key, lists.neg_threshold);
    if (positive & ~lists.pos_open) positive &= lists.pos_open | Lanes::template compare<false, N>(key, lists.pos_threshold);
    for (; negative != 0; negative &= negative - 1) {
      const int l = __builtin_ctz(negative);
      lists.offer_negative(l, key[l], b);
    }
    for (; positive != 0; positive &= positive - 1) {
      const int l = __builtin_ctz(positive);
      lists.offer_positive(l, key[l], b);
    }
  }
}

template <typename Acc, typename Lanes>
inline void select_lanes(GroupLists<Acc>& lists, bool half, const Acc* keys, const int32_t* cand, int64_t n,
                         const int64_t* labels, const uint8_t* misclassified) {
  if (half) {
    select_body<Acc, kLanes<Acc> / 2, Lanes>(lists, keys, cand, n, labels, misclassified);
  } else {
    select_body<Acc, kLanes<Acc>, Lanes>(lists, keys, cand, n, labels, misclassified);
  }
}

template <typename Acc>
using SelectBlock = void (*)(GroupLists<Acc>&, bool, const Acc*, const int32_t*, int64_t, const int64_t*,
                             const uint8_t*);

template <typename Acc>
void select_block_plain(GroupLists<Acc>& lists, bool half, const Acc* keys, const int32_t* cand, int64_t n,
                        const int64_t* labels, const uint8_t* misclassified) {
  select_lanes<Acc, PlainLanes>(lists, half, keys, cand, n, labels, misclassified);
}

#if CRL_X86_LANES
// flatten: the comparisons (compiled for the instruction set) are inlined into these.
template <typename Acc>
__attribute__((target("avx512f"), flatten)) void select_block_avx512(GroupLists<Acc>& lists, bool half,
                                                                     const Acc* keys, const int32_t* cand, int64_t n,
                                                                     const int64_t* labels,
                                                                     const uint8_t* misclassified) {
  select_lanes<Acc, Avx512Lanes>(lists, half, keys, cand, n, labels, misclassified);
}

template <typename Acc>
__attribute__((target("avx2"), flatten)) void select_block_avx2(GroupLists<Acc>& lists, bool half, const Acc* keys,
                                                                 const int32_t* cand, int64_t n, const int64_t* labels,
                                                                 const uint8_t* misclassified) {
  select_lanes<Acc, Avx2Lanes>(lists, half, keys, cand, n, labels, misclassified);
}
#endif

// The widest implementation this CPU runs, picked once (as the target clones of group_keys are).
template <typename Acc>
SelectBlock<Acc> select_block_for_this_cpu() {
#if CRL_X86_LANES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return &select_block_avx512<Acc>;
  if (__builtin_cpu_supports("avx2")) return &select_block_avx2<Acc>;
#endif
  return &select_block_plain<Acc>;
}

template <typename Acc>
const SelectBlock<Acc> select_block = select_block_for_this_cpu<Acc>();

// What phase one finds per attribute: its anchors among the mined rows, its candidates' labels
// (-1 where not annotated) and whether the model misclassifies them.
struct AttributeCandidates {
  int64_t batch, rows;
  std::vector<int64_t> labels;          // [A, B]
  std::vector<uint8_t> misclassified;   // [A, B], filled for attributes with anchors
  std::vector<int32_t> members;         // [A, rows]: anchor samples, in increasing order
  std::vector<int64_t> member_labels;   // [A, rows]
  std::vector<int64_t> member_count;    // [A]
};

struct Group {
  int64_t attribute, first_member, size;
};

// One thread's scratch for the scan of a group.
template <typename Acc>
struct ScanScratch {
  GroupLists<Acc> lists;
  std::vector<Acc> anchors, keys, converted;
  std::vector<const Acc*> rows;
  std::vector<int32_t> cand;
};

// Mines one group of anchors of attribute j against all candidates; writes their rows of
// partners [R, A, 2K]. Returns whether a mined pair's squared distance overflowed.
template <typename T, typename Acc>
bool mine_group(const T* x, int64_t sb, int64_t sd, int64_t dim, int64_t attributes, int64_t k, int64_t first,
                const AttributeCandidates& candidates, const Group& group, ScanScratch<Acc>& s, int64_t* partners) {
  constexpr int L = kLanes<Acc>;
  const int64_t j = group.attribute, batch = candidates.batch;
  const int size = static_cast<int>(group.size);
  const bool half = size <= L / 2;
  const int lanes = half ? L / 2 : L;
  const int32_t* members = candidates.members.data() + j * candidates.rows + group.first_member;
  const int64_t* member_labels = candidates.member_labels.data() + j * candidates.rows + group.first_member;
  const int64_t* labels = candidates.labels.data() + j * batch;
  const uint8_t* misclassified = candidates.misclassified.data() + j * batch;

  s.lists.reset(k, size, members, member_labels);
  s.anchors.resize(dim * lanes);
  for (int l = 0; l < lanes; ++l) {  // unused lanes repeat the first anchor: scanned, never offered
    const T* row = x + members[l < size ? l : 0] * sb;
    for (int64_t d = 0; d < dim; ++d) s.anchors[d * lanes + l] = static_cast<Acc>(row[d * sd]);
  }
  // The candidates that can be offered to some lane: annotated, and for a group of one class c
  // not a correctly classified sample of c.
  bool one_class = true;
  for (int l = 1; l < size; ++l) one_class &= member_labels[l] == member_labels[0];
  s.cand.clear();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t other = labels[b];
    if (other < 0 || (one_class && other == member_labels[0] && !misclassified[b])) continue;
    s.cand.push_back(static_cast<int32_t>(b));
  }
  const bool in_place = std::is_same<T, Acc>::value && sd == 1;
  s.keys.resize(kBlock * lanes + L);  // + L: a vector comparison may read a whole vector past the last
  s.rows.resize(kBlock);
  if (!in_place) s.converted.resize(kBlock * dim);
  const int64_t count = static_cast<int64_t>(s.cand.size());
  for (int64_t c0 = 0; c0 < count; c0 += kBlock) {
    const int64_t n = std::min(kBlock, count - c0);
    for (int64_t t = 0; t < n; ++t) {
      const T* row = x + s.cand[c0 + t] * sb;
      if (in_place) {
        s.rows[t] = reinterpret_cast<const Acc*>(row);
      } else {
        Acc* copy = s.converted.data() + t * dim;
        for (int64_t d = 0; d < dim; ++d) copy[d] = static_cast<Acc>(row[d * sd]);
        s.rows[t] = copy;
      }
    }
    group_keys(s.anchors.data(), dim, half, s.rows.data(), n, s.keys.data());
    select_block<Acc>(s.lists, half, s.keys.data(), s.cand.data() + c0, n, labels, misclassified);
  }
  bool overflow = false;
  for (int l = 0; l < size; ++l) {
    int64_t* row = partners + ((members[l] - first) * attributes + j) * 2 * k;
    overflow |= write_side<true, Acc>(s.lists.positives(l), s.lists.pos_count[l], k, row);
    overflow |= write_side<false, Acc>(s.lists.negatives(l), s.lists.neg_count[l], k, row + k);
  }
  return overflow;
}

}  // namespace

namespace {

// Class level: for every (attribute j, class c) with wanted[j * Cmax + c], its K hardest positives
// (the lowest p(c) in class c) and negatives (the highest p(c) among the other annotated samples)
// over all rows, best first: list(jc, side) for side = 0 (positives) and 1 (negatives), with the
// side's sample indices, their keys p(c) and their number.
template <typename ListFn>
void select_class_lists(const Tensor& logits, const Tensor& labels, const Tensor& num_classes,
                        const std::vector<uint8_t>& wanted, int64_t k, ListFn list) {
  const int64_t batch = labels.size(0), attributes = labels.size(1), max_classes = wanted.size() / attributes;
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t* classes = num_classes.data_ptr<int64_t>();
  std::vector<uint8_t> mined(attributes, 0);  // whether attribute j has a wanted class
  for (int64_t j = 0; j < attributes; ++j) {
    mined[j] = std::any_of(wanted.begin() + j * max_classes, wanted.begin() + (j + 1) * max_classes,
                           [](uint8_t w) { return w != 0; });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "crl_ops::class_lists", [&] {
    using acc = acc_t<scalar_t>;
    using Selected = selection_key_t<acc>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    // The softmax normaliser of each annotated sample of a mined attribute, once:
    // p_i(c) = exp(z_ic - max) / sum.
    std::vector<Softmax<acc>> softmax(batch * attributes);
    at::parallel_for(0, batch * attributes, grain_for(max_classes), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = r / attributes, j = r % attributes, c_j = std::min(classes[j], max_classes);
        if (!mined[j] || !is_annotated(lab[r], c_j)) continue;
        softmax[r] = Softmax<acc>::of(logits_row(z, logits, i, j, c_j));
      }
    });
    at::parallel_for(0, attributes * max_classes, grain_for(batch), [&](int64_t begin, int64_t end) {
      std::vector<Selected> pos_items(k), neg_items(k);
      std::vector<int32_t> index(k);
      std::vector<acc> key(k);
      for (int64_t jc = begin; jc < end; ++jc) {
        if (!wanted[jc]) continue;
        const int64_t j = jc / max_classes, c = jc % max_classes, c_j = std::min(classes[j], max_classes);
        int64_t n_pos = 0, n_neg = 0;
        for (int64_t i = 0; i < batch; ++i) {
          const int64_t label = lab[i * attributes + j];
          if (!is_annotated(label, c_j)) continue;
          const acc key = softmax[i * attributes + j].probability(logits_row(z, logits, i, j, c_j).template logit<acc>(c));
          // Offered in increasing i: a full list takes only a strictly better key.
          if (label == c) {
            if (n_pos < k || key < selected_key<false, acc>(pos_items[k - 1])) {
              insert_selected(pos_items.data(), n_pos, k, selection_key<false>(key, static_cast<int32_t>(i)));
            }
          } else if (n_neg < k || key > selected_key<true, acc>(neg_items[k - 1])) {
            insert_selected(neg_items.data(), n_neg, k, selection_key<true>(key, static_cast<int32_t>(i)));
          }
        }
        for (int q = 0; q < n_pos; ++q) {
          index[q] = selected_index<acc>(pos_items[q]);
          key[q] = selected_key<false, acc>(pos_items[q]);
        }
        list(jc, 0, index.data(), key.data(), n_pos);
        for (int q = 0; q < n_neg; ++q) {
          index[q] = selected_index<acc>(neg_items[q]);
          key[q] = selected_key<true, acc>(neg_items[q]);
        }
        list(jc, 1, index.data(), key.data(), n_neg);
      }
    });
  });
}

}  // namespace

std::tuple<Tensor, Tensor> class_lists(const Tensor& logits, const Tensor& labels, const Tensor& num_classes,
                                       const Tensor& active, int64_t k) {
  const int64_t attributes = labels.size(1), max_classes = logits.dim() == 3 ? logits.size(2) : 2;
  const auto acc_type = accumulation_type(logits.scalar_type());
  Tensor keys = at::empty({attributes, max_classes, 2 * k}, logits.options().dtype(acc_type));
  Tensor indices = at::full({attributes, max_classes, 2 * k}, kEmpty, labels.options());
  const int64_t* classes = num_classes.data_ptr<int64_t>();
  std::vector<uint8_t> wanted(attributes * max_classes);
  const bool* act = active.defined() ? active.data_ptr<bool>() : nullptr;
  for (int64_t jc = 0; jc < attributes * max_classes; ++jc) {
    wanted[jc] = jc % max_classes < classes[jc / max_classes] && (act == nullptr || act[jc]);
  }
  int64_t* out = indices.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(acc_type, "crl_ops::class_lists", [&] {
    using acc = scalar_t;
    acc* key = keys.data_ptr<acc>();
    for (int64_t m = 0; m < keys.numel(); ++m) key[m] = m % (2 * k) < k ? empty_key<false, acc>() : empty_key<true, acc>();
    select_class_lists(logits, labels, num_classes, wanted, k,
                       [&](int64_t jc, int64_t side, const int32_t* index, const auto* side_keys, int64_t count) {
      for (int64_t q = 0; q < count; ++q) {
        out[(jc * 2 + side) * k + q] = index[q];
        key[(jc * 2 + side) * k + q] = static_cast<acc>(side_keys[q]);
      }
    });
  });
  return {keys, indices};
}

std::tuple<Tensor, Tensor> partner_rows(const Tensor& lists, const Tensor& labels, const Tensor& num_classes,
                                        const Tensor& active, int64_t first, int64_t rows) {
  const int64_t attributes = labels.size(1), max_classes = active.size(1), k = lists.size(2) / 2;
  Tensor anchors = at::empty({rows, attributes}, labels.options().dtype(at::kBool));
  Tensor partners = at::empty({rows, attributes, 2 * k}, labels.options());
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t* classes = num_classes.data_ptr<int64_t>();
  const bool* act = active.data_ptr<bool>();
  const int64_t* list = lists.data_ptr<int64_t>();
  bool* anchor = anchors.data_ptr<bool>();
  int64_t* out = partners.data_ptr<int64_t>();
  at::parallel_for(0, rows * attributes, grain_for(2 * k), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t j = q % attributes;
      anchor[q] = write_partner_row(lab, act, list, attributes, max_classes, classes[j], k, first + q / attributes, j,
                                    rows, out + q * 2 * k);
    }
  });
  return {anchors, partners};
}

Tensor shard_table(const Tensor& vectors, const Tensor& lists, int64_t first) {
  const int64_t attributes = lists.size(0), slots = lists.size(1) * lists.size(2);
  const int64_t rows = vectors.size(0), dim = vectors.size(2);
  const int64_t sb = vectors.stride(0), sa = vectors.size(1) == 1 ? 0 : vectors.stride(1), sd = vectors.stride(2);
  Tensor table = at::empty({slots, attributes, dim}, vectors.options());
  const int64_t* list = lists.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vectors.scalar_type(), "crl_ops::shard_table", [&] {
    const scalar_t* x = vectors.data_ptr<scalar_t>();
    scalar_t* out = table.data_ptr<scalar_t>();
    for (int64_t m = 0; m < slots; ++m) {
      for (int64_t j = 0; j < attributes; ++j) {
        const int64_t source = table_source(list, slots, m, j, first, rows);
        scalar_t* entry = out + (m * attributes + j) * dim;
        for (int64_t d = 0; d < dim; ++d) entry[d] = source < 0 ? scalar_t(0) : x[source * sb + j * sa + d * sd];
      }
    }
  });
  return table;
}

Tensor shard_table_backward(const Tensor& grad_table_in, const Tensor& grad_rows, const Tensor& lists, int64_t first,
                            const Tensor& grad_scale) {
  Tensor grad = grad_rows.clone(at::MemoryFormat::Contiguous);
  const Tensor grad_table = grad_table_in.to(grad.scalar_type()).contiguous();
  const int64_t attributes = lists.size(0), slots = lists.size(1) * lists.size(2);
  const int64_t rows = grad.size(0), per_sample = grad.size(1), dim = grad.size(2);
  const int64_t* list = lists.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "crl_ops::shard_table_backward", [&] {
    scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* from = grad_table.data_ptr<scalar_t>();
    for (int64_t j = 0; j < attributes; ++j) {  // each entry's additions in the order of CUDA's gather
      const int64_t column = per_sample == 1 ? 0 : j;
      for (int64_t m = 0; m < slots; ++m) {
        const int64_t source = table_source(list, slots, m, j, first, rows);
        if (source < 0) continue;
        for (int64_t d = 0; d < dim; ++d) g[(source * per_sample + column) * dim + d] += from[(m * attributes + j) * dim + d];
      }
    }
    const scalar_t scale = static_cast<scalar_t>(grad_scale.item<double>());
    for (int64_t e = 0; e < grad.numel(); ++e) g[e] = g[e] * scale;
  });
  return grad;
}

std::tuple<Tensor, Tensor> mine_class(const Tensor& logits, const Tensor& labels, const Tensor& num_classes,
                                      const Tensor& active, int64_t k, int64_t first, int64_t rows) {
  const int64_t attributes = labels.size(1), max_classes = active.size(1);
  Tensor anchors = at::empty({rows, attributes}, labels.options().dtype(at::kBool));
  Tensor partners = at::empty({rows, attributes, 2 * k}, labels.options());
  // The K hardest positives and negatives of each (attribute, active class), shared by its anchors.
  std::vector<int32_t> hard_pos(attributes * max_classes * k, -1), hard_neg(attributes * max_classes * k, -1);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t* classes = num_classes.data_ptr<int64_t>();
  const bool* act = active.data_ptr<bool>();
  const std::vector<uint8_t> wanted(act, act + attributes * max_classes);
  select_class_lists(logits, labels, num_classes, wanted, k,
                     [&](int64_t jc, int64_t side, const int32_t* index, const auto*, int64_t count) {
    std::copy(index, index + count, (side == 0 ? hard_pos : hard_neg).data() + jc * k);
  });

  bool* anchor = anchors.data_ptr<bool>();
  int64_t* out = partners.data_ptr<int64_t>();
  at::parallel_for(0, rows * attributes, grain_for(2 * k), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = first + row / attributes, j = row % attributes;
      int64_t label;
      anchor[row] = is_anchor(lab, act, attributes, max_classes, classes[j], i, j, label);
      if (!anchor[row]) {
        std::fill(out + row * 2 * k, out + (row + 1) * 2 * k, kEmpty);
        continue;
      }
      const int64_t list = (j * max_classes + label) * k;
      write_class_row(hard_pos.data() + list, hard_neg.data() + list, k, i, out + row * 2 * k);
    }
  });
  return {anchors, partners};
}

// Instance mining reads the features where they are (any strides and floating dtype). Extra
// memory: O(B * A) for the candidates' labels and predictions, and per thread O(K + D) for a
// group's lists and anchors plus a block of converted rows where the features are not read in place.
std::tuple<Tensor, Tensor, bool> mine_instance(const Tensor& features, const Tensor& logits, const Tensor& labels,
                                               const Tensor& num_classes, const Tensor& active, int64_t k,
                                               int64_t first, int64_t rows) {
  const int64_t batch = labels.size(0), attributes = labels.size(1), dim = features.size(2);
  const int64_t max_classes = active.size(1);
  Tensor anchors = at::empty({rows, attributes}, labels.options().dtype(at::kBool));
  Tensor partners = at::empty({rows, attributes, 2 * k}, labels.options());
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t* classes = num_classes.data_ptr<int64_t>();
  const bool* act = active.data_ptr<bool>();
  bool* anchor = anchors.data_ptr<bool>();
  int64_t* out = partners.data_ptr<int64_t>();

  // Phase one, per attribute: anchors (non-anchor rows written here), labels, predictions.
  AttributeCandidates candidates;
  candidates.batch = batch;
  candidates.rows = rows;
  candidates.labels.resize(attributes * batch);
  candidates.misclassified.resize(attributes * batch);
  candidates.members.resize(attributes * rows);
  candidates.member_labels.resize(attributes * rows);
  candidates.member_count.assign(attributes, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "crl_ops::predictions", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    at::parallel_for(0, attributes, grain_for(batch * std::min<int64_t>(max_classes, 64)), [&](int64_t begin,
                                                                                                int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t c_j = std::min(classes[j], max_classes);
        int64_t* column = candidates.labels.data() + j * batch;
        for (int64_t b = 0; b < batch; ++b) {
          const int64_t label = lab[b * attributes + j];
          column[b] = is_annotated(label, c_j) ? label : kEmpty;
        }
        int64_t count = 0;
        for (int64_t r = 0; r < rows; ++r) {
          int64_t label;
          const bool is = is_anchor(lab, act, attributes, max_classes, classes[j], first + r, j, label);
          anchor[r * attributes + j] = is;
          if (is) {
            candidates.members[j * rows + count] = static_cast<int32_t>(first + r);
            candidates.member_labels[j * rows + count] = label;
            ++count;
          } else {
            std::fill(out + (r * attributes + j) * 2 * k, out + (r * attributes + j + 1) * 2 * k, kEmpty);
          }
        }
        candidates.member_count[j] = count;
        if (count == 0) continue;
        uint8_t* wrong = candidates.misclassified.data() + j * batch;
        for (int64_t b = 0; b < batch; ++b) {
          wrong[b] = column[b] >= 0 && predicted_class<acc>(logits_row(z, logits, b, j, c_j)) != column[b];
        }
      }
    });
  });

  std::vector<Group> groups;
  for (int64_t j = 0; j < attributes; ++j) {
    const int64_t lanes = features.scalar_type() == at::kDouble ? kLanes<double> : kLanes<float>;
    for (int64_t m = 0; m < candidates.member_count[j]; m += lanes) {
      groups.push_back({j, m, std::min(lanes, candidates.member_count[j] - m)});
    }
  }

  // Phase two: the groups' scans.
  const int64_t sb = features.stride(0), sa = features.stride(1), sd = features.stride(2);
  std::atomic<bool> overflow{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "crl_ops::mine_instance", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* x = features.data_ptr<scalar_t>();
    const int64_t n_groups = static_cast<int64_t>(groups.size());
    at::parallel_for(0, n_groups, grain_for(batch * dim * kLanes<acc>), [&](int64_t begin, int64_t end) {
      ScanScratch<acc> scratch;
      bool over = false;
      for (int64_t g = begin; g < end; ++g) {
        const Group& group = groups[g];
        over |= mine_group(x + group.attribute * sa, sb, sd, dim, attributes, k, first, candidates, group, scratch,
                           out);
      }
      if (over) overflow = true;
    });
  });
  return {anchors, partners, overflow.load()};
}

}  // namespace cpu
}  // namespace crl
