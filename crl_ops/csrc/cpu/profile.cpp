// CPU: batch profiling (section 1) and the value checks (section 6).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "cpu/cpu_kernels.h"

namespace crl {
namespace cpu {

namespace {

[[noreturn]] void raise_label_error(const int64_t* labels, const int64_t* classes, int64_t batch, int64_t attributes) {
  for (int64_t i = 0; i < batch; ++i) {
    for (int64_t j = 0; j < attributes; ++j) {
      const int64_t label = labels[i * attributes + j];
      if (label < -1 || label >= classes[j]) {
        TORCH_CHECK_VALUE(false, "labels[", i, ", ", j, "] = ", label, " is out of range for attribute ", j,
                          ": expected -1 (not annotated) or a class in 0..", classes[j] - 1);
      }
    }
  }
  TORCH_CHECK(false, "crl_ops: internal error: no out-of-range label found");
}

// A value is NaN or infinite exactly when all its exponent bits are set; `Bits` holds its bit
// pattern and `exponent` those bits.
template <typename T>
struct FloatBits;
template <>
struct FloatBits<float> {
  using Bits = uint32_t;
  static constexpr Bits exponent = 0x7f800000u;
};
template <>
struct FloatBits<double> {
  using Bits = uint64_t;
  static constexpr Bits exponent = 0x7ff0000000000000ull;
};
template <>
struct FloatBits<at::Half> {
  using Bits = uint16_t;
  static constexpr Bits exponent = 0x7c00u;
};
template <>
struct FloatBits<at::BFloat16> {
  using Bits = uint16_t;
  static constexpr Bits exponent = 0x7f80u;
};

// Whether every value is finite: integer operations on the bit patterns only, so the loop
// vectorises (a floating-point test would not, without reassociation).
template <typename T>
bool all_finite(const T* x, int64_t n, int64_t stride) {
  using Bits = typename FloatBits<T>::Bits;
  constexpr Bits exponent = FloatBits<T>::exponent;
  Bits infinite_or_nan = 0;
  for (int64_t e = 0; e < n; ++e) {
    Bits bits;
    std::memcpy(&bits, x + e * stride, sizeof(Bits));
    infinite_or_nan |= Bits((bits & exponent) == exponent);
  }
  return infinite_or_nan == 0;
}

// The `count` contiguous values x[0..count), in parallel chunks.
template <typename T>
bool dense_finite(const T* x, int64_t count) {
  constexpr int64_t kChunk = 1 << 14;
  std::atomic<bool> ok{true};
  at::parallel_for(0, (count + kChunk - 1) / kChunk, grain_for(kChunk), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end && ok.load(std::memory_order_relaxed); ++c) {
      if (!all_finite(x + c * kChunk, std::min(kChunk, count - c * kChunk), int64_t(1))) ok = false;
    }
  });
  return ok;
}

bool features_finite(const Tensor& features) {
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "crl_ops::check_features", [&] {
    const scalar_t* x = features.data_ptr<scalar_t>();
    if (features.is_contiguous()) {
      finite = dense_finite(x, features.numel());
      return;
    }
    const int64_t batch = features.size(0), attributes = features.size(1), dim = features.size(2);
    const int64_t sb = features.stride(0), sa = features.stride(1), sd = features.stride(2);
    std::atomic<bool> ok{true};
    at::parallel_for(0, batch * attributes, grain_for(dim), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end && ok.load(std::memory_order_relaxed); ++row) {
        if (!all_finite(x + (row / attributes) * sb + (row % attributes) * sa, dim, sd)) ok = false;
      }
    });
    finite = ok;
  });
  return finite;
}

// The logits of each attribute's C_j classes (binary logits: the one logit).
bool logits_finite(const Tensor& logits, const int64_t* classes) {
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "crl_ops::check_logits", [&] {
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const int64_t batch = logits.size(0), attributes = logits.size(1);
    const bool binary = logits.dim() == 2;
    const int64_t width = binary ? 1 : logits.size(2);
    bool every_class_read = true;
    for (int64_t j = 0; j < attributes && !binary; ++j) every_class_read &= classes[j] >= width;
    if (every_class_read && logits.is_contiguous()) {
      finite = dense_finite(z, logits.numel());
      return;
    }
    const int64_t sb = logits.stride(0), sa = logits.stride(1), sc = binary ? 0 : logits.stride(2);
    for (int64_t i = 0; i < batch && finite; ++i) {
      for (int64_t j = 0; j < attributes && finite; ++j) {
        finite = all_finite(z + i * sb + j * sa, binary ? 1 : std::min(classes[j], width), sc);
      }
    }
  });
  return finite;
}

// A direct op call may pass any num_classes: the kernels index logits and counts with them.
void check_class_counts(const int64_t* classes, int64_t attributes, int64_t max_classes) {
  for (int64_t j = 0; j < attributes; ++j) {
    TORCH_CHECK_VALUE(classes[j] >= 2 && classes[j] <= max_classes, "crl_ops: num_classes[", j, "] = ", classes[j],
                      " must be between 2 and the ", max_classes, " classes of the logits");
  }
}

// One thread's scratch for the minority of an attribute.
struct MinorityScratch {
  std::vector<int64_t> order;          // classes, for the sort
  std::vector<int64_t> classes_with;   // classes_with[v]: the number of classes with count v
};

// Marks the minority of one attribute: the longest prefix of its classes in (count, class) order
// whose counts sum to strictly less than `limit` (the sum in int64, the comparison in double).
// `seen` classes have a non-zero count, at most `largest_count`.
// The prefix is found on the counts alone: either by sorting the classes (C log C), or, when
// cheaper, by counting the classes of each count value below the cut (C + the counts' range).
// Either way every class with a count below the cut's count v is minority, and of the classes
// with count v the first `taken` in class order.
void mark_minority(const int64_t* h, int64_t c_j, int64_t seen, int64_t largest_count, double limit, MinorityScratch& s,
                   bool* minority, bool* active) {
  int64_t cut = 0, taken = 0;  // classes with count < cut, and `taken` of those with count == cut
  const auto within = [limit](int64_t prefix) { return static_cast<double>(prefix) < limit; };
  // A class with a count at or above the limit is never minority: counts up to it suffice.
  const int64_t range = std::min<int64_t>(largest_count, limit > 0 ? static_cast<int64_t>(std::ceil(limit)) : 0) + 1;
  const double sort_cost = static_cast<double>(c_j) * std::log2(static_cast<double>(c_j) + 1.0);
  if (sort_cost <= static_cast<double>(c_j + range)) {
    s.order.resize(c_j);
    std::iota(s.order.begin(), s.order.end(), int64_t(0));
    std::sort(s.order.begin(), s.order.end(), [h](int64_t a, int64_t b) { return h[a] != h[b] ? h[a] < h[b] : a < b; });
    int64_t prefix = 0, n = 0;
    for (; n < c_j; ++n) {
      prefix += h[s.order[n]];
      if (!within(prefix)) break;
    }
    // The first n classes of the order: all those with count < h of the n-th, and some with it.
    if (n == 0) {
      cut = 0;
    } else {
      cut = h[s.order[n - 1]];
      taken = 0;
      for (int64_t q = n - 1; q >= 0 && h[s.order[q]] == cut; --q) ++taken;
    }
  } else {
    s.classes_with.assign(range, 0);
    s.classes_with[0] = c_j - seen;  // most classes of a large C: not counted one by one
    for (int64_t c = 0; c < c_j; ++c) {
      if (h[c] > 0 && h[c] < range) ++s.classes_with[h[c]];
    }
    int64_t prefix = 0;
    bool done = false;
    for (int64_t v = 0; v < range && !done; ++v) {
      const int64_t with_v = s.classes_with[v];
      int64_t m = 0;
      while (m < with_v && within(prefix + v)) {
        prefix += v;
        ++m;
      }
      cut = v;
      taken = m;
      done = m < with_v;
    }
    if (!done) {  // every class with a count below `range` fits; none at or above it does
      cut = range;
      taken = 0;
    }
  }
  for (int64_t c = 0; c < c_j; ++c) {  // branch-free: C may be large
    const bool at_cut = h[c] == cut;
    const bool is_minority = h[c] < cut || (at_cut && taken > 0);
    taken -= at_cut;
    minority[c] = is_minority;
    active[c] = is_minority && h[c] >= 2;
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> profile(const Tensor& labels, const Tensor& num_classes, int64_t max_classes,
                                           double threshold, bool validate) {
  const int64_t batch = labels.size(0), attributes = labels.size(1);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t* classes = num_classes.data_ptr<int64_t>();
  check_class_counts(classes, attributes, max_classes);
  Tensor counts = at::zeros({attributes, max_classes}, labels.options());
  Tensor minority = at::empty({attributes, max_classes}, labels.options().dtype(at::kBool));
  Tensor active = at::empty_like(minority);
  int64_t* cnt = counts.data_ptr<int64_t>();
  bool* mino = minority.data_ptr<bool>();
  bool* act = active.data_ptr<bool>();
  std::atomic<bool> bad_label{false};

  // A task takes a range of attributes and reads the labels row by row, so that each cache line
  // of labels is read once per task rather than once per attribute.
  at::parallel_for(0, attributes, grain_for(batch + max_classes), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> valid(end - begin, 0), seen(end - begin, 0), largest(end - begin, 0);
    bool bad = false;
    for (int64_t i = 0; i < batch; ++i) {
      const int64_t* row = lab + i * attributes;
      for (int64_t j = begin; j < end; ++j) {
        const int64_t label = row[j];
        if (is_annotated(label, std::min(classes[j], max_classes))) {
          int64_t& count = cnt[j * max_classes + label];
          seen[j - begin] += count == 0;
          ++count;
          ++valid[j - begin];
          largest[j - begin] = std::max(largest[j - begin], count);
        } else {
          bad |= label != -1;
        }
      }
    }
    if (bad) bad_label.store(true, std::memory_order_relaxed);
    MinorityScratch scratch;
    for (int64_t j = begin; j < end; ++j) {
      const int64_t c_j = std::min(classes[j], max_classes);
      const double limit = threshold * static_cast<double>(valid[j - begin]);  // the product in double, as everywhere
      mark_minority(cnt + j * max_classes, c_j, seen[j - begin], largest[j - begin], limit, scratch, mino + j * max_classes,
                    act + j * max_classes);
      std::fill(mino + j * max_classes + c_j, mino + (j + 1) * max_classes, false);
      std::fill(act + j * max_classes + c_j, act + (j + 1) * max_classes, false);
    }
  });
  if (validate && bad_label) raise_label_error(lab, classes, batch, attributes);
  return {counts, minority, active};
}

bool check_finite(const Tensor& features, const Tensor& logits, const Tensor& num_classes, bool validate) {
  check_class_counts(num_classes.data_ptr<int64_t>(), logits.size(1), max_classes_of(logits));
  // Logits first: with distance="score" the features are computed from them.
  const bool logits_ok = logits_finite(logits, num_classes.data_ptr<int64_t>());
  TORCH_CHECK_VALUE(logits_ok || !validate, "logits contain NaN or inf; CRL needs finite logits");
  const bool features_ok = !features.defined() || features_finite(features);
  TORCH_CHECK_VALUE(features_ok || !validate, "features contain NaN or inf; CRL needs finite features");
  return features_ok && logits_ok;
}

Tensor nonfinite_checks(const Tensor& features, const Tensor& logits, const Tensor& num_classes) {
  check_class_counts(num_classes.data_ptr<int64_t>(), logits.size(1), max_classes_of(logits));
  const bool logits_bad = !logits_finite(logits, num_classes.data_ptr<int64_t>());
  Tensor checks = at::empty({2}, logits.options().dtype(at::kBool));
  checks.data_ptr<bool>()[0] = logits_bad;
  checks.data_ptr<bool>()[1] = logits_bad || (features.defined() && !features_finite(features));
  return checks;
}

}  // namespace cpu
}  // namespace crl
