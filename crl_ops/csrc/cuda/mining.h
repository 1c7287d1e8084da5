// Launchers of batch profiling (profile.cu) and hard mining (mining.cu): plain pointers, sizes and
// the tensor views of cuda/kernels.h, so that the .cu files need no ATen headers; mining_ops.cpp
// allocates and calls them (cuda/stages.h). Every launcher runs on the given stream, writes every
// entry of its outputs and never synchronises with the host.
//
// Layouts: labels [B, A] int64 and num_classes [A] int64 contiguous; active [A, Cmax] bool
// contiguous; logits [B, A, Cmax] (size[2] = 1 and stride[2] = 0 for binary [B, A] logits) and
// features [B, A, D] read in place with any element strides; anchors [R, A] bool and partners
// [R, A, 2K] int64 contiguous, for the anchor rows first..first + R.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/kernels.h"

namespace crl {
namespace cuda {

// counts, minority, active [A, Cmax] (section 1). num_classes outside 2..Cmax is a device-side
// assertion; with validate, so is a label outside -1..C_j-1 (printed with its position).
void launch_profile(const int64_t* labels, const int64_t* num_classes, int64_t batch, int64_t attributes,
                    int64_t max_classes, double threshold, bool validate, int64_t* counts, bool* minority,
                    bool* active, cudaStream_t stream);

struct MiningRows {
  const int64_t* labels;
  const int64_t* num_classes;
  const bool* active;  // null: every class (class_lists)
  int64_t batch, attributes, max_classes, k;
  int64_t first, rows;  // the anchor rows first..first + rows
  bool* anchors;
  int64_t* partners;
};

// Bytes of scratch mine_class needs: the softmax normalisers of every row when Cmax is large
// enough that each class list recomputing them would cost more.
size_t mine_class_workspace(const MiningRows& rows, const Values& logits, bool binary);
// Two launches: rows (anchors, empty partner rows, softmax normalisers) and one block per active
// (attribute, class) list, which also writes the rows of that class's anchors.
void launch_mine_class(const Values& logits, bool binary, const MiningRows& rows, void* workspace,
                       cudaStream_t stream);

// cpu::class_lists: for every (attribute, class c < C_j; only the active ones unless rows.active
// is null) the K hardest positives and negatives among all rows: keys [A, Cmax, 2K] in the
// accumulation type and indices [A, Cmax, 2K] int64. mine_class's launches with rows.rows = 0
// (the rows kernel only for the softmax normalisers), each list block also writing its list;
// workspace: mine_class_workspace.
void launch_class_lists(const Values& logits, bool binary, const MiningRows& rows, void* keys, int64_t* indices,
                        void* workspace, cudaStream_t stream);

// cpu::partner_rows: one thread per (row, attribute) of the anchor rows first..first + rows.
void launch_partner_rows(const int64_t* lists, const MiningRows& rows, cudaStream_t stream);

// Bytes of scratch mine_instance needs: candidate codes [A, B], anchor lists [A, R] and counts
// [A] (int32): 4 (A B + A R + A) bytes.
size_t mine_instance_workspace(const MiningRows& rows);
// Two launches: rows (anchors, empty partner rows, candidate codes, per-attribute anchor lists,
// overflow cleared) and the fused distance + top-K kernel. overflow: 0-dim, set where a mined
// pair's squared distance is infinite.
void launch_mine_instance(const Values& features, const Values& logits, bool binary, const MiningRows& rows,
                          bool* overflow, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace crl
