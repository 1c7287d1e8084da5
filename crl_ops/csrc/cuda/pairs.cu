// CUDA: the pair ops (cuda/kernels.h), computing what cpu/losses.cpp's pair_distances, pair_sums
// and their backward compute: distances dimension by dimension without FMA (bitwise the CPU's),
// per-attribute sums in row order and histograms in pair order (bitwise the CPU's); the vectors'
// gradient adds with float atomics (pairs_ops.cpp refuses it under deterministic algorithms).
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace crl {
namespace cuda {
namespace {

#define CRL_PAIR_PARTNER_MESSAGE "crl_ops: a partner index is outside -1..N-1 (the rows of vectors)"

template <typename T>
__device__ __forceinline__ const T* vector_of(const PairVectors<T>& v, int64_t sample, int64_t j) {
  return v.x.data + sample * v.x.sample_stride + (v.per_sample == 1 ? 0 : j) * v.x.attribute_stride;
}

template <typename Acc>
__device__ __forceinline__ Acc histogram_scale_of(Acc longest, int64_t bins) {
  return longest > Acc(0) ? static_cast<Acc>(bins - 1) / longest : Acc(0);  // a true division, as the CPU
}

// One thread per pair slot (row r, attribute j, slot m).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) distances_kernel(PairVectors<T> v, const int64_t* partners, int64_t slots,
                                                             int64_t attributes, int64_t width, int64_t first,
                                                             Acc* distances, bool* overflow) {
  CRL_GRID_STRIDE(slot, slots) {
    const int64_t other = partners[slot];
    CUDA_KERNEL_ASSERT_MSG(other >= -1 && other < v.samples, CRL_PAIR_PARTNER_MESSAGE);
    if (other < 0) {
      distances[slot] = Acc(0);
      continue;
    }
    const int64_t row = slot / width, j = row % attributes, i = first + row / attributes;
    const Acc squared = squared_distance<Acc>(vector_of(v, i, j), v.x.dim_stride, vector_of(v, other, j),
                                              v.x.dim_stride, v.x.dim);
    if (isinf(squared)) *overflow = true;
    distances[slot] = distance_from_squared(squared);
  }
}

// One thread per (pair slot, dimension): adds s (x_i - x_p) to the anchor's row, subtracts it from the partner's.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) distances_backward_kernel(PairVectors<T> v, const int64_t* partners,
                                                                      const Acc* distances, const Acc* grad,
                                                                      int64_t entries, int64_t attributes,
                                                                      int64_t width, int64_t first, Acc* out) {
  const int64_t dim = v.x.dim;
  CRL_GRID_STRIDE(entry, entries) {
    const int64_t slot = entry / dim, d = entry % dim;
    const int64_t other = partners[slot];
    CUDA_KERNEL_ASSERT_MSG(other >= -1 && other < v.samples, CRL_PAIR_PARTNER_MESSAGE);
    if (other < 0) continue;
    const Acc s = distance_gradient_scale(grad[slot], distances[slot]);
    if (s == Acc(0)) continue;
    const int64_t row = slot / width, j = row % attributes, i = first + row / attributes;
    const int64_t column = v.per_sample == 1 ? 0 : j;
    const Acc diff = static_cast<Acc>(vector_of(v, i, j)[d * v.x.dim_stride]) -
                     static_cast<Acc>(vector_of(v, other, j)[d * v.x.dim_stride]);
    atomicAdd(out + (i * v.per_sample + column) * dim + d, s * diff);
    atomicAdd(out + (other * v.per_sample + column) * dim + d, -(s * diff));
  }
}

// Each row's two partial sums (relative: hinge sum, 0; absolute: positive d^2, negative hinge^2).
template <typename Acc>
__global__ void __launch_bounds__(kThreads) row_sums_kernel(const Acc* d, const int64_t* p, PairRows rows,
                                                            const Acc* margins, Form form, Acc apc_margin,
                                                            Acc* partial) {
  const int64_t k = rows.width / 2;
  CRL_GRID_STRIDE(r, rows.rows * rows.attributes) {
    Acc first = Acc(0), second = Acc(0);
    int64_t count = 0, other_count = 0;
    if (form == Form::Relative) {
      relative_row(d + r * rows.width, p + r * rows.width, k, margins[r % rows.attributes], first, count);
    } else {
      absolute_row(d + r * rows.width, p + r * rows.width, k, apc_margin, first, second, count, other_count);
    }
    partial[2 * r] = first;
    partial[2 * r + 1] = second;
  }
}

// One thread per (attribute, column): the rows' partials added in row order, as cpu attribute_sums.
template <typename Acc>
__global__ void __launch_bounds__(kThreads) attribute_sums_kernel(const Acc* partial, PairRows rows, Acc* sums) {
  CRL_GRID_STRIDE(entry, 2 * rows.attributes) {
    const int64_t j = entry / 2, column = entry % 2;
    Acc total = Acc(0);
    for (int64_t i = 0; i < rows.rows; ++i) total += partial[2 * (i * rows.attributes + j) + column];
    sums[entry] = total;
  }
}

// One thread per histogram node (attribute j, kind, node t): the pairs' weights on t, in pair
// order, so each node's sum rounds as the CPU's scatter in pair order does.
template <typename Acc>
__global__ void __launch_bounds__(kThreads) histogram_kernel(const Acc* d, const int64_t* p, PairRows rows,
                                                             const Acc* longest, int64_t bins, Acc* sums) {
  const int64_t k = rows.width / 2;
  CRL_GRID_STRIDE(entry, rows.attributes * 2 * bins) {
    const int64_t j = entry / (2 * bins), negative = (entry / bins) % 2, t = entry % bins;
    const Acc scale = histogram_scale_of(longest[j], bins);
    Acc total = Acc(0);
    for (int64_t i = 0; i < rows.rows; ++i) {
      const int64_t base = (i * rows.attributes + j) * rows.width + negative * k;
      for (int64_t m = 0; m < k; ++m) {
        if (p[base + m] < 0) continue;
        int64_t node;
        Acc w;
        histogram_node(d[base + m], scale, bins, node, w);
        if (node == t) total += Acc(1) - w;
        if (node + 1 == t) total += w;
      }
    }
    sums[entry] = total;
  }
}

// One thread per row (relative, absolute) or per pair slot (distribution).
template <typename Acc>
__global__ void __launch_bounds__(kThreads) sums_backward_kernel(const Acc* grad, const Acc* d, const int64_t* p,
                                                                 PairRows rows, const Acc* margins, const Acc* longest,
                                                                 Form form, Acc apc_margin, int64_t bins, Acc* out,
                                                                 unsigned long long* open) {
  const int64_t k = rows.width / 2, width = rows.width;
  if (form == Form::Distribution) {
    CRL_GRID_STRIDE(slot, rows.rows * rows.attributes * width) {
      if (p[slot] < 0) {
        out[slot] = Acc(0);
        continue;
      }
      const int64_t j = (slot / width) % rows.attributes, negative = slot % width >= k;
      out[slot] = histogram_pair_gradient(d[slot], histogram_scale_of(longest[j], bins), bins,
                                          grad + (j * 2 + negative) * bins);
    }
    return;
  }
  CRL_GRID_STRIDE(r, rows.rows * rows.attributes) {
    const int64_t j = r % rows.attributes;
    if (form == Form::Relative) {
      const int64_t hinges = relative_row_backward(d + r * width, p + r * width, k, margins[j], grad[2 * j],
                                                   out + r * width);
      if (hinges > 0) atomicAdd(open + j, static_cast<unsigned long long>(hinges));  // integers: any order
    } else {
      absolute_row_backward(d + r * width, p + r * width, k, apc_margin, Acc(2) * grad[2 * j],
                            Acc(2) * grad[2 * j + 1], out + r * width);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) shard_table_kernel(PairVectors<T> v, const int64_t* lists, int64_t slots,
                                                               int64_t attributes, int64_t first, T* table) {
  const int64_t dim = v.x.dim;
  CRL_GRID_STRIDE(e, slots * attributes * dim) {
    const int64_t d = e % dim, j = (e / dim) % attributes, m = e / (dim * attributes);
    const int64_t source = table_source(lists, slots, m, j, first, v.samples);
    table[e] = source < 0 ? T(0) : vector_of(v, source, j)[d * v.x.dim_stride];
  }
}

// One thread per entry of grad: its additions in the order of the CPU's scatter (attribute, slot).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    shard_table_backward_kernel(const T* grad_table, const T* grad_rows, const int64_t* lists, int64_t slots,
                                int64_t attributes, int64_t rows, int64_t per_sample, int64_t dim, int64_t first,
                                const T* scale, T* grad) {
  CRL_GRID_STRIDE(e, rows * per_sample * dim) {
    const int64_t d = e % dim, column = (e / dim) % per_sample, r = e / (dim * per_sample);
    T value = grad_rows[e];
    const int64_t last = per_sample == 1 ? attributes : column + 1;
    for (int64_t j = per_sample == 1 ? 0 : column; j < last; ++j) {
      for (int64_t m = 0; m < slots; ++m) {
        if (table_source(lists, slots, m, j, first, rows) == r) value += grad_table[(m * attributes + j) * dim + d];
      }
    }
    grad[e] = value * *scale;
  }
}

}  // namespace

template <typename T>
void shard_table(const PairVectors<T>& v, const int64_t* lists, int64_t slots, int64_t attributes, int64_t first,
                 T* table, cudaStream_t stream) {
  const int64_t entries = slots * attributes * v.x.dim;
  if (entries == 0) return;
  CRL_LAUNCH(blocks_for(entries), kThreads, 0, stream, shard_table_kernel<T>)(v, lists, slots, attributes, first, table);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void shard_table_backward(const T* grad_table, const T* grad_rows, const int64_t* lists, int64_t slots,
                          int64_t attributes, int64_t rows, int64_t per_sample, int64_t dim, int64_t first,
                          const T* scale, T* grad, cudaStream_t stream) {
  const int64_t entries = rows * per_sample * dim;
  if (entries == 0) return;
  CRL_LAUNCH(blocks_for(entries), kThreads, 0, stream, shard_table_backward_kernel<T>)(
      grad_table, grad_rows, lists, slots, attributes, rows, per_sample, dim, first, scale, grad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Acc>
void pair_distances(const PairVectors<T>& v, const int64_t* partners, int64_t rows, int64_t attributes,
                    int64_t width, int64_t first, Acc* distances, bool* overflow, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaMemsetAsync(overflow, 0, sizeof(bool), stream));
  const int64_t slots = rows * attributes * width;
  if (slots == 0) return;
  CRL_LAUNCH(blocks_for(slots), kThreads, 0, stream, distances_kernel<T, Acc>)(v, partners, slots, attributes, width, first,
                                                                        distances, overflow);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Acc>
void pair_distances_backward(const PairVectors<T>& v, const int64_t* partners, const Acc* distances,
                             const Acc* grad, int64_t rows, int64_t attributes, int64_t width, int64_t first,
                             Acc* grad_vectors, cudaStream_t stream) {
  const int64_t entries = rows * attributes * width * v.x.dim;
  if (entries == 0) return;
  CRL_LAUNCH(blocks_for(entries), kThreads, 0, stream, distances_backward_kernel<T, Acc>)(
      v, partners, distances, grad, entries, attributes, width, first, grad_vectors);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
size_t pair_sums_workspace(const PairRows& rows) {
  return sizeof(Acc) * 2 * rows.rows * rows.attributes;
}

template <typename Acc>
void pair_sums(const Acc* distances, const int64_t* partners, const PairRows& rows, const Acc* margins,
               const Acc* longest, Form form, Acc apc_margin, int64_t bins, Acc* sums, void* workspace,
               cudaStream_t stream) {
  if (form == Form::Distribution) {
    CRL_LAUNCH(blocks_for(rows.attributes * 2 * bins), kThreads, 0, stream, histogram_kernel<Acc>)(distances, partners, rows,
                                                                                         longest, bins, sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  Acc* partial = static_cast<Acc*>(workspace);
  if (rows.rows > 0) {
    CRL_LAUNCH(blocks_for(rows.rows * rows.attributes), kThreads, 0, stream, row_sums_kernel<Acc>)(
        distances, partners, rows, margins, form, apc_margin, partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  CRL_LAUNCH(blocks_for(2 * rows.attributes), kThreads, 0, stream, attribute_sums_kernel<Acc>)(partial, rows, sums);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Acc>
void pair_sums_backward(const Acc* grad, const Acc* distances, const int64_t* partners, const PairRows& rows,
                        const Acc* margins, const Acc* longest, Form form, Acc apc_margin, int64_t bins,
                        Acc* grad_distances, unsigned long long* open, cudaStream_t stream) {
  const int64_t items = rows.rows * rows.attributes * (form == Form::Distribution ? rows.width : 1);
  if (items == 0) return;
  CRL_LAUNCH(blocks_for(items), kThreads, 0, stream, sums_backward_kernel<Acc>)(
      grad, distances, partners, rows, margins, longest, form, apc_margin, bins, grad_distances, open);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define CRL_INSTANTIATE_PAIR_ACC(Acc)                                                                              \
  template size_t pair_sums_workspace<Acc>(const PairRows&);                                                      \
  template void pair_sums<Acc>(const Acc*, const int64_t*, const PairRows&, const Acc*, const Acc*, Form, Acc,   \
                               int64_t, Acc*, void*, cudaStream_t);                                               \
  template void pair_sums_backward<Acc>(const Acc*, const Acc*, const int64_t*, const PairRows&, const Acc*,     \
                                        const Acc*, Form, Acc, int64_t, Acc*, unsigned long long*, cudaStream_t);

#define CRL_INSTANTIATE_PAIR_VECTORS(T, Acc)                                                                      \
  template void pair_distances<T, Acc>(const PairVectors<T>&, const int64_t*, int64_t, int64_t, int64_t, int64_t, \
                                       Acc*, bool*, cudaStream_t);                                                \
  template void pair_distances_backward<T, Acc>(const PairVectors<T>&, const int64_t*, const Acc*, const Acc*,   \
                                                int64_t, int64_t, int64_t, int64_t, Acc*, cudaStream_t);  \
  template void shard_table<T>(const PairVectors<T>&, const int64_t*, int64_t, int64_t, int64_t, T*, cudaStream_t); \
  template void shard_table_backward<T>(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t,   \
                                        int64_t, int64_t, const T*, T*, cudaStream_t);

CRL_FOR_EACH_ACCUMULATION_TYPE(CRL_INSTANTIATE_PAIR_ACC)
CRL_FOR_EACH_FEATURE_TYPE(CRL_INSTANTIATE_PAIR_VECTORS)

}  // namespace cuda
}  // namespace crl
