// Launchers of the value checks (values.cu) and of the loss kernels (losses.cu): plain pointers,
// sizes and small structs only, so that the .cu files need no ATen headers; values_ops.cpp and
// losses_ops.cpp allocate, dispatch and call them (cuda/stages.h). Every launcher runs on the
// given stream and never synchronises with the host.
//
// Layouts: partners [B, A, W] int64 contiguous with W = 2K (K positives, then K negatives, -1
// where empty); distances [B, A, W] in the accumulation type Acc, contiguous; features [B, A, D]
// with any element strides.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "common/crl_math.h"
#include "common/shard_loss.h"

// The explicit instantiations of the templated launchers, in the .cu files: M(T, Acc) for every
// feature dtype with its accumulation type, M(Acc) for every accumulation type.
#define CRL_FOR_EACH_FEATURE_TYPE(M) M(float, float) M(double, double) M(c10::Half, float) M(c10::BFloat16, float)
#define CRL_FOR_EACH_ACCUMULATION_TYPE(M) M(float) M(double)

namespace crl {
namespace cuda {

// ---- value checks (values.cu) ---------------------------------------------------------------------------

enum class Dtype : int { Half, BFloat16, Float, Double };

// A tensor of up to three dimensions read in place: sizes and element strides, outermost first.
struct Values {
  const void* data;
  Dtype dtype;
  int64_t size[3];
  int64_t stride[3];
};

// The scratch check_finite needs without validate (with validate it needs none).
constexpr size_t kCheckFiniteWorkspace = 2 * sizeof(unsigned int);

// finite[0] = whether every entry of `features` (when has_features; any strides) and every logit
// read by the kernels is finite: logits [B, A, 1] binary, or [B, A, Cmax] read for c < C_j. With
// validate, a non-finite value is a device-side assertion (and finite[0] = true otherwise). A
// C_j outside 2..Cmax is always an assertion. Where `checks` is given (without validate), it takes
// the flags instead of finite: checks[0] = some logit is not finite, checks[1] = some value is not.
// `workspace`: kCheckFiniteWorkspace bytes.
void check_finite(const Values& features, bool has_features, const Values& logits, bool binary,
                  const int64_t* num_classes, bool validate, bool* finite, bool* checks, void* workspace,
                  cudaStream_t stream);

// A device-side assertion with the overflow message (op_checks.h) where overflow[0] is set.
void check_overflow(const bool* overflow, bool double_accumulation, cudaStream_t stream);

// ---- losses (losses.cu) --------------------------------------------------------------------------------

template <typename T>
struct Features {
  const T* data;
  int64_t dim;                                     // D
  int64_t sample_stride, attribute_stride, dim_stride;  // in elements
};

// How the kernels of this file cut the rows (sample i, attribute j) into work: a unit is a chunk
// of consecutive samples of one attribute; a block walks its unit in tiles of rows_per_tile rows
// (at most kTilePairs pairs, staged in shared memory) and leaves one partial result per unit.
// chunks is bounded, so that the fixed-order sums over a unit's partials stay short.
constexpr int64_t kTilePairs = 2048;        // 2K for K = 1024
constexpr int64_t kTargetTilePairs = 1024;  // about four pairs per thread of a 256-thread block
constexpr int64_t kMaxChunks = 128;

struct RowTiles {
  int64_t batch, attributes, width;
  int64_t rows_per_tile, rows_per_chunk, chunks;

  CRL_HD int64_t units() const { return attributes * chunks; }
};

inline RowTiles row_tiles(int64_t batch, int64_t attributes, int64_t width) {
  const int64_t rows_per_tile = std::max<int64_t>(1, kTargetTilePairs / width);
  const int64_t tiles = std::max<int64_t>(1, (batch + rows_per_tile - 1) / rows_per_tile);
  const int64_t tiles_per_chunk = (tiles + kMaxChunks - 1) / kMaxChunks;
  const int64_t rows_per_chunk = tiles_per_chunk * rows_per_tile;
  const int64_t chunks = std::max<int64_t>(1, (batch + rows_per_chunk - 1) / rows_per_chunk);
  return {batch, attributes, width, rows_per_tile, rows_per_chunk, chunks};
}

// counts [A, 4] (common/crl_math.h columns) of anchors [B, A] bool and partners: one kernel, and
// a cudaMemsetAsync of the workspace where a batch needs more than one block per attribute.
size_t pair_counts_workspace(int64_t batch, int64_t attributes);
void pair_counts(const bool* anchors, const int64_t* partners, int64_t batch, int64_t attributes, int64_t width,
                 int64_t* counts, void* workspace, cudaStream_t stream);

template <typename T, typename Acc>
struct LossArgs {
  Features<T> x;
  const int64_t* partners;
  RowTiles tiles;
  Form form;
  Reduction reduction;
  bool validate;
  const Acc* margins;  // relative: m_j = margins[j * margin_stride]
  int64_t margin_stride;
  Acc apc_margin;
  int64_t bins;
  const int64_t* pair_counts;  // [A, 4]
  const bool* finite;          // 0-dim: false makes the loss NaN
  // outputs
  Acc* distances;   // [B, A, W]
  Acc* sums;        // [A, 2]
  Acc* histograms;  // [A, 2, bins] (distribution)
  Acc* loss;        // 0-dim
};

template <typename Acc>
size_t loss_workspace(Form form, const RowTiles& tiles, int64_t bins);
// The pair distances and the loss of cpu::loss (cpu/losses.cpp), in one kernel (relative,
// absolute) or two (distribution), plus one cudaMemsetAsync of the workspace's counters.
template <typename T, typename Acc>
void loss(const LossArgs<T, Acc>& args, void* workspace, cudaStream_t stream);

template <typename T, typename Acc>
struct BackwardArgs {
  Features<T> x;
  const int64_t* partners;
  const Acc* distances;
  RowTiles tiles;
  Form form;
  Reduction reduction;
  const Acc* grad;  // 0-dim, d total / d loss
  const Acc* loss;  // 0-dim: NaN makes every gradient NaN
  const Acc* margins;
  int64_t margin_stride;
  Acc apc_margin;
  int64_t bins;
  const int64_t* pair_counts;
  const Acc* sums;
  const Acc* histograms;
  Acc* grad_margins;  // [A], or null when not asked
};

template <typename Acc>
size_t backward_workspace(const RowTiles& tiles);
// Default path: grad_features [B, A, D] contiguous in Acc, with float atomics (two kernels).
template <typename T, typename Acc>
void loss_backward_atomic(const BackwardArgs<T, Acc>& args, Acc* grad_features, void* workspace,
                          cudaStream_t stream);
// Deterministic path, first step: scales[B, A, W] = (d loss / d distance) / distance per pair (0
// where empty); grad_margins too.
template <typename T, typename Acc>
void loss_backward_scales(const BackwardArgs<T, Acc>& args, Acc* scales, void* workspace, cudaStream_t stream);
// Second step: every entry of grad_features [B, A, D] (contiguous, the features' dtype) sums its
// own row's pairs, then the pairs ending at it: incoming[offsets[j * B + p] .. offsets[j * B + p + 1])
// are the flat pair indices whose partner is sample p of attribute j, in increasing order.
template <typename T, typename Acc>
void loss_backward_gather(const BackwardArgs<T, Acc>& args, const Acc* scales, const int64_t* incoming,
                          const int64_t* offsets, T* grad_features, cudaStream_t stream);

// ---- crl_ops.distributed's partial vector and finishing step (losses.cu) ---------------------------------
// partial [S + 4A + 3] float64 of a rank (common/shard_loss.h: partial_entry): one kernel.
template <typename Acc>
void partial_vector(const Acc* sums, const int64_t* pair_counts, const bool* overflow, const bool* checks,
                    const PartialLayout& layout, double* partial, cudaStream_t stream);
// cpu::shard_loss and its backward: one block over the attributes of the summed partial vector
// total. Forward: pair_counts [A, 4], loss and grad_scale (0-dim, Acc); with validate, a set flag
// is a device-side assertion (logits, then features, then the overflow). Backward: grad_total
// [S + 4A + 3] float64 from grad (0-dim, Acc).
inline size_t shard_loss_workspace(int64_t attributes, size_t acc_size) {
  return attributes * (4 * sizeof(int64_t) + 4 * acc_size);
}
template <typename Acc>
void shard_loss(const double* total, const PartialLayout& layout, Reduction reduction, int64_t world_size,
                bool validate, int64_t* pair_counts, Acc* loss, Acc* grad_scale, void* workspace, cudaStream_t stream);
template <typename Acc>
void shard_loss_backward(const Acc* grad, const double* total, const PartialLayout& layout, Reduction reduction,
                         double* grad_total, void* workspace, cudaStream_t stream);

// ---- the pair ops (pairs.cu): cpu::pair_distances, pair_sums and their backward -------------------------
// Anchor row r of partners [R, A, W] is sample first + r of vectors [N, Ax, D] (x: any element
// strides), Ax = A or 1 (one vector shared by the attributes).

template <typename T>
struct PairVectors {
  Features<T> x;
  int64_t samples, per_sample;  // N, Ax
};

// distances [R, A, W] (contiguous, Acc) and overflow[0] (a squared distance is infinite).
// A partner outside -1..N-1 is a device-side assertion. One kernel and one cudaMemsetAsync.
template <typename T, typename Acc>
void pair_distances(const PairVectors<T>& v, const int64_t* partners, int64_t rows, int64_t attributes,
                    int64_t width, int64_t first, Acc* distances, bool* overflow, cudaStream_t stream);
// grad_vectors [N, Ax, D] contiguous in Acc, zero-filled by the caller: float atomics.
template <typename T, typename Acc>
void pair_distances_backward(const PairVectors<T>& v, const int64_t* partners, const Acc* distances,
                             const Acc* grad, int64_t rows, int64_t attributes, int64_t width, int64_t first,
                             Acc* grad_vectors, cudaStream_t stream);

// Class mode's partner table [M, A, D] (contiguous) under crl_ops.distributed: entry (m, j) the
// vector of this rank's row table_source(m, j) of v ([R, Ax, D] rows first..), 0 where it has none.
// Backward: grad [R, Ax, D] = (grad_rows + the table's gradient at each row's entries, added in
// attribute then slot order) * scale[0], all contiguous: one thread per entry. One kernel each.
template <typename T>
void shard_table(const PairVectors<T>& v, const int64_t* lists, int64_t slots, int64_t attributes, int64_t first,
                 T* table, cudaStream_t stream);
template <typename T>
void shard_table_backward(const T* grad_table, const T* grad_rows, const int64_t* lists, int64_t slots,
                          int64_t attributes, int64_t rows, int64_t per_sample, int64_t dim, int64_t first,
                          const T* scale, T* grad, cudaStream_t stream);

struct PairRows {
  int64_t rows, attributes, width;
};

// The scratch pair_sums needs: one pair of partial sums per row.
template <typename Acc>
size_t pair_sums_workspace(const PairRows& rows);
// sums [A, 2] (relative, absolute) or [A, 2, bins] (distribution, on the nodes of longest [A]),
// each attribute summed in row order as on the CPU. Two kernels, or one for the distribution form.
template <typename Acc>
void pair_sums(const Acc* distances, const int64_t* partners, const PairRows& rows, const Acc* margins,
               const Acc* longest, Form form, Acc apc_margin, int64_t bins, Acc* sums, void* workspace,
               cudaStream_t stream);
// grad_distances [R, A, W] from grad (pair_sums' shape), and the open hinges of each attribute
// open [A] (relative; zero-filled by the caller), for d / d margins.
template <typename Acc>
void pair_sums_backward(const Acc* grad, const Acc* distances, const int64_t* partners, const PairRows& rows,
                        const Acc* margins, const Acc* longest, Form form, Acc apc_margin, int64_t bins,
                        Acc* grad_distances, unsigned long long* open, cudaStream_t stream);

}  // namespace cuda
}  // namespace crl
