// CPU: batch profiling (section 1) and the value checks (section 6).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <numeric>
#include <sstream>
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

// Whether every value is finite: x - x is 0 for finite x and NaN otherwise, so the loop has no
// branch and vectorises.
template <typename T>
bool all_finite(const T* x, int64_t n, int64_t stride) {
  using Acc = acc_t<T>;
  Acc probe = Acc(0);
  for (int64_t e = 0; e < n; ++e) {
    const Acc v = static_cast<Acc>(x[e * stride]);
    probe += v - v;
  }
  return probe == Acc(0);
}

bool features_finite(const Tensor& features) {
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "crl_ops::check_features", [&] {
    const scalar_t* x = features.data_ptr<scalar_t>();
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

bool logits_finite(const Tensor& logits, const int64_t* classes) {
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "crl_ops::check_logits", [&] {
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const int64_t batch = logits.size(0), attributes = logits.size(1);
    const bool binary = logits.dim() == 2;
    const int64_t sb = logits.stride(0), sa = logits.stride(1), sc = binary ? 0 : logits.stride(2);
    for (int64_t i = 0; i < batch && finite; ++i) {
      for (int64_t j = 0; j < attributes && finite; ++j) {
        finite = all_finite(z + i * sb + j * sa, binary ? 1 : std::min(classes[j], logits.size(2)), sc);
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

}  // namespace

std::tuple<Tensor, Tensor, Tensor> profile(const Tensor& labels, const Tensor& num_classes, int64_t max_classes,
                                           double threshold, bool validate) {
  const int64_t batch = labels.size(0), attributes = labels.size(1);
  Tensor counts = at::zeros({attributes, max_classes}, labels.options());
  Tensor minority = at::zeros({attributes, max_classes}, labels.options().dtype(at::kBool));
  Tensor active = at::zeros_like(minority);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t* classes = num_classes.data_ptr<int64_t>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  bool* mino = minority.data_ptr<bool>();
  bool* act = active.data_ptr<bool>();
  check_class_counts(classes, attributes, max_classes);
  std::atomic<bool> bad_label{false};

  at::parallel_for(0, attributes, grain_for(batch + max_classes), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order;
    for (int64_t j = begin; j < end; ++j) {
      int64_t* h = cnt + j * max_classes;
      const int64_t c_j = std::min(classes[j], max_classes);
      int64_t valid = 0;
      for (int64_t i = 0; i < batch; ++i) {
        const int64_t label = lab[i * attributes + j];
        if (is_annotated(label, c_j)) {
          ++h[label];
          ++valid;
        } else if (label != -1) {
          bad_label.store(true, std::memory_order_relaxed);
        }
      }
      // Classes in (count, class) order: O(C log C); the minority is the longest prefix whose
      // counts sum to strictly less than threshold * n (the product in double, as everywhere).
      order.resize(c_j);
      std::iota(order.begin(), order.end(), int64_t(0));
      std::stable_sort(order.begin(), order.end(), [h](int64_t a, int64_t b) { return h[a] < h[b]; });
      const double limit = threshold * static_cast<double>(valid);
      int64_t prefix = 0;
      for (int64_t c : order) {
        prefix += h[c];
        if (!(static_cast<double>(prefix) < limit)) break;
        mino[j * max_classes + c] = true;
        act[j * max_classes + c] = h[c] >= 2;
      }
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

}  // namespace cpu
}  // namespace crl
