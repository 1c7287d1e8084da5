// Class mode under crl_ops.distributed exchanges only the partners' rows (docs/scaling.md): every
// anchor of class c of attribute j takes its partners from the class lists [A, Cmax, 2K] (rows of
// the gathered batch), so a table [Cmax 2K, A, D] of the listed rows' vectors, table[c 2K + s, j] =
// the vector of row lists[j, c, s] for attribute j, holds every partner. Each rank fills the entries
// of its own rows and one all-reduce (sum) completes it. The distances of a rank's anchors to their
// partners are those of pair_distances on [own rows; table]: the same per-element code as one
// process. Written with ATen operations, for every device; the partners' rows in [own rows; table]
// are a device stage (write_partner_row, common/crl_math.h).
#pragma once

#include <ATen/ATen.h>

namespace crl {
namespace partner_rows {

using at::Tensor;

// [A] 0..A-1 on `like`'s device.
inline Tensor attribute_index(int64_t attributes, const Tensor& like) {
  return at::arange(attributes, like.options().dtype(at::kLong));
}

// [own rows (per attribute); table]: the vectors pair_distances reads.
inline Tensor joined_vectors(const Tensor& vectors, const Tensor& table) {
  return at::cat({vectors.expand({vectors.size(0), table.size(1), vectors.size(2)}), table});
}

// Where each table entry [Cmax 2K, A] stands among this rank's rows [R, Ax, D] (rows first..):
// (row, column: its attribute, or 0 for vectors shared by the attributes, whether this rank owns it).
struct OwnedEntries {
  Tensor row, column, owned;
};

inline OwnedEntries owned_entries(const Tensor& lists, int64_t first, const Tensor& rows) {
  const Tensor local = lists.permute({1, 2, 0}).reshape({-1, lists.size(0)}) - first;
  const Tensor owned = local.ge(0).logical_and(local.lt(rows.size(0)));
  const Tensor column = rows.size(1) == 1 ? at::zeros_like(local)
                                          : attribute_index(lists.size(0), local).expand_as(local);
  return {at::where(owned, local, 0), column, owned};
}

// The table [Cmax 2K, A, D] with the vectors [R, Ax, D] of this rank's rows first..first + R, 0 elsewhere.
inline Tensor fill_table(const Tensor& vectors, const Tensor& lists, int64_t first) {
  const OwnedEntries entries = owned_entries(lists, first, vectors);
  Tensor table = at::zeros({entries.row.size(0), lists.size(0), vectors.size(2)}, vectors.options());
  if (vectors.size(0) == 0) return table;
  return at::where(entries.owned.unsqueeze(2), vectors.index({entries.row, entries.column}), table).contiguous();
}

// The gradient of this rank's rows [R, Ax, D]: grad_rows plus the table's gradient at the entries
// they own, times grad_scale (0-dim).
inline Tensor fill_table_backward(const Tensor& grad_table, const Tensor& grad_rows, const Tensor& lists,
                                  int64_t first, const Tensor& grad_scale) {
  const OwnedEntries entries = owned_entries(lists, first, grad_rows);
  Tensor grad = grad_rows.clone(at::MemoryFormat::Contiguous);
  grad.index_put_({entries.row.masked_select(entries.owned), entries.column.masked_select(entries.owned)},
                  grad_table.index({entries.owned}).to(grad.scalar_type()), /*accumulate=*/true);
  return grad.mul_(grad_scale);
}

}  // namespace partner_rows
}  // namespace crl
