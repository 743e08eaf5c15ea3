// Shared by the standalone benchmarks: error checks, synthetic data, timing in NVTX ranges,
// the profiled region (cudaProfilerStart to cudaProfilerStop) and ViT-H/14's sizes.
#pragma once

#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#ifdef FASTJEPA_NVTX
#include <nvtx3/nvToolsExt.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../common.cuh"

namespace bench {

inline void check(cudaError_t error, const char* call, int line) {
  if (error != cudaSuccess) {
    std::fprintf(stderr, "line %d: %s failed: %s: %s\n", line, call, cudaGetErrorName(error), cudaGetErrorString(error));
    std::exit(1);
  }
}
#define CHECK(call) bench::check((call), #call, __LINE__)

// An NVTX range for as long as it lives (nothing without NVTX).
struct Range {
  explicit Range(const char* name) {
#ifdef FASTJEPA_NVTX
    nvtxRangePushA(name);
#endif
    (void)name;
  }
  ~Range() {
#ifdef FASTJEPA_NVTX
    nvtxRangePop();
#endif
  }
};

template <typename T>
__global__ void fill_kernel(T* p, int64_t n, float lo, float hi, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed * 2246822519u;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    p[i] = fastjepa::from_float<T>(lo + (hi - lo) * (h >> 8) * (1.0f / 16777216.0f));
  }
}

// A device buffer of n pseudo-random values in [lo, hi) (all lo when lo == hi).
template <typename T>
T* random_buffer(int64_t n, float lo, float hi, uint32_t seed) {
  T* p = nullptr;
  CHECK(cudaMalloc(&p, std::max<int64_t>(n, 1) * sizeof(T)));
  fill_kernel<<<1024, 256>>>(p, n, lo, hi, seed);
  CHECK(cudaGetLastError());
  return p;
}

struct Options {
  int iters = 20;
};

inline Options parse(int argc, char** argv, const char* usage) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--iters") && i + 1 < argc) {
      options.iters = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--iters N]\n%s\n", argv[0], usage);
      std::exit(2);
    }
  }
  if (options.iters < 1) {
    std::fprintf(stderr, "--iters must be at least 1\n");
    std::exit(2);
  }
  return options;
}

// The region profilers capture (nsys --capture-range=cudaProfilerApi, ncu --profile-from-start
// off): from construction to destruction.
struct ProfiledRegion {
  ProfiledRegion() { CHECK(cudaProfilerStart()); }
  ~ProfiledRegion() { CHECK(cudaProfilerStop()); }
};

// Median time of run() in ms over `iters` runs after 3 warm-up runs, each run timed with
// CUDA events inside an NVTX range `name`.
template <typename Run>
double median_ms(const char* name, int iters, Run&& run) {
  for (int i = 0; i < 3; ++i) run();
  CHECK(cudaDeviceSynchronize());
  std::vector<cudaEvent_t> events(2 * iters);
  for (auto& e : events) CHECK(cudaEventCreate(&e));
  for (int i = 0; i < iters; ++i) {
    Range range(name);
    CHECK(cudaEventRecord(events[2 * i]));
    run();
    CHECK(cudaEventRecord(events[2 * i + 1]));
  }
  CHECK(cudaDeviceSynchronize());
  std::vector<float> times(iters);
  for (int i = 0; i < iters; ++i) CHECK(cudaEventElapsedTime(&times[i], events[2 * i], events[2 * i + 1]));
  for (auto& e : events) CHECK(cudaEventDestroy(e));
  std::sort(times.begin(), times.end());
  return times[iters / 2];
}

// Device-to-device copy bandwidth in GB/s (bytes read + written), the ceiling to compare with.
inline double copy_gbs() {
  const size_t bytes = size_t(1) << 30;
  void *src = nullptr, *dst = nullptr;
  CHECK(cudaMalloc(&src, bytes));
  CHECK(cudaMalloc(&dst, bytes));
  CHECK(cudaMemset(src, 1, bytes));
  const double ms = median_ms("copy ceiling", 10, [&] { CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); });
  CHECK(cudaFree(src));
  CHECK(cudaFree(dst));
  return 2.0 * bytes / ms / 1e6;
}

// The parameter sizes of the ViT-H/14 encoder at 224 px, in its parameter order: position
// embedding, patch embedding, 32 blocks, final norm (389 tensors, 632 M values).
inline std::vector<int64_t> vit_h14_numels() {
  const int64_t D = 1280, hidden = 4 * D, patches = 256;
  std::vector<int64_t> numels = {patches * D, D * 3 * 14 * 14, D};
  for (int block = 0; block < 32; ++block) {
    const std::vector<int64_t> b = {D, D, 3 * D * D, 3 * D, D * D, D, D, D, hidden * D, hidden, D * hidden, D};
    numels.insert(numels.end(), b.begin(), b.end());
  }
  numels.push_back(D);
  numels.push_back(D);
  return numels;
}

}  // namespace bench
