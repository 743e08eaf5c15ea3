// The fused AdamW + EMA step over ViT-H/14's parameters (fp32, one group, targets, no shadow):
// reads grad, param, both moments and target, writes param, moments and target: 36 bytes
// per parameter. `nsys profile` / `ncu` target; see README.md ("CUDA kernels").
#include <numeric>

#include "bench_common.cuh"

int main(int argc, char** argv) {
  const bench::Options options = bench::parse(argc, argv, "fused AdamW + EMA over ViT-H/14's 389 fp32 parameter tensors");
  const std::vector<int64_t> numels = bench::vit_h14_numels();
  const int64_t params = std::accumulate(numels.begin(), numels.end(), int64_t(0));
  const double ceiling = bench::copy_gbs();

  fastjepa::AdamWEmaArgs args;
  args.numels = numels;
  args.groups.assign(numels.size(), 0);
  for (size_t i = 0; i < numels.size(); ++i) {
    const uint32_t seed = 8 * i;
    args.params.push_back(bench::random_buffer<float>(numels[i], -1, 1, seed));
    args.grads.push_back(bench::random_buffer<float>(numels[i], -1e-2f, 1e-2f, seed + 1));
    args.exp_avgs.push_back(bench::random_buffer<float>(numels[i], -1e-3f, 1e-3f, seed + 2));
    args.exp_avg_sqs.push_back(bench::random_buffer<float>(numels[i], 1e-6f, 1e-5f, seed + 3));
    args.targets.push_back(bench::random_buffer<float>(numels[i], -1, 1, seed + 4));
  }
  args.lr = bench::random_buffer<float>(1, 1e-4f, 1e-4f, 0);
  args.weight_decay = bench::random_buffer<float>(1, 0.04f, 0.04f, 0);
  args.step = bench::random_buffer<float>(1, 100, 100, 0);
  args.momentum = bench::random_buffer<float>(1, 0.996f, 0.996f, 0);

  double ms;
  {
    bench::ProfiledRegion profiled;
    ms = bench::median_ms("adamw_ema", options.iters, [&] { CHECK(fastjepa::launch_adamw_ema(args, nullptr)); });
  }
  const double gbs = 36.0 * params / ms / 1e6;
  std::printf("bench_adamw_ema: ViT-H/14, %zu tensors, %.1f M fp32 params: median %.3f ms, %.0f GB/s (36 B/param), %.1f%% of copy (%.0f GB/s)\n",
              numels.size(), params / 1e6, ms, gbs, 100 * gbs / ceiling, ceiling);
  return 0;
}
