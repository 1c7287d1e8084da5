// CUDA batch profiling (docs/semantics.md, section 1): one block per attribute, no sort.
//
// The CPU walks the classes in (count, class) order and takes the longest prefix whose counts sum
// to strictly less than limit = threshold * n. Since counts are non-negative, class c is in
// that prefix exactly when its own inclusive prefix sum is below the limit, and that sum is
//   F(h_c) + h_c * (rank_c + 1),   F(v) = sum of the counts below v,
// with rank_c the number of lower classes of the same count. Let v* be the smallest count value
// whose G(v) = sum of the counts <= v reaches the limit: every class below v* is a minority
// class, none above, and for the classes at v* the formula decides. The kernel finds v* by a
// 16-way search over 0..n (each round one pass over the classes, at most 8 rounds as n < 2^31),
// then ranks the classes at v* with one block-wide scan: O(C) per attribute, no sort, all
// integer sums, so the result is exactly the CPU's. The rounds read the counts from shared memory:
// all of them up to 4096 classes, else the nonzero ones (at most n, up to 11264 of them).
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>

#include <cstdio>

#include "cuda/cuda_common.cuh"
#include "cuda/mining.h"

namespace crl {
namespace cuda {
namespace {

// Assertion messages live in device code, as literals.
#define CRL_LABELS_MESSAGE \
  "crl_ops: a label is out of range for attribute j: expected -1 (not annotated) or a class in 0..C_j-1"
#define CRL_PROFILE_CLASSES_MESSAGE "crl_ops: num_classes must be between 2 and max_classes"

constexpr int kProfileThreads = 1024;
constexpr int kProbes = 15;                 // values tried per search round
constexpr int64_t kSharedClasses = 4096;    // counts kept in shared memory up to this many classes
constexpr int64_t kNonzeroCapacity = 11264;  // above: the nonzero counts, as many, in shared memory

// Sums of kN values over the block, returned to every thread (fixed order, integers anyway).
template <int kN>
__device__ void block_sums(int32_t (&value)[kN]) {
  CRL_SHARED(int32_t, partial, [kN][kWarp]);
  CRL_SHARED(int32_t, total, [kN]);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
#pragma unroll
  for (int t = 0; t < kN; ++t) value[t] = warp_reduce(value[t], Sum());
  __syncthreads();  // the arrays may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < kN; ++t) partial[t][warp] = value[t];
  }
  __syncthreads();
  if (warp == 0) {
    for (int t = 0; t < kN; ++t) {
      const int32_t sum = warp_reduce(lane < warps ? partial[t][lane] : 0, Sum());
      if (lane == 0) total[t] = sum;
    }
  }
  __syncthreads();
#pragma unroll
  for (int t = 0; t < kN; ++t) value[t] = total[t];
}

__global__ void __launch_bounds__(kProfileThreads)
    profile_kernel(const int64_t* labels, const int64_t* num_classes, int64_t batch, int64_t attributes,
                   int64_t max_classes, double threshold, bool validate, int64_t* counts, bool* minority,
                   bool* active) {
  // Dynamic shared memory: the counts (Cmax <= kSharedClasses), or room for the nonzero ones.
  CRL_DYNAMIC_SHARED(int64_t, shared_counts);
  int32_t* nonzero = reinterpret_cast<int32_t*>(shared_counts);
  CRL_SHARED(int32_t, nonzero_count);
  const int lane = threadIdx.x % kWarp;
  for (int64_t j = blockIdx.x; j < attributes; j += gridDim.x) {
    const int64_t classes = num_classes[j];
    if (threadIdx.x == 0 && !(classes >= 2 && classes <= max_classes)) {
      printf("crl_ops: num_classes[%lld] = %lld, max_classes = %lld\n", static_cast<long long>(j),
             static_cast<long long>(classes), static_cast<long long>(max_classes));
    }
    CUDA_KERNEL_ASSERT_MSG(classes >= 2 && classes <= max_classes, CRL_PROFILE_CLASSES_MESSAGE);
    const int64_t c_j = classes < 0 ? 0 : (classes < max_classes ? classes : max_classes);
    const bool in_shared = max_classes <= kSharedClasses;
    int64_t* h = in_shared ? shared_counts : counts + j * max_classes;
    // Global counts are read past L1: the atomics that made them happened in L2.
    const auto count_of = [&](int64_t c) -> int64_t {
      return in_shared ? h[c] : __ldcg(reinterpret_cast<const long long*>(h + c));
    };
    __syncthreads();  // the previous attribute's counts are consumed
    for (int64_t c = threadIdx.x; c < max_classes; c += blockDim.x) h[c] = 0;
    __syncthreads();

    // Counts: lanes of a warp with the same label add once (binary labels would otherwise
    // serialise on two addresses).
    int32_t valid = 0;
    for (int64_t base = 0; base < batch; base += blockDim.x) {
      const int64_t i = base + threadIdx.x;
      const int64_t label = i < batch ? labels[i * attributes + j] : -1;
      const bool annotated = is_annotated(label, c_j);
      if (validate && i < batch) {
        const bool in_range = label >= -1 && label < classes;
        if (!in_range) {  // the position, then the assertion (its message is what Python shows)
          printf("crl_ops: labels[%lld, %lld] = %lld is out of range for attribute %lld: expected -1 (not "
                 "annotated) or a class in 0..%lld\n",
                 static_cast<long long>(i), static_cast<long long>(j), static_cast<long long>(label),
                 static_cast<long long>(j), static_cast<long long>(classes - 1));
        }
        CUDA_KERNEL_ASSERT_MSG(in_range, CRL_LABELS_MESSAGE);
      }
      const unsigned same = __match_any_sync(kFullMask, annotated ? label : int64_t(-1));
      if (annotated && lane == __ffs(same) - 1) {
        atomicAdd(reinterpret_cast<unsigned long long*>(h + label), static_cast<unsigned long long>(__popc(same)));
      }
      valid += annotated;
    }
    int32_t n[1] = {valid};
    block_sums(n);  // also publishes the counts (it synchronises the block)
    const double limit = threshold * static_cast<double>(n[0]);

    // With the counts in global memory, the search reads the nonzero ones (at most n) from
    // shared memory when they fit; their order does not matter to a sum.
    if (threadIdx.x == 0) nonzero_count = 0;
    __syncthreads();
    if (!in_shared) {
      for (int64_t c = threadIdx.x; c < c_j; c += blockDim.x) {
        const int32_t hc = static_cast<int32_t>(count_of(c));
        if (hc == 0) continue;
        const int32_t slot = atomicAdd(&nonzero_count, 1);
        if (slot < kNonzeroCapacity) nonzero[slot] = hc;
      }
    }
    __syncthreads();
    const bool compact = !in_shared && nonzero_count <= kNonzeroCapacity;
    const int64_t searched = compact ? nonzero_count : c_j;

    // v*: the smallest v in [low, high] with G(v) >= limit; G(n) = n >= limit as threshold <= 1,
    // and every v < low has G(v) < limit.
    int32_t low = 0, high = n[0];
    while (low < high) {
      int32_t probe[kProbes], sum[kProbes];
#pragma unroll
      for (int t = 0; t < kProbes; ++t) {
        probe[t] = low + static_cast<int32_t>((static_cast<int64_t>(high - low) * t) / kProbes);
        sum[t] = 0;
      }
      for (int64_t c = threadIdx.x; c < searched; c += blockDim.x) {
        const int32_t hc = compact ? nonzero[c] : static_cast<int32_t>(count_of(c));
        if (hc == 0) continue;  // most classes of a large C: nothing to add
#pragma unroll
        for (int t = 0; t < kProbes; ++t) sum[t] += hc <= probe[t] ? hc : 0;
      }
      block_sums(sum);
      int first = kProbes;
#pragma unroll
      for (int t = kProbes - 1; t >= 0; --t) {
        if (!(static_cast<double>(sum[t]) < limit)) first = t;
      }
      if (first == 0) {
        high = low;
      } else if (first == kProbes) {
        low = probe[kProbes - 1] + 1;
      } else {
        high = probe[first];
        low = probe[first - 1] + 1;
      }
    }
    const int32_t cut = low;

    // F(v*), and each thread's count of classes at v* over its own run of classes.
    const int64_t run = (c_j + blockDim.x - 1) / blockDim.x;
    const int64_t begin = threadIdx.x * run, end = begin + run < c_j ? begin + run : c_j;
    int32_t below_and_ties[2] = {0, 0};
    for (int64_t c = begin; c < end; ++c) {
      const int32_t hc = static_cast<int32_t>(count_of(c));
      below_and_ties[0] += hc < cut ? hc : 0;
      below_and_ties[1] += hc == cut;
    }
    int32_t ties;
    int64_t rank = block_exclusive_scan(below_and_ties[1], ties);
    int32_t below[1] = {below_and_ties[0]};
    block_sums(below);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t hc = count_of(c);
      bool is_minority = hc < cut;
      if (hc == cut) {
        ++rank;
        is_minority = static_cast<double>(below[0] + hc * rank) < limit;
      }
      minority[j * max_classes + c] = is_minority;
      active[j * max_classes + c] = is_minority && hc >= 2;
    }
    for (int64_t c = c_j + threadIdx.x; c < max_classes; c += blockDim.x) {
      minority[j * max_classes + c] = false;
      active[j * max_classes + c] = false;
    }
    if (in_shared) {
      for (int64_t c = threadIdx.x; c < max_classes; c += blockDim.x) counts[j * max_classes + c] = h[c];
    }
  }
}

}  // namespace

void launch_profile(const int64_t* labels, const int64_t* num_classes, int64_t batch, int64_t attributes,
                    int64_t max_classes, double threshold, bool validate, int64_t* counts, bool* minority,
                    bool* active, cudaStream_t stream) {
  if (attributes == 0) return;
  const size_t shared = max_classes <= kSharedClasses ? static_cast<size_t>(max_classes) * sizeof(int64_t)
                                                      : static_cast<size_t>(kNonzeroCapacity) * sizeof(int32_t);
  const int blocks = static_cast<int>(std::min<int64_t>(attributes, kMaxBlocks));
  CRL_LAUNCH(blocks, kProfileThreads, shared, stream, profile_kernel)(labels, num_classes, batch, attributes, max_classes,
                                                              threshold, validate, counts, minority, active);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace crl
