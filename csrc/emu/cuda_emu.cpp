// The CUDA kernels of csrc/cuda, compiled for the host through the SIMT emulation
// (gsa/simt_emu.h) and registered for CPU tensors as gsa_kernels::cuda_emu_* (tests only:
// backend="cuda" with GSA_KERNELS_CUDA_EMULATE=1). Same kernel sources, launchers and
// validation as the CUDA binding; only the launcher policy differs.
#include <torch/library.h>

#include <limits>

#include "../cuda/op_bindings.h"
// after the torch headers: the emulation defines CUDA keywords as macros
#include "gsa/simt_emu.h"
#include "../cuda/launchers.cuh"

namespace gsa::cuda {
namespace {

struct EmulatedLauncher {
  static constexpr c10::DeviceType device_type = c10::DeviceType::CPU;
  struct Guard {
    explicit Guard(at::Device) {}
  };

  // A pretend GPU of 4 multiprocessors: small enough that the tests' shapes use the split-D
  // projection once D spans 8 or more tiles.
  static int multiprocessors(const at::Tensor&) { return 4; }

  // Outputs and workspaces start as NaN, so a kernel that reads a workspace before writing it,
  // or leaves part of an output unwritten, fails the tests (at::empty is often zeroed memory).
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  }

  template <typename In, typename Acc>
  static void gaussian_map(const GaussianMapParams<In, Acc>& p) {
    launch_gaussian_map(p, nullptr);
  }

  template <typename In, typename Acc>
  static void mixture_posterior(const MixtureParams<In, Acc>& p) {
    launch_mixture_posterior(p, nullptr);
  }
};

at::Tensor gaussian_map_emu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                            const at::Tensor& eigvals, double residual_var, const at::Tensor& sigma_from,
                            const at::Tensor& sigma_to, const at::Tensor& scale_from, const at::Tensor& scale_to,
                            int64_t kind) {
  return gaussian_map<EmulatedLauncher>(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from,
                                        scale_to, kind, "cuda_emu_gaussian_map");
}

at::Tensor gaussian_trajectory_emu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                                   const at::Tensor& eigvals, double residual_var, const at::Tensor& sigmas) {
  return gaussian_trajectory<EmulatedLauncher>(x, mean, basis, eigvals, residual_var, sigmas,
                                               "cuda_emu_gaussian_trajectory");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_posterior_emu(
    const at::Tensor& x, const at::Tensor& means, const at::Tensor& bases, const at::Tensor& eigvals,
    const at::Tensor& residual_var, const at::Tensor& log_weights, const at::Tensor& sigma, bool need_denoised,
    bool need_weights) {
  return mixture_posterior<EmulatedLauncher>(x, means, bases, eigvals, residual_var, log_weights, sigma,
                                             need_denoised, need_weights, "cuda_emu_mixture_posterior");
}

at::Tensor gaussian_map_labeled_emu(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& means,
                                    const at::Tensor& bases, const at::Tensor& eigvals, const at::Tensor& residual_var,
                                    const at::Tensor& sigma_from, const at::Tensor& sigma_to,
                                    const at::Tensor& scale_from, const at::Tensor& scale_to, int64_t kind) {
  return gaussian_map_labeled<EmulatedLauncher>(x, labels, means, bases, eigvals, residual_var, sigma_from, sigma_to,
                                                scale_from, scale_to, kind, "cuda_emu_gaussian_map_labeled");
}

at::Tensor gaussian_trajectory_labeled_emu(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& means,
                                           const at::Tensor& bases, const at::Tensor& eigvals,
                                           const at::Tensor& residual_var, const at::Tensor& sigmas) {
  return gaussian_trajectory_labeled<EmulatedLauncher>(x, labels, means, bases, eigvals, residual_var, sigmas,
                                                       "cuda_emu_gaussian_trajectory_labeled");
}

}  // namespace
}  // namespace gsa::cuda

TORCH_LIBRARY_IMPL(gsa_kernels, CPU, m) {
  m.impl("cuda_emu_gaussian_map", &gsa::cuda::gaussian_map_emu);
  m.impl("cuda_emu_gaussian_trajectory", &gsa::cuda::gaussian_trajectory_emu);
  m.impl("cuda_emu_mixture_posterior", &gsa::cuda::mixture_posterior_emu);
  m.impl("cuda_emu_gaussian_map_labeled", &gsa::cuda::gaussian_map_labeled_emu);
  m.impl("cuda_emu_gaussian_trajectory_labeled", &gsa::cuda::gaussian_trajectory_labeled_emu);
}
