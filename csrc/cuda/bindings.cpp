// Torch binding of the CUDA kernels: gsa_kernels::{gaussian_map, gaussian_trajectory,
// mixture_posterior, gaussian_map_labeled, gaussian_trajectory_labeled} for CUDA tensors, on the current stream (no host synchronisation).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "launchers.h"
#include "op_bindings.h"

namespace gsa::cuda {
namespace {

struct CudaLauncher {
  static constexpr c10::DeviceType device_type = c10::DeviceType::CUDA;
  using Guard = c10::cuda::CUDAGuard;

  static int multiprocessors(const at::Tensor& x) {
    static std::array<int, 64> cached{};  // per device index; 0 = not asked yet
    const int device = x.get_device();
    if (device < 0 || device >= int(cached.size())) return 1;
    if (cached[device] == 0) {
      int count = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
      cached[device] = count;
    }
    return cached[device];
  }

  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options);
  }

  template <typename In, typename Acc>
  static void gaussian_map(const GaussianMapParams<In, Acc>& p) {
    C10_CUDA_CHECK(launch_gaussian_map(p, c10::cuda::getCurrentCUDAStream().stream()));
  }

  template <typename In, typename Acc>
  static void mixture_posterior(const MixtureParams<In, Acc>& p) {
    C10_CUDA_CHECK(launch_mixture_posterior(p, c10::cuda::getCurrentCUDAStream().stream()));
  }
};

at::Tensor gaussian_map_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                             const at::Tensor& eigvals, double residual_var, const at::Tensor& sigma_from,
                             const at::Tensor& sigma_to, const at::Tensor& scale_from,
                             const at::Tensor& scale_to, int64_t kind,
                             const std::optional<at::Tensor>& /*basis_rows: CPU only*/) {
  return gaussian_map<CudaLauncher>(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to, scale_from,
                                    scale_to, kind, "gaussian_map");
}

at::Tensor gaussian_trajectory_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                                    const at::Tensor& eigvals, double residual_var, const at::Tensor& sigmas,
                                    const std::optional<at::Tensor>& /*basis_rows: CPU only*/) {
  return gaussian_trajectory<CudaLauncher>(x, mean, basis, eigvals, residual_var, sigmas, "gaussian_trajectory");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_posterior_cuda(
    const at::Tensor& x, const at::Tensor& means, const at::Tensor& bases, const at::Tensor& eigvals,
    const at::Tensor& residual_var, const at::Tensor& log_weights, const at::Tensor& sigma, bool need_denoised,
    bool need_weights, const std::optional<at::Tensor>& /*forward_panels: CPU only*/,
    const std::optional<at::Tensor>& /*backward_panels: CPU only*/) {
  return mixture_posterior<CudaLauncher>(x, means, bases, eigvals, residual_var, log_weights, sigma,
                                         need_denoised, need_weights, "mixture_posterior");
}

at::Tensor gaussian_map_labeled_cuda(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& means,
                                     const at::Tensor& bases, const at::Tensor& eigvals, const at::Tensor& residual_var,
                                     const at::Tensor& sigma_from, const at::Tensor& sigma_to,
                                     const at::Tensor& scale_from, const at::Tensor& scale_to, int64_t kind) {
  return gaussian_map_labeled<CudaLauncher>(x, labels, means, bases, eigvals, residual_var, sigma_from, sigma_to,
                                            scale_from, scale_to, kind, "gaussian_map_labeled");
}

at::Tensor gaussian_trajectory_labeled_cuda(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& means,
                                            const at::Tensor& bases, const at::Tensor& eigvals,
                                            const at::Tensor& residual_var, const at::Tensor& sigmas) {
  return gaussian_trajectory_labeled<CudaLauncher>(x, labels, means, bases, eigvals, residual_var, sigmas,
                                                   "gaussian_trajectory_labeled");
}

}  // namespace
}  // namespace gsa::cuda

TORCH_LIBRARY_IMPL(gsa_kernels, CUDA, m) {
  m.impl("gaussian_map", &gsa::cuda::gaussian_map_cuda);
  m.impl("gaussian_trajectory", &gsa::cuda::gaussian_trajectory_cuda);
  m.impl("mixture_posterior", &gsa::cuda::mixture_posterior_cuda);
  m.impl("gaussian_map_labeled", &gsa::cuda::gaussian_map_labeled_cuda);
  m.impl("gaussian_trajectory_labeled", &gsa::cuda::gaussian_trajectory_labeled_cuda);
}
