// The kernels' name (cuda/kernels.h) for a tensor's floating dtype, for the .cpp files that build
// their arguments. Arguments arrive checked: any other dtype is an internal error.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "cuda/kernels.h"

namespace crl {
namespace cuda {

inline Dtype dtype_of(c10::ScalarType type) {
  switch (type) {
    case c10::kHalf:
      return Dtype::Half;
    case c10::kBFloat16:
      return Dtype::BFloat16;
    case c10::kFloat:
      return Dtype::Float;
    case c10::kDouble:
      return Dtype::Double;
    default:
      TORCH_CHECK(false, "crl_ops: internal error: no CUDA kernels for ", type);
  }
}

}  // namespace cuda
}  // namespace crl
