// Self-test of the SIMT emulation (csrc/include/gsa/simt_emu.h), built and run by
// tests/test_cuda_backend.py::test_emulation_self_test. Each kernel that needs a barrier or a
// warp exchange has a broken twin; the emulation must run the good ones right, give the broken
// ones a wrong answer, and turn a hang into an error. Prints "<case> correct|wrong|error: ...".
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "gsa/simt_emu.h"
#include "kernel_common.cuh"

using gsa::cuda::block_sum;
using gsa::cuda::warp_sum;

constexpr int kN = 64;

struct Reverse {
  int v[kN];
};

// out[t] = (N - 1 - t)^2: each thread writes its square, then reads its mirror's.
template <bool kBarrier>
__global__ void reverse_kernel(int* out) {
  GSA_SHARED_STRUCT(Reverse, sm);
  const int t = threadIdx.x;
  sm.v[t] = t * t;
  if (kBarrier) __syncthreads();
  out[t] = sm.v[kN - 1 - t];
}

// Streams 4 tiles of kN values through one shared tile: out[t] = sum over tiles of the mirror
// element. Without the trailing barrier a fast thread overwrites the tile under slow readers.
template <bool kTrailingBarrier>
__global__ void tile_reuse_kernel(int* out) {
  GSA_SHARED_STRUCT(Reverse, sm);
  const int t = threadIdx.x;
  int acc = 0;
  for (int tile = 0; tile < 4; ++tile) {
    sm.v[t] = tile * 1000 + t;
    __syncthreads();
    acc += sm.v[kN - 1 - t];
    if (kTrailingBarrier) __syncthreads();
  }
  out[t] = acc;
}

struct Scratch {
  float v[gsa::cuda::kWarps * 2];
};

// Block of (32, 8): out[0] = sum of all thread ids via block_sum; out[1 + warp] = warp sums.
template <bool kRightOffsets>
__global__ void sum_kernel(float* out) {
  GSA_SHARED_STRUCT(Scratch, sm);
  const int tid = threadIdx.y * 32 + threadIdx.x;
  float v = float(tid);
  float w;
  if (kRightOffsets) {
    w = warp_sum(v);
  } else {  // a butterfly that skips offset 16: sums only half of each warp
    w = v;
    for (int offset = 8; offset > 0; offset >>= 1) w += __shfl_xor_sync(0xffffffffu, w, offset);
  }
  float both[2] = {v, float(1)};
  block_sum(both, sm.v);
  if (tid == 0) out[0] = both[0];
  if (threadIdx.x == 0) out[1 + threadIdx.y] = w;
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) __syncthreads();  // half the block never arrives
  out[threadIdx.x] = 1;
}

__global__ void two_barriers_kernel(int* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

template <typename F>
void report(const char* name, F&& run_and_check) {
  try {
    std::printf("%s %s\n", name, run_and_check() ? "correct" : "wrong");
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    const char* kind = msg.find("deadlock") != std::string::npos                 ? "deadlock"
                       : msg.find("different __syncthreads") != std::string::npos ? "different __syncthreads"
                                                                                  : msg.c_str();
    std::printf("%s error: %s\n", name, kind);
  }
}

int main() {
  std::vector<int> ints(kN);
  auto reverse_ok = [&](auto kernel) {
    gsa::emu::launch(kernel, dim3(2), dim3(kN), sizeof(Reverse), nullptr, ints.data());
    for (int t = 0; t < kN; ++t)
      if (ints[t] != (kN - 1 - t) * (kN - 1 - t)) return false;
    return true;
  };
  report("reverse_with_barrier", [&] { return reverse_ok(reverse_kernel<true>); });
  report("reverse_without_barrier", [&] { return reverse_ok(reverse_kernel<false>); });

  auto tile_ok = [&](auto kernel) {
    gsa::emu::launch(kernel, dim3(1), dim3(kN), sizeof(Reverse), nullptr, ints.data());
    for (int t = 0; t < kN; ++t)
      if (ints[t] != 6000 + 4 * (kN - 1 - t)) return false;
    return true;
  };
  report("tile_reuse_with_barrier", [&] { return tile_ok(tile_reuse_kernel<true>); });
  report("tile_reuse_without_trailing_barrier", [&] { return tile_ok(tile_reuse_kernel<false>); });

  std::vector<float> sums(1 + gsa::cuda::kWarps);
  auto sums_ok = [&](auto kernel) {
    gsa::emu::launch(kernel, dim3(1), dim3(32, gsa::cuda::kWarps), sizeof(Scratch), nullptr, sums.data());
    const int n = 32 * gsa::cuda::kWarps;
    if (sums[0] != float(n * (n - 1) / 2)) return false;
    for (int w = 0; w < gsa::cuda::kWarps; ++w)
      if (sums[1 + w] != float(32 * 32 * w + 32 * 31 / 2)) return false;
    return true;
  };
  report("warp_and_block_sum", [&] { return sums_ok(sum_kernel<true>); });
  report("warp_sum_wrong_offsets", [&] { return sums_ok(sum_kernel<false>); });

  report("divergent_barrier", [&] {
    gsa::emu::launch(divergent_barrier_kernel, dim3(1), dim3(32), 0, nullptr, ints.data());
    return true;
  });
  report("barriers_at_different_lines", [&] {
    gsa::emu::launch(two_barriers_kernel, dim3(1), dim3(32), 0, nullptr, ints.data());
    return true;
  });
  return 0;
}
