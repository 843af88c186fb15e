// Launchers of the CUDA kernels: raw pointers in (the params structs), a stream, no torch.
// GSA_LAUNCH is kernel<<<grid, block, shared bytes, stream>>>(args) under nvcc and the SIMT
// emulation's launch helper under g++, so the emulated tests also check the launch geometry.
#pragma once
#include "gaussian_kernels.cuh"
#include "local_kernels.cuh"
#include "mixture_kernels.cuh"

#if defined(__CUDACC__)
#define GSA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#else
#define GSA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::gsa::emu::launch(kernel, grid, block, smem, stream, __VA_ARGS__)
#endif

namespace gsa::cuda {

// project (when r > 0), then apply; p.coeffs holds p.splits x B x r values. Row tiles (of the
// p.rows tile rows) go on gridDim.x; the T steps on gridDim.z, in launches of at most kMaxGridYZ
// steps.
template <typename In, typename Acc>
cudaError_t launch_gaussian_map(const GaussianMapParams<In, Acc>& p, cudaStream_t stream) {
  const dim3 block(kTile, kTileRowsPerPass);
  if (p.r > 0) {
    auto project = gaussian_project_kernel<In, Acc>;
    const dim3 grid(ceil_div(p.rows, kTile), ceil_div(p.r, kTile), p.splits);
    GSA_LAUNCH(project, grid, block, sizeof(ProjectShared<Acc>), stream, p);
  }
  auto apply = gaussian_apply_kernel<In, Acc>;
  for (int64_t t0 = 0; t0 < p.T; t0 += kMaxGridYZ) {
    GaussianMapParams<In, Acc> steps = p;  // steps t0 .. t0 + T' - 1
    steps.T = p.T - t0 < kMaxGridYZ ? p.T - t0 : kMaxGridYZ;
    steps.sigma_to += t0 * p.B;
    steps.out += t0 * p.B * p.D;
    const dim3 grid(ceil_div(p.rows, kTile), ceil_div(p.D, kTile), steps.T);
    GSA_LAUNCH(apply, grid, block, sizeof(ApplyShared<Acc>), stream, steps);
  }
  return cudaGetLastError();
}

// the partial softmax states of the component slices, then their merge
template <typename In, typename Acc>
cudaError_t launch_mixture_posterior(const MixtureParams<In, Acc>& p, cudaStream_t stream) {
  const dim3 block(32, kWarps);
  if (p.r == 0) {
    auto delta = mixture_delta_kernel<In, Acc>;
    GSA_LAUNCH(delta, dim3(ceil_div(p.B, kMixtureRows), p.splits), block, sizeof(DeltaShared<Acc>), stream, p);
  } else {
    auto lowrank = mixture_lowrank_kernel<In, Acc>;
    GSA_LAUNCH(lowrank, dim3(ceil_div(p.B, kMixtureRows), p.splits), block, mixture_lowrank_smem_bytes(p.r), stream, p);
  }
  auto merge = mixture_merge_kernel<In, Acc>;
  GSA_LAUNCH(merge, dim3(p.B), dim3(32 * kWarps), 0, stream, p);
  return cudaGetLastError();
}

// one block per kLocalThreads query pixels of a row (blocks of a row adjacent on gridDim.x)
template <typename In, typename Acc>
cudaError_t launch_local_posterior(const LocalParams<In, Acc>& p, cudaStream_t stream) {
  auto kernel = local_posterior_kernel<In, Acc>;
  const int64_t blocks = p.B * ceil_div(p.H * p.W, kLocalThreads);
  GSA_LAUNCH(kernel, dim3(unsigned(blocks)), dim3(kLocalThreads), sizeof(LocalShared), stream, p);
  return cudaGetLastError();
}

}  // namespace gsa::cuda
