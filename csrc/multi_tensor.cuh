// Multi-tensor launches: a list of up to kMax tensors (DEPTH pointers each: target, online,
// ...) passed by value as a kernel argument, one thread block per (tensor, chunk) pair.
// Blocks find their tensor by binary search over the prefix sums of chunk counts, so one
// launch covers every chunk of every tensor in the list, whatever their sizes.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "common.cuh"

namespace fastjepa {

constexpr int kChunk = 16384;  // elements per block
static_assert(kMaxNumel / kChunk < INT32_MAX / 2, "one tensor's chunks must fit in a list (int32 chunk counts)");
constexpr int kThreads = 256;
// Kernel arguments up to 32 KB need CUDA 12.1+ and sm_70+ (this build: sm_80, sm_90, CUDA
// 13). 16 KB holds the 389 tensors of a ViT-H/14 encoder in one EMA launch.
constexpr int kMaxListBytes = 16 * 1024;

template <int DEPTH>
struct TensorList {
  static constexpr int kMax = (kMaxListBytes - 8) / (DEPTH * 8 + 8 + 4 + 4);
  void* ptr[DEPTH][kMax];
  int64_t numel[kMax];
  int32_t group[kMax];           // the tensor's hyper-parameter group (AdamW's lr, weight decay)
  int32_t first_chunk[kMax + 1];  // block b works on tensor i when first_chunk[i] <= b < first_chunk[i + 1]
  int32_t size;
};
static_assert(sizeof(TensorList<3>) <= kMaxListBytes && sizeof(TensorList<6>) <= kMaxListBytes);

// The tensor this block works on, and the element range [start, end) of it: a binary
// search for the last tensor whose first chunk is at most blockIdx.x.
struct BlockChunk {
  int tensor;
  int64_t start, end;
};

template <int DEPTH>
__device__ __forceinline__ BlockChunk block_chunk(const TensorList<DEPTH>& list) {
  const int chunk = blockIdx.x;
  int lo = 0, hi = list.size - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (list.first_chunk[mid] <= chunk) lo = mid;
    else hi = mid - 1;
  }
  const int64_t start = int64_t(chunk - list.first_chunk[lo]) * kChunk;
  const int64_t end = start + kChunk < list.numel[lo] ? start + kChunk : list.numel[lo];
  return {lo, start, end};
}

// Calls f(j, Width<kVec>{}) for 8-element groups when `vectorized` (the block's pointers are
// 16-byte aligned; chunk starts are multiples of kVec elements), then f(j, Width<1>{}) for
// the rest of [start, end).
template <typename F>
__device__ __forceinline__ void for_each_in_chunk(int64_t start, int64_t end, bool vectorized, F&& f) {
  if (vectorized) {
    const int64_t vec_end = start + (end - start) / kVec * kVec;
    for (int64_t j = start + threadIdx.x * kVec; j < vec_end; j += blockDim.x * kVec) f(j, Width<kVec>{});
    start = vec_end;
  }
  for (int64_t j = start + threadIdx.x; j < end; j += blockDim.x) f(j, Width<1>{});
}

// Packs the tensors into lists and calls launch(list) for each full list and the last one.
// Empty tensors are skipped. ptrs[i] holds tensor i's DEPTH pointers.
template <int DEPTH, typename Launch>
cudaError_t launch_tensor_lists(const std::vector<std::array<void*, DEPTH>>& ptrs, const std::vector<int64_t>& numels,
                                const std::vector<int32_t>& groups, Launch&& launch) {
  TensorList<DEPTH> list{};
  for (size_t i = 0; i < ptrs.size(); ++i) {
    if (numels[i] == 0) continue;
    const int64_t chunks = (numels[i] + kChunk - 1) / kChunk;
    if (list.size == TensorList<DEPTH>::kMax || list.first_chunk[list.size] + chunks > INT32_MAX) {
      if (cudaError_t error = launch(list); error != cudaSuccess) return error;
      list.size = 0;
    }
    const int k = list.size++;
    for (int d = 0; d < DEPTH; ++d) list.ptr[d][k] = ptrs[i][d];
    list.numel[k] = numels[i];
    list.group[k] = groups.empty() ? 0 : groups[i];
    list.first_chunk[k + 1] = static_cast<int32_t>(list.first_chunk[k] + chunks);
  }
  return list.size ? launch(list) : cudaSuccess;
}

// The launch of a list: one block per chunk.
template <int DEPTH>
inline dim3 list_grid(const TensorList<DEPTH>& list) {
  return dim3(static_cast<unsigned>(list.first_chunk[list.size]));
}

}  // namespace fastjepa
