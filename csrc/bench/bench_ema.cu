// The multi-tensor EMA over ViT-H/14's parameters (fp32 targets and onlines, no shadow):
// 12 bytes per parameter. `nsys profile` / `ncu` target; see README.md ("CUDA kernels").
#include <numeric>

#include "bench_common.cuh"

int main(int argc, char** argv) {
  const bench::Options options = bench::parse(argc, argv, "EMA of ViT-H/14's 389 fp32 parameter tensors");
  const std::vector<int64_t> numels = bench::vit_h14_numels();
  const int64_t params = std::accumulate(numels.begin(), numels.end(), int64_t(0));
  const double ceiling = bench::copy_gbs();

  fastjepa::EmaArgs args;
  args.numels = numels;
  for (size_t i = 0; i < numels.size(); ++i) {
    args.targets.push_back(bench::random_buffer<float>(numels[i], -1, 1, 2 * i));
    args.onlines.push_back(bench::random_buffer<float>(numels[i], -1, 1, 2 * i + 1));
  }
  args.momentum = bench::random_buffer<float>(1, 0.996f, 0.996f, 0);

  double ms;
  {
    bench::ProfiledRegion profiled;
    ms = bench::median_ms("ema_update", options.iters, [&] { CHECK(fastjepa::launch_ema(args, nullptr)); });
  }
  const double gbs = 12.0 * params / ms / 1e6;
  std::printf("bench_ema: ViT-H/14, %zu tensors, %.1f M fp32 params: median %.3f ms, %.0f GB/s (12 B/param), %.1f%% of copy (%.0f GB/s)\n",
              numels.size(), params / 1e6, ms, gbs, 100 * gbs / ceiling, ceiling);
  return 0;
}
