// Top-K selection for the CUDA mining kernels, one warp per list: the order of
// common/crl_math.h (key, then the lower sample index), so any correct selection picks the same
// K samples as the CPU's offer_dynamic.
//
// A list of capacity W = 32 R lives in the warp's shared memory as a sorted queue of W entries
// plus an unsorted buffer of M = 32 RB entries. Candidates that rank before the queue's entry
// k - 1 (the threshold) are appended to the buffer, compacted with a warp ballot; when the
// buffer would overflow it is merged into the queue in registers: a bitonic sort of the buffer
// across the warp's lanes (entry p in register p / 32 of lane p % 32), one compare with the
// reversed buffer that leaves the best W of both as a bitonic sequence, and a bitonic merge.
// No global memory, no thread scans a list, and a merge costs O(W log W) per M candidates that
// passed the threshold (FAISS's warp select keeps per-thread queues instead of the shared
// buffer; with B ~ 10^4 candidates the buffer merges about 6x less often for K = 64).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/crl_math.h"
#include "cuda/cuda_common.cuh"

namespace crl {
namespace cuda {

// Registers per lane of a list: K <= 32, 64, 256, 1024 (op_checks.h's kMaxK).
template <typename F>
void dispatch_list_registers(int64_t k, F&& f) {
  if (k <= 32) {
    f(std::integral_constant<int, 1>());
  } else if (k <= 64) {
    f(std::integral_constant<int, 2>());
  } else if (k <= 256) {
    f(std::integral_constant<int, 8>());
  } else {
    f(std::integral_constant<int, 32>());
  }
}

// Buffer registers for a queue of R registers: as many as the queue up to 64 entries, then a
// quarter of it (at most 256 entries), which bounds shared memory for K > 64.
constexpr int buffer_registers(int queue_registers) {
  return queue_registers <= 2 ? 1 : (queue_registers <= 8 ? queue_registers / 2 : 8);
}

constexpr int log2_of(int n) {
  return n <= 1 ? 0 : 1 + log2_of(n / 2);
}

__device__ __forceinline__ int lane_index() {
  return threadIdx.x % kWarp;
}

// Compare-exchange of the entries at positions p and p ^ stride (stride < 32: another lane, the
// same register). `ascending`: the lower position keeps the entry that ranks first. Both lanes
// evaluate the same comparison (lower entry, upper entry), so even keys without an order (NaN)
// swap both or neither: the network always permutes.
template <bool Largest, typename Key>
__device__ __forceinline__ void exchange_lanes(Key& key, int32_t& index, int stride, bool ascending) {
  const Key other_key = __shfl_xor_sync(kFullMask, key, stride);
  const int32_t other = __shfl_xor_sync(kFullMask, index, stride);
  const bool lower = (lane_index() & stride) == 0;
  const bool upper_first = lower ? ranks_before<Largest>(other_key, other, key, index)
                                 : ranks_before<Largest>(key, index, other_key, other);
  const bool lower_first = lower ? ranks_before<Largest>(key, index, other_key, other)
                                 : ranks_before<Largest>(other_key, other, key, index);
  if (ascending ? upper_first : lower_first) {
    key = other_key;
    index = other;
  }
}

// The same for positions 32 r and 32 s of one lane (stride >= 32).
template <bool Largest, typename Key>
__device__ __forceinline__ void exchange_registers(Key& low_key, int32_t& low, Key& high_key, int32_t& high,
                                                   bool ascending) {
  const bool swap = ascending ? ranks_before<Largest>(high_key, high, low_key, low)
                              : ranks_before<Largest>(low_key, low, high_key, high);
  if (swap) {
    const Key k = low_key;
    low_key = high_key;
    high_key = k;
    const int32_t i = low;
    low = high;
    high = i;
  }
}

// One bitonic stage over the warp's 32 N entries.
template <bool Largest, typename Key, int N>
__device__ __forceinline__ void bitonic_stage(Key (&key)[N], int32_t (&index)[N], int size, int stride) {
  const int lane = lane_index();
  if (stride >= kWarp) {
    const int s = stride / kWarp;
#pragma unroll
    for (int r = 0; r < N; ++r) {
      if ((r & s) == 0) {
        exchange_registers<Largest>(key[r], index[r], key[r | s], index[r | s], ((r * kWarp + lane) & size) == 0);
      }
    }
  } else {
#pragma unroll
    for (int r = 0; r < N; ++r) exchange_lanes<Largest>(key[r], index[r], stride, ((r * kWarp + lane) & size) == 0);
  }
}

// Sorts the warp's 32 N entries best first.
template <bool Largest, typename Key, int N>
__device__ __forceinline__ void warp_sort(Key (&key)[N], int32_t (&index)[N]) {
  constexpr int kLog = log2_of(kWarp * N);
#pragma unroll
  for (int level = 1; level <= kLog; ++level) {
#pragma unroll
    for (int step = level - 1; step >= 0; --step) bitonic_stage<Largest>(key, index, 1 << level, 1 << step);
  }
}

// Replaces the sorted queue (32 R entries) by the best 32 R entries of it and the sorted buffer
// (32 RB <= 32 R entries, empty slots padded): the queue's entry p meets the buffer's entry
// 32 R - 1 - p, the better one stays, and the bitonic result is merged.
template <bool Largest, typename Key, int R, int RB>
__device__ __forceinline__ void merge_sorted(Key (&key)[R], int32_t (&index)[R], const Key (&buffer_key)[RB],
                                             const int32_t (&buffer_index)[RB]) {
  static_assert(RB <= R, "the buffer is at most as long as the queue");
#pragma unroll
  for (int r = R - RB; r < R; ++r) {
    const Key other_key = __shfl_xor_sync(kFullMask, buffer_key[R - 1 - r], kWarp - 1);
    const int32_t other = __shfl_xor_sync(kFullMask, buffer_index[R - 1 - r], kWarp - 1);
    if (ranks_before<Largest>(other_key, other, key[r], index[r])) {
      key[r] = other_key;
      index[r] = other;
    }
  }
  constexpr int kLog = log2_of(kWarp * R);
#pragma unroll
  for (int step = kLog - 1; step >= 0; --step) bitonic_stage<Largest>(key, index, kWarp * R * 2, 1 << step);
}

// The threshold of a list: its entry k - 1, or an empty slot while it holds fewer.
template <typename Key>
struct Threshold {
  Key key;
  int32_t index;
};

// The shared-memory state of one list between calls.
template <typename Key>
struct ListState {
  Key threshold_key;
  int32_t threshold_index;
  int32_t count;  // entries in the buffer
};

// Merges the buffer's `count` entries into the queue (both in shared memory, this warp's own),
// returns the new threshold. Not inlined: the mining loops call it from many unrolled sites and
// rarely (once per M admitted candidates).
template <bool Largest, typename Key, int R, int RB>
__device__ CRL_NOINLINE Threshold<Key> merge_buffer(Key* queue_key, int32_t* queue_index, const Key* buffer_key,
                                                    const int32_t* buffer_index, int count, int k) {
  const int lane = lane_index();
  __syncwarp();  // the buffer entries of every lane are written
  Key bk[RB];
  int32_t bi[RB];
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    const int p = r * kWarp + lane;
    bk[r] = p < count ? buffer_key[p] : empty_key<Largest, Key>();
    bi[r] = p < count ? buffer_index[p] : kEmptyIndex;
  }
  warp_sort<Largest>(bk, bi);
  Key qk[R];
  int32_t qi[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    qk[r] = queue_key[r * kWarp + lane];
    qi[r] = queue_index[r * kWarp + lane];
  }
  merge_sorted<Largest>(qk, qi, bk, bi);
  const int last = k - 1;
  Key tk = qk[0];
  int32_t ti = qi[0];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    queue_key[r * kWarp + lane] = qk[r];
    queue_index[r * kWarp + lane] = qi[r];
    if (r == last / kWarp) {
      tk = qk[r];
      ti = qi[r];
    }
  }
  __syncwarp();  // every lane has read the buffer before any lane refills it
  return {__shfl_sync(kFullMask, tk, last % kWarp), __shfl_sync(kFullMask, ti, last % kWarp)};
}

// One warp's top-K list (Largest: the largest keys first) over shared storage of
// kStorage keys and as many indices: queue [0, W), buffer [W, W + M). All members are
// warp-collective: the 32 lanes call them together with the same k.
template <bool Largest, typename Key, int R>
struct WarpList {
  static constexpr int kWidth = kWarp * R;
  static constexpr int kBufferRegisters = buffer_registers(R);
  static constexpr int kBuffer = kWarp * kBufferRegisters;
  static constexpr int kStorage = kWidth + kBuffer;

  Key* keys;
  int32_t* index;
  ListState<Key>* state;
  // The state in registers (the same in every lane) between load() and store().
  Threshold<Key> threshold;
  int count;

  __device__ WarpList(Key* keys_, int32_t* index_, ListState<Key>* state_)
      : keys(keys_), index(index_), state(state_) {}

  // An empty list (the state stays in registers until store()).
  __device__ void reset() {
    const int lane = lane_index();
#pragma unroll
    for (int r = 0; r < R; ++r) {
      keys[r * kWarp + lane] = empty_key<Largest, Key>();
      index[r * kWarp + lane] = kEmptyIndex;
    }
    threshold = {empty_key<Largest, Key>(), kEmptyIndex};
    count = 0;
  }

  __device__ void load() {
    threshold = {state->threshold_key, state->threshold_index};
    count = state->count;
  }

  __device__ void store() const {  // every lane writes the same values
    if (lane_index() == 0) *state = {threshold.key, threshold.index, count};
    __syncwarp();
  }

  // Whether a candidate may belong to the final list: it ranks before the threshold.
  __device__ bool admits(Key key, int32_t candidate) const {
    return ranks_before<Largest>(key, candidate, threshold.key, threshold.index);
  }

  // Appends each lane's candidate where `take` (admitted: a stale threshold only costs room).
  __device__ void push(bool take, Key key, int32_t candidate, int k) {
    const unsigned taken = __ballot_sync(kFullMask, take);
    if (taken == 0) return;
    const int n = __popc(taken);
    if (count + n > kBuffer) merge(k);
    if (take) {
      const int slot = kWidth + count + __popc(taken & ((1u << lane_index()) - 1u));
      keys[slot] = key;
      index[slot] = candidate;
    }
    count += n;
  }

  __device__ void merge(int k) {
    threshold = merge_buffer<Largest, Key, R, kBufferRegisters>(keys, index, keys + kWidth, index + kWidth, count, k);
    count = 0;
  }

  // Merges what the buffer still holds: the queue's first k entries are the list.
  __device__ void finish(int k) {
    if (count > 0) merge(k);
  }

  // Merges another warp's finished queue (its first k entries) into this list, M at a time.
  __device__ void absorb(const Key* other_keys, const int32_t* other_index, int k) {
    for (int first = 0; first < k; first += kBuffer) {
      const int lane = lane_index();
      for (int p = lane; p < kBuffer; p += kWarp) {
        const bool inside = first + p < k;
        keys[kWidth + p] = inside ? other_keys[first + p] : empty_key<Largest, Key>();
        index[kWidth + p] = inside ? other_index[first + p] : kEmptyIndex;
      }
      count = kBuffer;
      merge(k);
    }
  }
};

}  // namespace cuda
}  // namespace crl
