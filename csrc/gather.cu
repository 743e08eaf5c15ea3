// Packed-token gather fused with the position add, and its store-based backward. One warp
// per row: a token of the output (forward) or a row of the source gradient (backward), its
// lanes striding over the channels, 8 at a time with 16-byte accesses when the rows allow.
#include "common.cuh"

namespace fastjepa {
namespace {

constexpr int kRowsPerBlock = 8;
constexpr int kRowThreads = 32 * kRowsPerBlock;

template <typename T>
struct TypeTag {
  using type = T;
};

// Pos = void: no position table.
template <typename Src, typename Pos, typename Out>
__global__ void gather_forward_kernel(const __grid_constant__ GatherForwardArgs a, const bool vectorized) {
  const int64_t t = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (t >= a.tokens) return;
  const int lane = threadIdx.x % 32;
  const int64_t n = a.idx_int64 ? static_cast<const int64_t*>(a.idx)[t] : static_cast<const int32_t*>(a.idx)[t];
  int64_t src_offset = 0;
  if (a.mode == GatherMode::Gather) {
    const int64_t r = a.token_row ? a.token_row[t] : t / a.k;
    src_offset = (r % a.batch) * a.src_stride_b + n * a.src_stride_n;
  } else if (a.mode == GatherMode::SameRow) {
    src_offset = t * a.src_stride_n;
  }
  const Src* __restrict__ src = static_cast<const Src*>(a.src) + src_offset;
  using PosT = std::conditional_t<std::is_void_v<Pos>, float, Pos>;
  const PosT* __restrict__ pos = nullptr;
  if constexpr (!std::is_void_v<Pos>) pos = static_cast<const Pos*>(a.pos) + n * a.pos_stride_n;
  Out* __restrict__ out = static_cast<Out*>(a.out) + t * a.dim;

  auto step = [&](int64_t d, auto width) {
    constexpr int W = decltype(width)::value;
    float v[W];
    load<W>(src + d * a.src_stride_d, v);
    if constexpr (!std::is_void_v<Pos>) {
      float p[W];
      load<W>(pos + d * a.pos_stride_d, p);
#pragma unroll
      for (int k = 0; k < W; ++k) v[k] += p[k];
    }
    store<W>(out + d, v);
  };
  if (vectorized) {
    for (int64_t d = lane * kVec; d < a.dim; d += 32 * kVec) step(d, Width<kVec>{});
  } else {
    for (int64_t d = lane; d < a.dim; d += 32) step(d, Width<1>{});
  }
}

template <typename Grad, typename GradX>
__global__ void gather_backward_kernel(const __grid_constant__ GatherBackwardArgs a, const bool vectorized) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= a.rows) return;
  const int lane = threadIdx.x % 32;
  const Grad* __restrict__ grad = static_cast<const Grad*>(a.grad);
  GradX* __restrict__ out = static_cast<GradX*>(a.grad_x) + row * a.dim;

  auto step = [&](int64_t d, auto width) {
    constexpr int W = decltype(width)::value;
    float acc[W] = {};
    for (int g = 0; g < a.groups; ++g) {
      const int64_t t = a.inv[g * a.rows + row];
      if (t < 0) continue;
      float v[W];
      load<W>(grad + t * a.dim + d, v);
#pragma unroll
      for (int k = 0; k < W; ++k) acc[k] += v[k];
    }
    store<W>(out + d, acc);
  };
  if (vectorized) {
    for (int64_t d = lane * kVec; d < a.dim; d += 32 * kVec) step(d, Width<kVec>{});
  } else {
    for (int64_t d = lane; d < a.dim; d += 32) step(d, Width<1>{});
  }
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock); }

}  // namespace

// The output dtype is the source's or float32 (the promotion of two different 16-bit types,
// or of a 16-bit type with float32); bindings.cpp checks it.
cudaError_t launch_gather_forward(const GatherForwardArgs& a, cudaStream_t stream) {
  if (a.tokens == 0 || a.dim == 0) return cudaSuccess;
  const bool vectorized = a.dim % kVec == 0 && aligned16(a.out) && aligned16(a.src) && a.src_stride_d == 1 &&
                          a.src_stride_b % kVec == 0 && a.src_stride_n % kVec == 0 &&
                          (!a.pos || (aligned16(a.pos) && a.pos_stride_d == 1 && a.pos_stride_n % kVec == 0));
  return dispatch_float(a.src_dtype, [&](auto src) {
    using Src = decltype(src);
    auto with_pos = [&](auto pos) {
      using Pos = typename decltype(pos)::type;
      if (a.out_dtype == DType::Float32) gather_forward_kernel<Src, Pos, float><<<row_blocks(a.tokens), kRowThreads, 0, stream>>>(a, vectorized);
      else gather_forward_kernel<Src, Pos, Src><<<row_blocks(a.tokens), kRowThreads, 0, stream>>>(a, vectorized);
      return cudaGetLastError();
    };
    if (!a.pos) return with_pos(TypeTag<void>{});
    return dispatch_float(a.pos_dtype, [&](auto pos) { return with_pos(TypeTag<decltype(pos)>{}); });
  });
}

// The gradient's dtype is grad_x's or float32 (the forward's output dtype).
cudaError_t launch_gather_backward(const GatherBackwardArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.dim == 0) return cudaSuccess;
  const bool vectorized = a.dim % kVec == 0 && aligned16(a.grad_x) && aligned16(a.grad);
  return dispatch_float(a.grad_x_dtype, [&](auto grad_x) {
    using GradX = decltype(grad_x);
    if (a.grad_dtype == DType::Float32) gather_backward_kernel<float, GradX><<<row_blocks(a.rows), kRowThreads, 0, stream>>>(a, vectorized);
    else gather_backward_kernel<GradX, GradX><<<row_blocks(a.rows), kRowThreads, 0, stream>>>(a, vectorized);
    return cudaGetLastError();
  });
}

}  // namespace fastjepa
