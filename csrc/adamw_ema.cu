// Fused AdamW + EMA: one pass that reads grad, param, exp_avg, exp_avg_sq (and target) and
// writes param, both moments (and target, shadow). The step follows torch.optim.AdamW
// (decoupled weight decay, bias correction), operation by operation in fp32 with the scalar
// factors computed in fp64 as Python computes them; the new parameter then goes straight
// into the EMA without being read back from memory.
#include "multi_tensor.cuh"

namespace fastjepa {
namespace {

enum Slot { kGrad, kParam, kExpAvg, kExpAvgSq, kTarget, kShadow, kDepth };

struct Hyper {
  const float* lr;            // per group
  const float* weight_decay;  // per group
  const float* step;
  const float* momentum;
  const bool* skip;  // nullptr: never; else *skip true leaves every tensor as it was
  double beta1, beta2, eps;
};

// torch.lerp's formula: exact at both ends.
__device__ __forceinline__ float lerp(float self, float end, float weight) {
  return fabsf(weight) < 0.5f ? self + weight * (end - self) : end - (end - self) * (1.0f - weight);
}

// HAS_TARGET = false: AdamW only. Shadow = void: no shadow.
template <bool HAS_TARGET, typename Shadow>
__global__ void adamw_ema_kernel(const __grid_constant__ TensorList<kDepth> list, const Hyper h) {
  if (h.skip != nullptr && *h.skip) return;
  const BlockChunk c = block_chunk(list);
  const float* __restrict__ grad = static_cast<const float*>(list.ptr[kGrad][c.tensor]);
  float* __restrict__ param = static_cast<float*>(list.ptr[kParam][c.tensor]);
  float* __restrict__ exp_avg = static_cast<float*>(list.ptr[kExpAvg][c.tensor]);
  float* __restrict__ exp_avg_sq = static_cast<float*>(list.ptr[kExpAvgSq][c.tensor]);
  float* __restrict__ target = static_cast<float*>(list.ptr[kTarget][c.tensor]);
  void* shadow = list.ptr[kShadow][c.tensor];
  bool vectorized = aligned16(grad) && aligned16(param) && aligned16(exp_avg) && aligned16(exp_avg_sq);
  if constexpr (HAS_TARGET) vectorized = vectorized && aligned16(target) && (std::is_void_v<Shadow> || aligned16(shadow));

  const int g = list.group[c.tensor];
  const double lr = h.lr[g], step = *h.step;
  const float decay = static_cast<float>(1.0 - lr * h.weight_decay[g]);
  const float w1 = static_cast<float>(1.0 - h.beta1);
  const float beta2 = static_cast<float>(h.beta2);
  const float w2 = static_cast<float>(1.0 - h.beta2);
  const float neg_step_size = static_cast<float>(-lr / (1.0 - pow(h.beta1, step)));
  const float bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(h.beta2, step)));
  const float eps = static_cast<float>(h.eps);
  const float m = HAS_TARGET ? *h.momentum : 0.0f;

  for_each_in_chunk(c.start, c.end, vectorized, [&](int64_t j, auto width) {
    constexpr int W = decltype(width)::value;
    float gr[W], p[W], ea[W], es[W];
    [[maybe_unused]] float t[W];
    load<W>(grad + j, gr);
    load<W>(param + j, p);
    load<W>(exp_avg + j, ea);
    load<W>(exp_avg_sq + j, es);
    if constexpr (HAS_TARGET) load<W>(target + j, t);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      p[k] *= decay;
      ea[k] = lerp(ea[k], gr[k], w1);
      es[k] = es[k] * beta2 + w2 * gr[k] * gr[k];
      p[k] += neg_step_size * ea[k] / (sqrtf(es[k]) / bc2_sqrt + eps);
      if constexpr (HAS_TARGET) t[k] = m * t[k] + (1.0f - m) * p[k];
    }
    store<W>(param + j, p);
    store<W>(exp_avg + j, ea);
    store<W>(exp_avg_sq + j, es);
    if constexpr (HAS_TARGET) store<W>(target + j, t);
    if constexpr (!std::is_void_v<Shadow>) store<W>(static_cast<Shadow*>(shadow) + j, t);
  });
}

}  // namespace

cudaError_t launch_adamw_ema(const AdamWEmaArgs& args, cudaStream_t stream) {
  const bool has_target = !args.targets.empty(), has_shadow = !args.shadows.empty();
  std::vector<std::array<void*, kDepth>> ptrs(args.params.size());
  for (size_t i = 0; i < ptrs.size(); ++i)
    ptrs[i] = {const_cast<float*>(args.grads[i]), args.params[i], args.exp_avgs[i], args.exp_avg_sqs[i],
               has_target ? args.targets[i] : nullptr, has_shadow ? args.shadows[i] : nullptr};
  const Hyper hyper{args.lr, args.weight_decay, args.step, args.momentum, args.skip, args.beta1, args.beta2, args.eps};

  auto run = [&](auto kernel) {
    return launch_tensor_lists<kDepth>(ptrs, args.numels, args.groups, [&](const TensorList<kDepth>& list) {
      kernel<<<list_grid(list), kThreads, 0, stream>>>(list, hyper);
      return cudaGetLastError();
    });
  };
  if (!has_target) return run(adamw_ema_kernel<false, void>);
  if (!has_shadow) return run(adamw_ema_kernel<true, void>);
  return dispatch_float(args.shadow_dtype, [&](auto shadow) { return run(adamw_ema_kernel<true, decltype(shadow)>); });
}

}  // namespace fastjepa
