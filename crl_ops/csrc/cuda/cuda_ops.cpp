// The CUDA kernels' registration: the device struct of cuda/cuda_device.h for the CUDA key.
#include <torch/library.h>

#include "common/entry_points.h"
#include "cuda/cuda_device.h"

TORCH_LIBRARY_IMPL(crl_ops, CUDA, m) {
  crl::register_entry_points<crl::Cuda>(m);
}
