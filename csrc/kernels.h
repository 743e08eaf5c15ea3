// Host API of the kernels in csrc/: raw device pointers, sizes and a stream; no PyTorch.
// Used by the Python module (bindings.cpp) and by the standalone benchmarks (bench/).
// The launchers trust their arguments: bindings.cpp validates what Python passes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

namespace fastjepa {

enum class DType { Float32, BFloat16, Float16 };

// The most elements a tensor of a multi-tensor op may have (bindings.cpp checks it): far
// beyond any GPU's memory, and small enough for 32-bit chunk counts.
constexpr int64_t kMaxNumel = int64_t(1) << 40;

// ---------------------------------------------------------------------------------- EMA
// target <- m * target + (1 - m) * online over every tensor (fp32 targets), m read from
// device memory; with shadows, the new target is also written in shadow_dtype.
struct EmaArgs {
  std::vector<float*> targets;
  std::vector<const void*> onlines;
  std::vector<void*> shadows;  // empty: no shadow
  std::vector<int64_t> numels;
  DType online_dtype = DType::Float32;
  DType shadow_dtype = DType::Float32;
  const float* momentum = nullptr;  // 0-d fp32 device tensor
};
cudaError_t launch_ema(const EmaArgs& args, cudaStream_t stream);

// --------------------------------------------------------------------- fused AdamW + EMA
// torch.optim.AdamW's step (decoupled weight decay, bias correction with the step count),
// then the EMA of the new parameter into the target (and its shadow). All fp32 except the
// shadow. lr and weight_decay are per-group device arrays; tensor i uses group groups[i];
// step is the 1-based step count in device memory.
struct AdamWEmaArgs {
  std::vector<float*> params;
  std::vector<const float*> grads;
  std::vector<float*> exp_avgs;
  std::vector<float*> exp_avg_sqs;
  std::vector<float*> targets;  // empty: AdamW only
  std::vector<void*> shadows;   // empty: no shadow
  std::vector<int64_t> numels;
  std::vector<int32_t> groups;
  DType shadow_dtype = DType::Float32;
  const float* lr = nullptr;
  const float* weight_decay = nullptr;
  const float* step = nullptr;
  const float* momentum = nullptr;  // needed with targets
  const bool* skip = nullptr;  // nullptr: never skip; else a device flag, true: the step leaves every tensor as it was
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;  // Python floats, as torch.optim.AdamW takes them
};
cudaError_t launch_adamw_ema(const AdamWEmaArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------- packed-token gather
// out[t, :] = src[row of t, :] + pos[idx[t], :] (fp32 arithmetic, one rounding), out is
// contiguous (tokens, dim); src and pos may have any strides (in elements).
enum class GatherMode { Gather = 0, SameRow = 1, OneRow = 2 };  // = kernels/gather.py's GATHER, SAME_ROW, ONE_ROW

struct GatherForwardArgs {
  void* out = nullptr;
  const void* src = nullptr;
  const void* pos = nullptr;  // nullptr: no position table
  const void* idx = nullptr;  // int32 or int64 token ids, (tokens,)
  const int32_t* token_row = nullptr;  // packed Gather: the row of each token; nullptr: row = t / k
  bool idx_int64 = false;
  GatherMode mode = GatherMode::Gather;
  DType out_dtype = DType::Float32, src_dtype = DType::Float32, pos_dtype = DType::Float32;
  int64_t tokens = 0, dim = 0, k = 1, batch = 1;
  int64_t src_stride_b = 0, src_stride_n = 0, src_stride_d = 1;
  int64_t pos_stride_n = 0, pos_stride_d = 1;
};
cudaError_t launch_gather_forward(const GatherForwardArgs& args, cudaStream_t stream);

// grad_x[row, :] = sum over g of grad[inv[g * rows + row], :] (fp32 sum, skipping -1), every
// row written once; grad (tokens, dim) and grad_x (rows, dim) contiguous.
struct GatherBackwardArgs {
  void* grad_x = nullptr;
  const void* grad = nullptr;
  const int32_t* inv = nullptr;  // (groups * rows,)
  DType grad_x_dtype = DType::Float32, grad_dtype = DType::Float32;
  int64_t rows = 0, dim = 0;
  int32_t groups = 1;
};
cudaError_t launch_gather_backward(const GatherBackwardArgs& args, cudaStream_t stream);

}  // namespace fastjepa
