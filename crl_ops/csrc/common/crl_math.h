// Per-element math of the CRL ops, shared by the CPU and the CUDA kernels (docs/semantics.md).
//
// Everything here is plain arithmetic on scalars and small arrays, marked host+device, so
// both backends round the same way: distances accumulate dimension by dimension in the
// accumulation type (float for half/bfloat16/float, double for double) with no fused
// multiply-add (the CUDA sources build with --fmad=false, the C++ ones with
// -ffp-contract=off), and selections use one total order on (key, sample index).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CRL_HD __host__ __device__ __forceinline__
#else
#define CRL_HD inline
#endif

namespace crl {

// Scratch and index conventions shared with the Python side: partners[B, A, 2K] hold the K
// positives then the K negatives of a row, -1 where empty.
constexpr int64_t kEmpty = -1;

enum class Mode { Class, Instance };
enum class Form { Relative, Absolute, Distribution };
enum class Reduction { Pooled, Attribute };

// pair_counts[A, 4] columns: per attribute the anchors, positive pairs, negative pairs, triplets.
constexpr int kAnchorsColumn = 0, kPositivesColumn = 1, kNegativesColumn = 2, kTripletsColumn = 3;

template <typename T>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Accumulate<T>::type;

// ---- distances --------------------------------------------------------------------------------

// One step of a squared distance: every kernel accumulates sum_d (a_d - b_d)^2 through this,
// in order of d, so all of them round alike.
template <typename Acc>
CRL_HD void accumulate_squared(Acc& sum, Acc a, Acc b) {
  const Acc diff = a - b;
  sum += diff * diff;
}

// sum_d (a[d] - b[d])^2, in order of d; strides in elements.
template <typename Acc, typename T>
CRL_HD Acc squared_distance(const T* a, int64_t stride_a, const T* b, int64_t stride_b, int64_t dim) {
  Acc sum = Acc(0);
  for (int64_t d = 0; d < dim; ++d) {
    accumulate_squared(sum, static_cast<Acc>(a[d * stride_a]), static_cast<Acc>(b[d * stride_b]));
  }
  return sum;
}

// The L2 distance from a squared distance; exactly 0 stays 0 (and takes a zero gradient).
template <typename Acc>
CRL_HD Acc distance_from_squared(Acc squared) {
  return squared > Acc(0) ? std::sqrt(squared) : Acc(0);
}

// d/dx_a of d(a, b) is (x_a - x_b) / d: the factor applied to (x_a - x_b), 0 at d = 0.
template <typename Acc>
CRL_HD Acc distance_gradient_scale(Acc grad_d, Acc d) {
  return d > Acc(0) ? grad_d / d : Acc(0);
}

// ---- labels, logits, anchors -----------------------------------------------------------------------

// Whether label is a class of an attribute with `classes` classes (not -1 and not out of range:
// with validate=False an out-of-range label counts as not annotated).
CRL_HD bool is_annotated(int64_t label, int64_t classes) {
  return label >= 0 && label < classes;
}

// One sample's logits for one attribute: the class logits [0, z] of a binary logit z, or C values
// `stride` elements apart.
template <typename T>
struct LogitsRow {
  const T* values;
  int64_t stride;
  bool binary;
  int64_t classes;

  template <typename Acc>
  CRL_HD Acc logit(int64_t c) const {
    if (binary) return c == 0 ? Acc(0) : static_cast<Acc>(values[0]);
    return static_cast<Acc>(values[c * stride]);
  }
};

// The predicted class: the argmax of the logits, the lowest class on a tie.
template <typename Acc, typename T>
CRL_HD int64_t predicted_class(const LogitsRow<T>& row) {
  int64_t best = 0;
  Acc top = row.template logit<Acc>(0);
  for (int64_t c = 1; c < row.classes; ++c) {
    const Acc z = row.template logit<Acc>(c);
    if (z > top) {
      top = z;
      best = c;
    }
  }
  return best;
}

// exp(x) for x <= 0 from IEEE +, -, *, / and exact scalings only: with the builds' no-FMA flags
// the CPU and the GPU round it bitwise alike (their libm exps do not), so class probabilities,
// and the samples mined from them, agree across devices. Cody-Waite reduction x = n ln2 + r,
// |r| <= ln2 / 2, then a Taylor polynomial (degree 7 for float, 13 for double): within 1.2 ulp of exp.
template <typename Acc>
struct ExpConstants;
template <>
struct ExpConstants<float> {
  static constexpr float log2e = 1.44269504088896341f, ln2_hi = 0.693145751953125f, ln2_lo = 1.42860676533018705e-06f;
  static constexpr float underflow = -104.0f;  // exp below is 0 in float
  static constexpr int degree = 7;
};
template <>
struct ExpConstants<double> {
  static constexpr double log2e = 1.4426950408889634, ln2_hi = 6.93147180369123816490e-01,
                          ln2_lo = 1.90821492927058770002e-10;
  static constexpr double underflow = -746.0;
  static constexpr int degree = 13;
};

template <typename Acc>
CRL_HD Acc exp_nonpositive(Acc x) {
  using C = ExpConstants<Acc>;
  if (!(x >= C::underflow)) return x != x ? x : Acc(0);  // NaN stays NaN; far below 0: 0
#if defined(__CUDA_ARCH__)
  const Acc n = rint(x * C::log2e);
#else
  const Acc n = std::nearbyint(x * C::log2e);
#endif
  const Acc r = (x - n * C::ln2_hi) - n * C::ln2_lo;  // n * ln2_hi is exact: ln2_hi has trailing zeros
  Acc p = Acc(1);
  for (int i = C::degree; i >= 1; --i) p = Acc(1) + p * r / Acc(i);  // Horner form of sum r^i / i!
  return std::ldexp(p, static_cast<int>(n));
}

// Softmax of a row: p(c) = exp(z_c - max) / sum. The sum is defined as 32 lane sums (class c adds
// to lane c mod 32, in class order) then added by a butterfly (offsets 16, 8, 4, 2, 1), so that a
// warp computes it in parallel with bitwise the result of this sequential form.
template <typename Acc>
struct Softmax {
  Acc max, sum;

  static constexpr int kLanes = 32;

  // The butterfly sum of 32 lane values, as __shfl_xor_sync rounds leave it in lane 0. Lanes from
  // `used` (a power of two) on hold +0, and every lane holds +0 or more, or NaN: the rounds with
  // offsets from `used` up add +0 to the lanes below `used`, which leaves them as they are, and
  // lane 0 reads at each round only the lanes below twice its offset. So only the rounds below
  // `used`, and only their lower lanes, run: bitwise the sum of the full butterfly.
  CRL_HD static Acc butterfly(Acc* lanes, int used) {
    for (int offset = used / 2; offset > 0; offset /= 2) {
      for (int l = 0; l < offset; ++l) lanes[l] = lanes[l] + lanes[l + offset];
    }
    return lanes[0];
  }

  template <typename T>
  CRL_HD static Acc row_max(const LogitsRow<T>& row) {
    Acc top = row.template logit<Acc>(0);
    for (int64_t c = 1; c < row.classes; ++c) {
      const Acc z = row.template logit<Acc>(c);
      top = z > top ? z : top;
    }
    return top;
  }

  template <typename T>
  CRL_HD static Softmax of(const LogitsRow<T>& row) {
    const Acc top = row_max(row);
    int used = 1;  // the lanes that take a class, rounded up to a power of two
    while (used < kLanes && used < row.classes) used *= 2;
    Acc lanes[kLanes];
    for (int l = 0; l < used; ++l) lanes[l] = Acc(0);
    for (int64_t c = 0; c < row.classes; ++c) lanes[c % kLanes] += exp_nonpositive(row.template logit<Acc>(c) - top);
    return {top, butterfly(lanes, used)};
  }

  CRL_HD Acc probability(Acc z) const { return exp_nonpositive(z - max) / sum; }
};

// Whether sample i is an anchor of attribute j (its class is an active minority class), and
// that class. labels [B, A] contiguous, active [A, Cmax].
CRL_HD bool is_anchor(const int64_t* labels, const bool* active, int64_t attributes, int64_t max_classes,
                      int64_t classes, int64_t i, int64_t j, int64_t& label) {
  label = labels[i * attributes + j];
  return is_annotated(label, classes < max_classes ? classes : max_classes) && active[j * max_classes + label];
}

// Class-level row of anchor i: its class's K hardest positives (without i itself) and negatives.
CRL_HD void write_class_row(const int32_t* hard_pos, const int32_t* hard_neg, int64_t k, int64_t i, int64_t* row) {
  for (int64_t m = 0; m < k; ++m) {
    row[m] = hard_pos[m] == i ? kEmpty : hard_pos[m];
    row[k + m] = hard_neg[m];
  }
}

// Class mode under crl_ops.distributed (docs/scaling.md): row i's partners as rows of [own `rows`
// rows; table], where slot s of class c's list [A, Cmax, 2K] (its K hardest positives, then
// negatives: rows of the gathered batch) is table row c 2K + s: rows + c 2K + s, or -1 where the
// slot is empty or holds i itself among the positives, and where i is no anchor of attribute j.
// labels [N, A] contiguous (the gathered batch); returns whether i is an anchor.
CRL_HD bool write_partner_row(const int64_t* labels, const bool* active, const int64_t* lists, int64_t attributes,
                              int64_t max_classes, int64_t classes, int64_t k, int64_t i, int64_t j, int64_t rows,
                              int64_t* row) {
  int64_t label;
  const bool anchor = is_anchor(labels, active, attributes, max_classes, classes, i, j, label);
  const int64_t* list = lists + (j * max_classes + (anchor ? label : 0)) * 2 * k;
  for (int64_t s = 0; s < 2 * k; ++s) {
    const int64_t p = anchor ? list[s] : kEmpty;
    row[s] = p < 0 || (s < k && p == i) ? kEmpty : rows + label * 2 * k + s;
  }
  return anchor;
}

// The partner table [Cmax 2K, A, D] of class mode under crl_ops.distributed: entry (m, j), m = c 2K + s,
// holds the vector of row lists[j, c, s] for attribute j (lists [A, Cmax, 2K] contiguous, `slots` =
// Cmax 2K). That row's index among a rank's rows first..first + rows, or -1 where another rank owns
// it or the slot is empty: the rank's share of the table, and of its gradient.
CRL_HD int64_t table_source(const int64_t* lists, int64_t slots, int64_t m, int64_t j, int64_t first, int64_t rows) {
  const int64_t row = lists[j * slots + m] - first;  // an empty slot (-1) lands below 0
  return row >= 0 && row < rows ? row : -1;
}

// ---- selection of the K best candidates ----------------------------------------------------------

// True when candidate (key_a, a) ranks before (key_b, b): larger (or smaller) key first, then
// the lower sample index. Keys of empty slots are +-infinity with index INT32_MAX, so a real
// candidate always ranks before them.
template <bool Largest, typename Key>
CRL_HD bool ranks_before(Key key_a, int32_t a, Key key_b, int32_t b) {
  if (key_a != key_b) return Largest ? key_a > key_b : key_a < key_b;
  return a < b;
}

template <bool Largest, typename Key>
CRL_HD Key empty_key() {
  return Largest ? -INFINITY : INFINITY;
}

constexpr int32_t kEmptyIndex = 2147483647;

// A best-first list of compile-time capacity N kept in registers (all indexing is static once
// the loops unroll). Holds the N best candidates offered so far.
template <bool Largest, typename Key, int N>
struct FixedTopK {
  Key keys[N];
  int32_t index[N];

  CRL_HD void clear() {
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int i = 0; i < N; ++i) {
      keys[i] = empty_key<Largest, Key>();
      index[i] = kEmptyIndex;
    }
  }

  CRL_HD void offer(Key key, int32_t candidate) {
    if (!ranks_before<Largest>(key, candidate, keys[N - 1], index[N - 1])) return;
    keys[N - 1] = key;
    index[N - 1] = candidate;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int i = N - 1; i > 0; --i) {  // one bubble pass restores the order
      if (ranks_before<Largest>(keys[i], index[i], keys[i - 1], index[i - 1])) {
        const Key k = keys[i];
        keys[i] = keys[i - 1];
        keys[i - 1] = k;
        const int32_t j = index[i];
        index[i] = index[i - 1];
        index[i - 1] = j;
      }
    }
  }

  // Drops the head (after it was taken by a merge).
  CRL_HD void pop() {
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int i = 0; i < N - 1; ++i) {
      keys[i] = keys[i + 1];
      index[i] = index[i + 1];
    }
    keys[N - 1] = empty_key<Largest, Key>();
    index[N - 1] = kEmptyIndex;
  }
};

// The same selection with a run-time capacity k, on caller-provided storage of k slots that
// `count` tracks: for any K on the CPU, and for large K on the GPU.
template <bool Largest, typename Key>
CRL_HD void offer_dynamic(Key* keys, int32_t* index, int64_t& count, int64_t k, Key key, int32_t candidate) {
  if (count == k) {
    if (!ranks_before<Largest>(key, candidate, keys[k - 1], index[k - 1])) return;
    --count;
  }
  int64_t pos = count;
  while (pos > 0 && ranks_before<Largest>(key, candidate, keys[pos - 1], index[pos - 1])) {
    keys[pos] = keys[pos - 1];
    index[pos] = index[pos - 1];
    --pos;
  }
  keys[pos] = key;
  index[pos] = candidate;
  ++count;
}

// ---- the three loss forms, one row (sample i, attribute j) at a time ------------------------------
// A row holds 2K distances d[0..2K) to its partners p[0..2K): K positives, then K negatives,
// partner -1 where empty.

template <typename Acc>
CRL_HD Acc hinge(Acc x) {
  return x > Acc(0) ? x : Acc(0);  // zero gradient at the kink, as torch.relu
}

// Relative form (Eq. 9): the row's sum of hinge(margin + d(a,p) - d(a,n)) and its triplet count.
template <typename Acc>
CRL_HD void relative_row(const Acc* d, const int64_t* p, int64_t k, Acc margin, Acc& sum, int64_t& triplets) {
  for (int64_t a = 0; a < k; ++a) {
    if (p[a] < 0) continue;
    for (int64_t b = k; b < 2 * k; ++b) {
      if (p[b] < 0) continue;
      sum += hinge(margin + d[a] - d[b]);
      ++triplets;
    }
  }
}

// d loss / d distances of one row, where loss = scale * (the row's hinge sum). Returns the
// number of hinges past their kink: d loss / d margin is scale times that.
template <typename Acc>
CRL_HD int64_t relative_row_backward(const Acc* d, const int64_t* p, int64_t k, Acc margin, Acc scale, Acc* grad) {
  for (int64_t m = 0; m < 2 * k; ++m) grad[m] = Acc(0);
  int64_t open = 0;
  for (int64_t a = 0; a < k; ++a) {
    if (p[a] < 0) continue;
    for (int64_t b = k; b < 2 * k; ++b) {
      if (p[b] < 0 || !(margin + d[a] - d[b] > Acc(0))) continue;
      grad[a] += scale;
      grad[b] -= scale;
      ++open;
    }
  }
  return open;
}

// Absolute form (Eq. 11): the row's sums of d^2 over positives and hinge(margin - d)^2 over
// negatives, and the pair counts.
template <typename Acc>
CRL_HD void absolute_row(const Acc* d, const int64_t* p, int64_t k, Acc margin, Acc& pos_sum, Acc& neg_sum,
                         int64_t& pos_pairs, int64_t& neg_pairs) {
  for (int64_t m = 0; m < k; ++m) {
    if (p[m] < 0) continue;
    pos_sum += d[m] * d[m];
    ++pos_pairs;
  }
  for (int64_t m = k; m < 2 * k; ++m) {
    if (p[m] < 0) continue;
    const Acc h = hinge(margin - d[m]);
    neg_sum += h * h;
    ++neg_pairs;
  }
}

// Gradient of 0.5 * (pos_sum / n_pos + neg_sum / n_neg), times `grad_loss`, w.r.t. one row.
template <typename Acc>
CRL_HD void absolute_row_backward(const Acc* d, const int64_t* p, int64_t k, Acc margin, Acc pos_scale,
                                  Acc neg_scale, Acc* grad) {
  for (int64_t m = 0; m < k; ++m) grad[m] = p[m] < 0 ? Acc(0) : pos_scale * d[m];
  for (int64_t m = k; m < 2 * k; ++m) grad[m] = p[m] < 0 ? Acc(0) : -neg_scale * hinge(margin - d[m]);
}

// The loss's weights of each attribute's terms (section 3), from pair_counts [A, 4]:
// weights[2 j] = d loss / d (a term of attribute j's first kind), weights[2 j + 1] of its second
// kind. Terms: relative: hinges, -; absolute: positive d^2, negative hinge^2; distribution: the
// attribute's histogram loss, -. Pooled means divide by the count over all attributes; the
// attribute reduction (always, for the distribution form) averages over attributes with terms.
template <typename Acc>
CRL_HD void term_weights(Form form, Reduction reduction, const int64_t* pair_counts, int64_t attributes,
                         Acc* weights) {
  int64_t total_first = 0, total_second = 0, attributes_with_terms = 0;
  for (int64_t j = 0; j < attributes; ++j) {
    const int64_t* c = pair_counts + 4 * j;
    if (form == Form::Relative) {
      total_first += c[kTripletsColumn];
      attributes_with_terms += c[kTripletsColumn] > 0;
    } else if (form == Form::Absolute) {
      total_first += c[kPositivesColumn];
      total_second += c[kNegativesColumn];
      attributes_with_terms += c[kPositivesColumn] > 0 || c[kNegativesColumn] > 0;
    } else {
      attributes_with_terms += c[kPositivesColumn] > 0 && c[kNegativesColumn] > 0;
    }
  }
  const Acc per_attribute = Acc(1) / static_cast<Acc>(attributes_with_terms > 0 ? attributes_with_terms : 1);
  const auto inverse = [](int64_t n) { return Acc(1) / static_cast<Acc>(n > 0 ? n : 1); };
  for (int64_t j = 0; j < attributes; ++j) {
    const int64_t* c = pair_counts + 4 * j;
    Acc first = Acc(0), second = Acc(0);
    if (form == Form::Distribution) {
      first = c[kPositivesColumn] > 0 && c[kNegativesColumn] > 0 ? per_attribute : Acc(0);
    } else if (reduction == Reduction::Attribute) {
      if (form == Form::Relative) {
        first = per_attribute * inverse(c[kTripletsColumn]);
      } else {
        first = Acc(0.5) * per_attribute * inverse(c[kPositivesColumn]);
        second = Acc(0.5) * per_attribute * inverse(c[kNegativesColumn]);
      }
    } else if (form == Form::Relative) {
      first = inverse(total_first);
    } else {
      first = Acc(0.5) * inverse(total_first);
      second = Acc(0.5) * inverse(total_second);
    }
    weights[2 * j] = first;
    weights[2 * j + 1] = second;
  }
}

// Histogram node of a distance (semantics section 3): with u = d * scale, the node is
// t = min(floor(u), bins - 2) and w = u - t is the weight of node t + 1. scale = (bins-1)/R,
// or 0 when R = 0 (every pair on node 0). A NaN u (non-finite inputs with validate=False) takes
// node 0: converting NaN to an integer would be undefined.
template <typename Acc>
CRL_HD void histogram_node(Acc d, Acc scale, int64_t bins, int64_t& node, Acc& weight) {
  const Acc u = d * scale;
  Acc t = std::floor(u);
  if (t > Acc(bins - 2)) t = Acc(bins - 2);
  if (!(t >= Acc(0))) t = Acc(0);
  node = static_cast<int64_t>(t);
  weight = u - t;
}

// The histogram loss of one attribute, sum_t h+_t * sum_{s<=t} h-_s, from normalised histograms.
template <typename Acc>
CRL_HD Acc histogram_overlap(const Acc* h_pos, const Acc* h_neg, int64_t bins) {
  Acc cumulative = Acc(0), total = Acc(0);
  for (int64_t t = 0; t < bins; ++t) {
    cumulative += h_neg[t];
    total += h_pos[t] * cumulative;
  }
  return total;
}

// d overlap / d h: for positive histograms the cumulative sum of h-, for negative histograms
// the reverse cumulative sum of h+. Writes both into g_pos[bins], g_neg[bins].
template <typename Acc>
CRL_HD void histogram_overlap_gradient(const Acc* h_pos, const Acc* h_neg, int64_t bins, Acc* g_pos, Acc* g_neg) {
  Acc forward = Acc(0), backward = Acc(0);
  for (int64_t t = 0; t < bins; ++t) {
    forward += h_neg[t];
    g_pos[t] = forward;
  }
  for (int64_t t = bins - 1; t >= 0; --t) {
    backward += h_pos[t];
    g_neg[t] = backward;
  }
}

// d loss / d d of one pair through its interpolation weight: (g[t+1] - g[t]) * scale.
template <typename Acc>
CRL_HD Acc histogram_pair_gradient(Acc d, Acc scale, int64_t bins, const Acc* g) {
  int64_t node;
  Acc weight;
  histogram_node(d, scale, bins, node, weight);
  return (g[node + 1] - g[node]) * scale;
}

}  // namespace crl
