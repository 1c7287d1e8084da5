// Launchers of the CUDA kernels (crl_kernels.cu). Plain pointers and sizes only, so that the
// .cu file needs no ATen headers; crl_cuda.cpp checks arguments, allocates and dispatches.
// Layouts: labels/predictions [B, A] int64 row-major; partners and distances [B, A, W] with
// W = 2K; features [B, A, D] with the given element strides; columns [A, D, B].
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace crl {
namespace cuda {

struct Strides {
  int64_t sample, attribute, dim;
};

void profile(const int64_t* labels, int64_t batch, int64_t attributes, int64_t max_classes, int64_t* counts,
             bool* minority, bool* active, cudaStream_t stream);

// Hardest K of each (attribute, class) into hard_pos/hard_neg [A, Cmax, K] (int32, -1 empty),
// then every anchor's row. key_scratch holds 2 * A * Cmax * K scores (used when K > 32).
template <typename Score>
void mine_class(const Score* scores, const int64_t* labels, const bool* active, int64_t batch, int64_t attributes,
                int64_t max_classes, int64_t k, int32_t* hard_pos, int32_t* hard_neg, Score* key_scratch,
                bool* anchors, int64_t* partners, cudaStream_t stream);

// Fused distances + top-K. anchor_list [A, B] and anchor_count [A] are scratch; key_scratch and
// index_scratch hold 2 * B * A * K entries (used when K > 32).
template <typename Acc>
void mine_instance(const Acc* columns, const int64_t* predictions, const int64_t* labels, const bool* active,
                   int64_t batch, int64_t attributes, int64_t dim, int64_t max_classes, int64_t k,
                   int32_t* anchor_list, int32_t* anchor_count, Acc* key_scratch, int32_t* index_scratch,
                   bool* anchors, int64_t* partners, cudaStream_t stream);

template <typename T, typename Acc>
void pair_distances(const T* features, Strides strides, const int64_t* partners, int64_t batch, int64_t attributes,
                    int64_t dim, int64_t width, Acc* distances, cudaStream_t stream);

// grad_features [B, A, D] contiguous, zero on entry; float atomics.
template <typename T, typename Acc>
void pair_distances_backward_atomic(const Acc* grad, const T* features, Strides strides, const int64_t* partners,
                                    const Acc* distances, int64_t batch, int64_t attributes, int64_t dim,
                                    int64_t width, Acc* grad_features, cudaStream_t stream);

// Deterministic: incoming[offsets[j*B+p] .. offsets[j*B+p+1]) lists, in increasing order, the
// flat pair indices whose partner is sample p of attribute j.
template <typename T, typename Acc>
void pair_distances_backward_sorted(const Acc* grad, const T* features, Strides strides, const int64_t* partners,
                                    const Acc* distances, const int64_t* incoming, const int64_t* offsets,
                                    int64_t batch, int64_t attributes, int64_t dim, int64_t width, Acc* grad_features,
                                    cudaStream_t stream);

template <typename Acc>
void relative_loss(const Acc* distances, const int64_t* partners, const Acc* margins, int64_t rows,
                   int64_t attributes, int64_t width, Acc* loss, int64_t* num_triplets, cudaStream_t stream);

template <typename Acc>
void relative_loss_backward(const Acc* grad, const Acc* distances, const int64_t* partners, const Acc* margins,
                            const int64_t* num_triplets, int64_t rows, int64_t attributes, int64_t width,
                            Acc* grad_distances, cudaStream_t stream);

template <typename Acc>
void absolute_loss(const Acc* distances, const int64_t* partners, Acc margin, int64_t rows, int64_t width, Acc* loss,
                   int64_t* num_pairs, cudaStream_t stream);

template <typename Acc>
void absolute_loss_backward(const Acc* grad, const Acc* distances, const int64_t* partners, Acc margin,
                            const int64_t* num_pairs, int64_t rows, int64_t width, Acc* grad_distances,
                            cudaStream_t stream);

// histograms [A, 2, bins] zero on entry; per_attribute [A] scratch.
template <typename Acc>
void distribution_loss(const Acc* distances, const int64_t* partners, int64_t batch, int64_t attributes,
                       int64_t width, int64_t bins, Acc* loss, Acc* histograms, Acc* scale, int64_t* pair_counts,
                       Acc* per_attribute, cudaStream_t stream);

// gradients [A, 2, bins] scratch; grad_distances zero on entry.
template <typename Acc>
void distribution_loss_backward(const Acc* grad, const Acc* distances, const int64_t* partners, int64_t batch,
                                int64_t attributes, int64_t width, int64_t bins, const Acc* histograms,
                                const Acc* scale, const int64_t* pair_counts, Acc* gradients, Acc* grad_distances,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace crl
