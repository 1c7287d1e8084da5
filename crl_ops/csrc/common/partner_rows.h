// Class mode under crl_ops.distributed exchanges only the partners' rows (docs/scaling.md): every
// anchor of class c of attribute j takes its partners from the class lists [A, Cmax, 2K] (rows of
// the gathered batch), so a table [Cmax 2K, A, D] of the listed rows' vectors, table[c 2K + s, j] =
// the vector of row lists[j, c, s] for attribute j, holds every partner. Each rank fills the entries
// of its own rows (a device stage over table_source, common/crl_math.h) and one all-reduce (sum)
// completes it. The distances of a rank's anchors to their partners are those of pair_distances on
// [own rows; table]: the same per-element code as one process.
#pragma once

#include <ATen/ATen.h>

namespace crl {
namespace partner_rows {

// [own rows (per attribute); table]: the vectors pair_distances reads.
inline at::Tensor joined_vectors(const at::Tensor& vectors, const at::Tensor& table) {
  return at::cat({vectors.expand({vectors.size(0), table.size(1), vectors.size(2)}), table});
}

}  // namespace partner_rows
}  // namespace crl
