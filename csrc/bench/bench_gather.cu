// The masked-token gather at ViT-H/14's context shape (B=128, N=256, K=92 tokens per sample,
// D=1280, bf16): forward (read and write B*K*D values) and store-based backward (read B*K*D,
// write all B*N*D). `nsys profile` / `ncu` target; see README.md ("CUDA kernels").
#include <numeric>
#include <random>

#include "bench_common.cuh"

int main(int argc, char** argv) {
  const bench::Options options = bench::parse(argc, argv, "gather forward and backward at ViT-H/14's context shape");
  const int64_t B = 128, N = 256, K = 92, D = 1280, T = B * K;
  const double ceiling = bench::copy_gbs();

  // K distinct tokens per sample, and the inverse map of the backward (-1: not gathered).
  std::mt19937 rng(0);
  std::vector<int32_t> idx(T), inv(B * N, -1);
  std::vector<int32_t> order(N);
  for (int64_t b = 0; b < B; ++b) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (int64_t k = 0; k < K; ++k) {
      idx[b * K + k] = order[k];
      inv[b * N + order[k]] = static_cast<int32_t>(b * K + k);
    }
  }
  int32_t *idx_d = nullptr, *inv_d = nullptr;
  CHECK(cudaMalloc(&idx_d, idx.size() * sizeof(int32_t)));
  CHECK(cudaMalloc(&inv_d, inv.size() * sizeof(int32_t)));
  CHECK(cudaMemcpy(idx_d, idx.data(), idx.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(inv_d, inv.data(), inv.size() * sizeof(int32_t), cudaMemcpyHostToDevice));

  fastjepa::GatherForwardArgs fwd;
  fwd.src = bench::random_buffer<__nv_bfloat16>(B * N * D, -1, 1, 1);
  fwd.out = bench::random_buffer<__nv_bfloat16>(T * D, -1, 1, 2);
  fwd.idx = idx_d;
  fwd.out_dtype = fwd.src_dtype = fastjepa::DType::BFloat16;
  fwd.tokens = T, fwd.dim = D, fwd.k = K, fwd.batch = B;
  fwd.src_stride_b = N * D, fwd.src_stride_n = D, fwd.src_stride_d = 1;

  fastjepa::GatherBackwardArgs bwd;
  bwd.grad = bench::random_buffer<__nv_bfloat16>(T * D, -1, 1, 3);
  bwd.grad_x = bench::random_buffer<__nv_bfloat16>(B * N * D, -1, 1, 4);
  bwd.inv = inv_d;
  bwd.grad_dtype = bwd.grad_x_dtype = fastjepa::DType::BFloat16;
  bwd.rows = B * N, bwd.dim = D, bwd.groups = 1;

  double fwd_ms, bwd_ms;
  {
    bench::ProfiledRegion profiled;
    fwd_ms = bench::median_ms("gather_forward", options.iters, [&] { CHECK(fastjepa::launch_gather_forward(fwd, nullptr)); });
    bwd_ms = bench::median_ms("gather_backward", options.iters, [&] { CHECK(fastjepa::launch_gather_backward(bwd, nullptr)); });
  }
  const double fwd_gbs = 2.0 * T * D * 2 / fwd_ms / 1e6, bwd_gbs = (T + B * N) * D * 2.0 / bwd_ms / 1e6;
  std::printf("bench_gather: B=%lld N=%lld K=%lld D=%lld bf16: forward %.4f ms, %.0f GB/s (%.1f%% of copy); "
              "backward %.4f ms, %.0f GB/s (%.1f%% of copy); copy %.0f GB/s\n",
              (long long)B, (long long)N, (long long)K, (long long)D, fwd_ms, fwd_gbs, 100 * fwd_gbs / ceiling, bwd_ms, bwd_gbs,
              100 * bwd_gbs / ceiling, ceiling);
  return 0;
}
