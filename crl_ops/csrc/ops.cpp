// The crl_ops library: its operator schemas (common/op_schemas.h).
#include <torch/library.h>

#include "common/op_schemas.h"

TORCH_LIBRARY(crl_ops, m) {
  crl::define_op_schemas(m);
}
