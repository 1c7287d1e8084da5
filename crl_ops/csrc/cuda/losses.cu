// CUDA kernels of the loss forms on the mined pairs and their backward (section 3). TO BE PORTED.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "common/crl_math.h"
#include "cuda/cuda_common.cuh"

namespace crl {
namespace cuda {
namespace {

// ---- 3. pair distances ---------------------------------------------------------------------------------

template <typename T, typename Acc>
__global__ void pair_distances_kernel(const T* x, Strides s, const int64_t* partners, int64_t batch,
                                      int64_t attributes, int64_t dim, int64_t width, Acc* out) {
  CRL_GRID_STRIDE(e, batch * attributes * width) {
    const int64_t row = e / width, i = row / attributes, j = row % attributes;
    const int64_t p = partners[e];
    if (p < 0 || p >= batch) {  // the CPU kernel rejects p >= B; here it counts as empty
      out[e] = Acc(0);
      continue;
    }
    out[e] = distance_from_squared(
        squared_distance<Acc>(x + i * s.sample + j * s.attribute, s.dim, x + p * s.sample + j * s.attribute, s.dim, dim));
  }
}

template <typename T, typename Acc>
__device__ __forceinline__ Acc feature(const T* x, Strides s, int64_t i, int64_t j, int64_t d) {
  return static_cast<Acc>(x[i * s.sample + j * s.attribute + d * s.dim]);
}

template <typename T, typename Acc>
__global__ void pair_distances_backward_atomic_kernel(const Acc* grad, const T* x, Strides s,
                                                      const int64_t* partners, const Acc* distances, int64_t batch,
                                                      int64_t attributes, int64_t dim, int64_t width, Acc* gx) {
  CRL_GRID_STRIDE(e, batch * attributes * dim) {
    const int64_t row = e / dim, d = e % dim, i = row / attributes, j = row % attributes;
    const Acc xi = feature<T, Acc>(x, s, i, j, d);
    Acc own = Acc(0);
    for (int64_t m = 0; m < width; ++m) {
      const int64_t pe = row * width + m, p = partners[pe];
      if (p < 0 || p >= batch) continue;
      const Acc scale = distance_gradient_scale(grad[pe], distances[pe]);
      if (scale == Acc(0)) continue;
      const Acc diff = xi - feature<T, Acc>(x, s, p, j, d);
      own += scale * diff;
      atomicAdd(gx + (p * attributes + j) * dim + d, -scale * diff);
    }
    atomicAdd(gx + e, own);
  }
}

template <typename T, typename Acc>
__global__ void pair_distances_backward_sorted_kernel(const Acc* grad, const T* x, Strides s,
                                                      const int64_t* partners, const Acc* distances,
                                                      const int64_t* incoming, const int64_t* offsets, int64_t batch,
                                                      int64_t attributes, int64_t dim, int64_t width, Acc* gx) {
  CRL_GRID_STRIDE(e, batch * attributes * dim) {
    const int64_t row = e / dim, d = e % dim, p = row / attributes, j = row % attributes;
    const Acc xp = feature<T, Acc>(x, s, p, j, d);
    Acc total = Acc(0);
    for (int64_t m = 0; m < width; ++m) {  // the row's own pairs
      const int64_t pe = row * width + m, q = partners[pe];
      if (q < 0 || q >= batch) continue;
      total += distance_gradient_scale(grad[pe], distances[pe]) * (xp - feature<T, Acc>(x, s, q, j, d));
    }
    for (int64_t t = offsets[j * batch + p]; t < offsets[j * batch + p + 1]; ++t) {  // pairs ending here
      const int64_t pe = incoming[t], i = pe / width / attributes;
      total -= distance_gradient_scale(grad[pe], distances[pe]) * (feature<T, Acc>(x, s, i, j, d) - xp);
    }
    gx[e] = total;
  }
}

// ---- 4. the loss forms -------------------------------------------------------------------------------------

constexpr int kReduceThreads = 1024;  // one block: a fixed reduction order

template <typename Acc>
__global__ void relative_loss_kernel(const Acc* distances, const int64_t* partners, const Acc* margins, int64_t rows,
                                     int64_t attributes, int64_t width, Acc* loss, int64_t* num_triplets) {
  Acc sum = Acc(0);
  int64_t triplets = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    relative_row(distances + r * width, partners + r * width, width / 2, margins[r % attributes], sum, triplets);
  }
  sum = block_reduce(sum, Sum());
  triplets = block_reduce(triplets, Sum());
  if (threadIdx.x == 0) {
    *loss = sum / static_cast<Acc>(triplets > 0 ? triplets : 1);
    *num_triplets = triplets;
  }
}

template <typename Acc>
__global__ void relative_loss_backward_kernel(const Acc* grad, const Acc* distances, const int64_t* partners,
                                              const Acc* margins, const int64_t* num_triplets, int64_t rows,
                                              int64_t attributes, int64_t width, Acc* out) {
  const Acc scale = *grad / static_cast<Acc>(*num_triplets > 0 ? *num_triplets : 1);
  CRL_GRID_STRIDE(r, rows) {
    relative_row_backward(distances + r * width, partners + r * width, width / 2, margins[r % attributes], scale,
                          out + r * width);
  }
}

template <typename Acc>
__global__ void absolute_loss_kernel(const Acc* distances, const int64_t* partners, Acc margin, int64_t rows,
                                     int64_t width, Acc* loss, int64_t* num_pairs) {
  Acc pos = Acc(0), neg = Acc(0);
  int64_t n_pos = 0, n_neg = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    absolute_row(distances + r * width, partners + r * width, width / 2, margin, pos, neg, n_pos, n_neg);
  }
  pos = block_reduce(pos, Sum());
  neg = block_reduce(neg, Sum());
  n_pos = block_reduce(n_pos, Sum());
  n_neg = block_reduce(n_neg, Sum());
  if (threadIdx.x == 0) {
    *loss = Acc(0.5) * (pos / static_cast<Acc>(n_pos > 0 ? n_pos : 1) + neg / static_cast<Acc>(n_neg > 0 ? n_neg : 1));
    num_pairs[0] = n_pos;
    num_pairs[1] = n_neg;
  }
}

template <typename Acc>
__global__ void absolute_loss_backward_kernel(const Acc* grad, const Acc* distances, const int64_t* partners,
                                              Acc margin, const int64_t* num_pairs, int64_t rows, int64_t width,
                                              Acc* out) {
  const Acc pos_scale = *grad / static_cast<Acc>(num_pairs[0] > 0 ? num_pairs[0] : 1);
  const Acc neg_scale = *grad / static_cast<Acc>(num_pairs[1] > 0 ? num_pairs[1] : 1);
  CRL_GRID_STRIDE(r, rows) {
    absolute_row_backward(distances + r * width, partners + r * width, width / 2, margin, pos_scale, neg_scale,
                          out + r * width);
  }
}

// One block per attribute: range, pair counts, then the two histograms. Each thread owns
// histogram entries and adds the staged pairs in pair order, so no atomics are needed.
template <typename Acc>
__global__ void histogram_kernel(const Acc* distances, const int64_t* partners, int64_t batch, int64_t attributes,
                                 int64_t width, int64_t bins, Acc* histograms, Acc* scale, int64_t* pair_counts,
                                 Acc* per_attribute) {
  const int64_t j = blockIdx.x, k = width / 2, pairs = batch * width;
  Acc* h = histograms + j * 2 * bins;  // [positive bins | negative bins]
  // Each thread owns the entries entry = threadIdx.x + n * blockDim.x in every loop over h below.
  for (int64_t entry = threadIdx.x; entry < 2 * bins; entry += blockDim.x) h[entry] = Acc(0);
  Acc longest = Acc(0);
  int64_t n_pos = 0, n_neg = 0;
  for (int64_t e = threadIdx.x; e < pairs; e += blockDim.x) {
    const int64_t at = ((e / width) * attributes + j) * width + e % width;
    if (partners[at] < 0) continue;
    longest = max(longest, distances[at]);
    (e % width < k ? n_pos : n_neg) += 1;
  }
  longest = block_reduce(longest, Max());
  n_pos = block_reduce(n_pos, Sum());
  n_neg = block_reduce(n_neg, Sum());
  __shared__ Acc attribute_scale;
  __shared__ int64_t counts[2];
  if (threadIdx.x == 0) {
    attribute_scale = longest > Acc(0) ? static_cast<Acc>(bins - 1) / longest : Acc(0);
    scale[j] = attribute_scale;
    counts[0] = pair_counts[2 * j] = n_pos;
    counts[1] = pair_counts[2 * j + 1] = n_neg;
  }
  __shared__ int32_t stage_node[kThreads];
  __shared__ Acc stage_weight[kThreads];
  __shared__ int8_t stage_kind[kThreads];  // 0 positive, 1 negative, -1 no pair
  for (int64_t base = 0; base < pairs; base += blockDim.x) {
    __syncthreads();
    const int64_t e = base + threadIdx.x;
    stage_kind[threadIdx.x] = -1;
    if (e < pairs) {
      const int64_t at = ((e / width) * attributes + j) * width + e % width;
      if (partners[at] >= 0) {
        int64_t node;
        Acc weight;
        histogram_node(distances[at], attribute_scale, bins, node, weight);
        stage_node[threadIdx.x] = static_cast<int32_t>(node);
        stage_weight[threadIdx.x] = weight;
        stage_kind[threadIdx.x] = e % width < k ? 0 : 1;
      }
    }
    __syncthreads();
    const int staged = static_cast<int>(min(int64_t(blockDim.x), pairs - base));
    for (int64_t entry = threadIdx.x; entry < 2 * bins; entry += blockDim.x) {
      const int kind = static_cast<int>(entry / bins);
      const int32_t node = static_cast<int32_t>(entry % bins);
      Acc added = Acc(0);
      for (int q = 0; q < staged; ++q) {
        if (stage_kind[q] != kind) continue;
        if (stage_node[q] == node) added += Acc(1) - stage_weight[q];
        if (stage_node[q] + 1 == node) added += stage_weight[q];
      }
      h[entry] += added;
    }
  }
  __syncthreads();
  for (int64_t entry = threadIdx.x; entry < 2 * bins; entry += blockDim.x) {
    const int64_t n = counts[entry / bins];
    h[entry] /= static_cast<Acc>(n > 0 ? n : 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) per_attribute[j] = histogram_overlap(h, h + bins, bins);
}

template <typename Acc>
__global__ void histogram_mean_kernel(const Acc* per_attribute, const int64_t* pair_counts, int64_t attributes,
                                      Acc* loss) {
  Acc total = Acc(0);
  int64_t counted = 0;
  for (int64_t j = 0; j < attributes; ++j) {
    if (pair_counts[2 * j] > 0 && pair_counts[2 * j + 1] > 0) {
      total += per_attribute[j];
      ++counted;
    }
  }
  *loss = total / static_cast<Acc>(counted > 0 ? counted : 1);
}

template <typename Acc>
__global__ void histogram_backward_kernel(const Acc* grad, const Acc* distances, const int64_t* partners,
                                          int64_t batch, int64_t attributes, int64_t width, int64_t bins,
                                          const Acc* histograms, const Acc* scale, const int64_t* pair_counts,
                                          Acc* gradients, Acc* out) {
  const int64_t j = blockIdx.x, k = width / 2;
  if (pair_counts[2 * j] == 0 || pair_counts[2 * j + 1] == 0) {  // an attribute outside the mean
    for (int64_t e = threadIdx.x; e < batch * width; e += blockDim.x) {
      out[((e / width) * attributes + j) * width + e % width] = Acc(0);
    }
    return;
  }
  __shared__ int64_t counted;
  Acc* g = gradients + j * 2 * bins;  // [d/dh+ | d/dh-]
  if (threadIdx.x == 0) {
    counted = 0;
    for (int64_t a = 0; a < attributes; ++a) counted += pair_counts[2 * a] > 0 && pair_counts[2 * a + 1] > 0;
    histogram_overlap_gradient(histograms + j * 2 * bins, histograms + j * 2 * bins + bins, bins, g, g + bins);
  }
  __syncthreads();
  const Acc base = *grad / static_cast<Acc>(counted);
  const Acc factor[2] = {base / static_cast<Acc>(pair_counts[2 * j]), base / static_cast<Acc>(pair_counts[2 * j + 1])};
  for (int64_t e = threadIdx.x; e < batch * width; e += blockDim.x) {
    const int64_t m = e % width, at = ((e / width) * attributes + j) * width + m;
    if (partners[at] < 0) {
      out[at] = Acc(0);
      continue;
    }
    const int kind = m < k ? 0 : 1;
    out[at] = factor[kind] * histogram_pair_gradient(distances[at], scale[j], bins, g + kind * bins);
  }
}

}  // namespace

}  // namespace

template <typename T, typename Acc>
void pair_distances(const T* features, Strides strides, const int64_t* partners, int64_t batch, int64_t attributes,
                    int64_t dim, int64_t width, Acc* distances, cudaStream_t stream) {
  pair_distances_kernel<<<blocks_for(batch * attributes * width), kThreads, 0, stream>>>(
      features, strides, partners, batch, attributes, dim, width, distances);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Acc>
void pair_distances_backward_atomic(const Acc* grad, const T* features, Strides strides, const int64_t* partners,
                                    const Acc* distances, int64_t batch, int64_t attributes, int64_t dim,
                                    int64_t width, Acc* grad_features, cudaStream_t stream) {
  pair_distances_backward_atomic_kernel<<<blocks_for(batch * attributes * dim), kThreads, 0, stream>>>(
      grad, features, strides, partners, distances, batch, attributes, dim, width, grad_features);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Acc>
void pair_distances_backward_sorted(const Acc* grad, const T* features, Strides strides, const int64_t* partners,
                                    const Acc* distances, const int64_t* incoming, const int64_t* offsets,
                                    int64_t batch, int64_t attributes, int64_t dim, int64_t width, Acc* grad_features,
                                    cudaStream_t stream) {
  pair_distances_backward_sorted_kernel<<<blocks_for(batch * attributes * dim), kThreads, 0, stream>>>(
      grad, features, strides, partners, distances, incoming, offsets, batch, attributes, dim, width, grad_features);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void relative_loss(const Acc* distances, const int64_t* partners, const Acc* margins, int64_t rows,
                   int64_t attributes, int64_t width, Acc* loss, int64_t* num_triplets, cudaStream_t stream) {
  relative_loss_kernel<<<1, kReduceThreads, 0, stream>>>(distances, partners, margins, rows, attributes, width, loss,
                                                         num_triplets);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void relative_loss_backward(const Acc* grad, const Acc* distances, const int64_t* partners, const Acc* margins,
                            const int64_t* num_triplets, int64_t rows, int64_t attributes, int64_t width,
                            Acc* grad_distances, cudaStream_t stream) {
  relative_loss_backward_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(
      grad, distances, partners, margins, num_triplets, rows, attributes, width, grad_distances);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void absolute_loss(const Acc* distances, const int64_t* partners, Acc margin, int64_t rows, int64_t width, Acc* loss,
                   int64_t* num_pairs, cudaStream_t stream) {
  absolute_loss_kernel<<<1, kReduceThreads, 0, stream>>>(distances, partners, margin, rows, width, loss, num_pairs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void absolute_loss_backward(const Acc* grad, const Acc* distances, const int64_t* partners, Acc margin,
                            const int64_t* num_pairs, int64_t rows, int64_t width, Acc* grad_distances,
                            cudaStream_t stream) {
  absolute_loss_backward_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(grad, distances, partners, margin,
                                                                          num_pairs, rows, width, grad_distances);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void distribution_loss(const Acc* distances, const int64_t* partners, int64_t batch, int64_t attributes,
                       int64_t width, int64_t bins, Acc* loss, Acc* histograms, Acc* scale, int64_t* pair_counts,
                       Acc* per_attribute, cudaStream_t stream) {
  histogram_kernel<<<attributes, kThreads, 0, stream>>>(distances, partners, batch, attributes, width, bins,
                                                       histograms, scale, pair_counts, per_attribute);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  histogram_mean_kernel<<<1, 1, 0, stream>>>(per_attribute, pair_counts, attributes, loss);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void distribution_loss_backward(const Acc* grad, const Acc* distances, const int64_t* partners, int64_t batch,
                                int64_t attributes, int64_t width, int64_t bins, const Acc* histograms,
                                const Acc* scale, const int64_t* pair_counts, Acc* gradients, Acc* grad_distances,
                                cudaStream_t stream) {
  histogram_backward_kernel<<<attributes, kThreads, 0, stream>>>(grad, distances, partners, batch, attributes, width,
                                                                bins, histograms, scale, pair_counts, gradients,
                                                                grad_distances);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- explicit instantiations ------------------------------------------------------------------------------

#define CRL_INSTANTIATE_ACC(Acc)                                                                                      \
  template void mine_class<Acc>(const Acc*, const int64_t*, const bool*, int64_t, int64_t, int64_t, int64_t,       \
                                int32_t*, int32_t*, Acc*, bool*, int64_t*, cudaStream_t);                            \
  template void mine_instance<Acc>(const Acc*, const int64_t*, const int64_t*, const bool*, int64_t, int64_t,      \
                                   int64_t, int64_t, int64_t, int32_t*, int32_t*, Acc*, int32_t*, bool*, int64_t*, \
                                   cudaStream_t);                                                                    \
  template void relative_loss<Acc>(const Acc*, const int64_t*, const Acc*, int64_t, int64_t, int64_t, Acc*,        \
                                   int64_t*, cudaStream_t);                                                          \
  template void relative_loss_backward<Acc>(const Acc*, const Acc*, const int64_t*, const Acc*, const int64_t*,    \
                                            int64_t, int64_t, int64_t, Acc*, cudaStream_t);                          \
  template void absolute_loss<Acc>(const Acc*, const int64_t*, Acc, int64_t, int64_t, Acc*, int64_t*,              \
                                   cudaStream_t);                                                                    \
  template void absolute_loss_backward<Acc>(const Acc*, const Acc*, const int64_t*, Acc, const int64_t*, int64_t,  \
                                            int64_t, Acc*, cudaStream_t);                                            \
  template void distribution_loss<Acc>(const Acc*, const int64_t*, int64_t, int64_t, int64_t, int64_t, Acc*, Acc*, \
                                       Acc*, int64_t*, Acc*, cudaStream_t);                                          \
  template void distribution_loss_backward<Acc>(const Acc*, const Acc*, const int64_t*, int64_t, int64_t, int64_t, \
                                                int64_t, const Acc*, const Acc*, const int64_t*, Acc*, Acc*,         \
                                                cudaStream_t);

#define CRL_INSTANTIATE_FEATURES(T, Acc)                                                                           \
  template void pair_distances<T, Acc>(const T*, Strides, const int64_t*, int64_t, int64_t, int64_t, int64_t, Acc*, \
                                       cudaStream_t);                                                               \
  template void pair_distances_backward_atomic<T, Acc>(const Acc*, const T*, Strides, const int64_t*, const Acc*,   \
                                                       int64_t, int64_t, int64_t, int64_t, Acc*, cudaStream_t);     \
  template void pair_distances_backward_sorted<T, Acc>(const Acc*, const T*, Strides, const int64_t*, const Acc*,   \
                                                       const int64_t*, const int64_t*, int64_t, int64_t, int64_t,   \
                                                       int64_t, Acc*, cudaStream_t);

CRL_INSTANTIATE_ACC(float)
CRL_INSTANTIATE_ACC(double)
CRL_INSTANTIATE_FEATURES(float, float)
CRL_INSTANTIATE_FEATURES(double, double)
CRL_INSTANTIATE_FEATURES(c10::Half, float)
CRL_INSTANTIATE_FEATURES(c10::BFloat16, float)

}  // namespace cuda
}  // namespace crl

