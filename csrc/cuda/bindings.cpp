// Torch binding of the CUDA kernels: gsa_kernels::{gaussian_map, gaussian_trajectory,
// mixture_posterior, gaussian_map_labeled, gaussian_trajectory_labeled, local_posterior} for CUDA tensors, on the current stream (no host synchronisation).
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
  static constexpr const char* op_prefix = "";
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

  template <typename In, typename Acc>
  static void local_posterior(const LocalParams<In, Acc>& p) {
    C10_CUDA_CHECK(launch_local_posterior(p, c10::cuda::getCurrentCUDAStream().stream()));
  }
};

}  // namespace
}  // namespace gsa::cuda

TORCH_LIBRARY_IMPL(gsa_kernels, CUDA, m) {
  using namespace gsa::cuda;
  using Layout = std::optional<at::Tensor>;  // the CPU kernels' basis_rows / panels: accepted, unused
  m.impl("gaussian_map", &gaussian_map<CudaLauncher, Layout>);
  m.impl("gaussian_trajectory", &gaussian_trajectory<CudaLauncher, Layout>);
  m.impl("mixture_posterior", &mixture_posterior<CudaLauncher, Layout, Layout>);
  m.impl("gaussian_map_labeled", &gaussian_map_labeled<CudaLauncher>);
  m.impl("gaussian_trajectory_labeled", &gaussian_trajectory_labeled<CudaLauncher>);
  m.impl("local_posterior", &local_posterior<CudaLauncher>);
}
