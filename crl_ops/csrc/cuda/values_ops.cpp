// CUDA value checks at the level of tensors (cuda/stages.h): the views of the features and the
// logits that values.cu reads in place, and its flag.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "cuda/kernels.h"
#include "cuda/dtype_of.h"
#include "cuda/stages.h"

namespace crl {
namespace cuda {

namespace {

// The distinct entries of features [B, A, D] as at most three (size, stride) dimensions: a
// broadcast dimension (stride 0: [B, D] features shared by the attributes) or one of size 1 is
// dropped, and neighbours that are laid out as one are merged, so that the kernel divides less.
Values distinct_entries(const Tensor& features) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // outermost first
  for (int64_t d = 0; d < features.dim(); ++d) {
    if (features.size(d) == 0) return {features.data_ptr(), dtype_of(features.scalar_type()), {1, 1, 0}, {0, 0, 1}};
    if (features.size(d) == 1 || features.stride(d) == 0) continue;
    if (!dims.empty() && dims.back().second == features.stride(d) * features.size(d)) {
      dims.back() = {dims.back().first * features.size(d), features.stride(d)};
    } else {
      dims.emplace_back(features.size(d), features.stride(d));
    }
  }
  Values values{features.data_ptr(), dtype_of(features.scalar_type()), {1, 1, 1}, {0, 0, 0}};
  const int64_t skip = 3 - static_cast<int64_t>(dims.size());
  for (size_t d = 0; d < dims.size(); ++d) {
    values.size[skip + d] = dims[d].first;
    values.stride[skip + d] = dims[d].second;
  }
  return values;
}

// logits [B, A] as [B, A, 1], or [B, A, Cmax], with their strides: the kernel needs (i, j, c).
Values logits_view(const Tensor& logits) {
  const bool binary = logits.dim() == 2;
  return {logits.data_ptr(),
          dtype_of(logits.scalar_type()),
          {logits.size(0), logits.size(1), binary ? 1 : logits.size(2)},
          {logits.stride(0), logits.stride(1), binary ? 0 : logits.stride(2)}};
}


// The value check into `finite` (0-dim) or `checks` ([2]).
void launch_check_finite(const Tensor& features, const Tensor& logits, const Tensor& num_classes, bool validate,
                         bool* finite, bool* checks) {
  // The flags' reduction needs a cleared counter; with validate a failure stops the kernel instead.
  Tensor workspace = validate ? Tensor() : at::empty({int64_t(kCheckFiniteWorkspace)}, logits.options().dtype(at::kByte));
  const bool has_features = features.defined();
  const Values feature_values = has_features ? distinct_entries(features) : Values{};
  cuda::check_finite(feature_values, has_features, logits_view(logits), logits.dim() == 2,
                     num_classes.data_ptr<int64_t>(), validate, finite, checks,
                     validate ? nullptr : workspace.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace

Tensor check_finite(const Tensor& features, const Tensor& logits, const Tensor& num_classes, bool validate) {
  Tensor finite = at::empty({}, logits.options().dtype(at::kBool));
  launch_check_finite(features, logits, num_classes, validate, finite.data_ptr<bool>(), nullptr);
  return finite;
}

Tensor nonfinite_checks(const Tensor& features, const Tensor& logits, const Tensor& num_classes) {
  Tensor checks = at::empty({2}, logits.options().dtype(at::kBool));
  launch_check_finite(features, logits, num_classes, false, nullptr, checks.data_ptr<bool>());
  return checks;
}

void check_overflow(const Tensor& overflow, at::ScalarType accumulation) {
  cuda::check_overflow(overflow.data_ptr<bool>(), accumulation == at::kDouble, c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace cuda
}  // namespace crl
