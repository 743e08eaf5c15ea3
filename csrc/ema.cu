// Multi-tensor EMA of the target encoder: target <- m * target + (1 - m) * online, and the new
// target written to a shadow copy in its dtype in the same pass. One read of target and
// online and one write of target (and shadow) per element: 12 bytes per fp32 parameter.
#include "multi_tensor.cuh"

namespace fastjepa {
namespace {

// Shadow = void: no shadow.
template <typename Online, typename Shadow>
__global__ void ema_kernel(const __grid_constant__ TensorList<3> list, const float* __restrict__ momentum) {
  const BlockChunk c = block_chunk(list);
  float* __restrict__ target = static_cast<float*>(list.ptr[0][c.tensor]);
  const Online* __restrict__ online = static_cast<const Online*>(list.ptr[1][c.tensor]);
  void* shadow = list.ptr[2][c.tensor];
  const float m = *momentum;
  const bool vectorized = aligned16(target) && aligned16(online) && (std::is_void_v<Shadow> || aligned16(shadow));

  for_each_in_chunk(c.start, c.end, vectorized, [&](int64_t j, auto width) {
    constexpr int W = decltype(width)::value;
    float t[W], o[W];
    load<W>(target + j, t);
    load<W>(online + j, o);
#pragma unroll
    for (int k = 0; k < W; ++k) t[k] = m * t[k] + (1.0f - m) * o[k];
    store<W>(target + j, t);
    if constexpr (!std::is_void_v<Shadow>) store<W>(static_cast<Shadow*>(shadow) + j, t);
  });
}

}  // namespace

cudaError_t launch_ema(const EmaArgs& args, cudaStream_t stream) {
  const bool has_shadow = !args.shadows.empty();
  std::vector<std::array<void*, 3>> ptrs(args.targets.size());
  for (size_t i = 0; i < ptrs.size(); ++i)
    ptrs[i] = {args.targets[i], const_cast<void*>(args.onlines[i]), has_shadow ? args.shadows[i] : nullptr};

  return dispatch_float(args.online_dtype, [&](auto online) {
    using Online = decltype(online);
    auto run = [&](auto kernel) {
      return launch_tensor_lists<3>(ptrs, args.numels, {}, [&](const TensorList<3>& list) {
        kernel<<<list_grid(list), kThreads, 0, stream>>>(list, args.momentum);
        return cudaGetLastError();
      });
    };
    if (!has_shadow) return run(ema_kernel<Online, void>);
    return dispatch_float(args.shadow_dtype, [&](auto shadow) { return run(ema_kernel<Online, decltype(shadow)>); });
  });
}

}  // namespace fastjepa
