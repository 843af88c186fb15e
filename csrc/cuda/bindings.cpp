// Torch binding of the CUDA kernels: every op of op_bindings.h's register_ops as gsa_kernels::<op>
// for CUDA tensors, on the current stream (no host synchronisation).
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
  static constexpr bool takes_layouts = true;  // the CPU kernels' basis_rows / panels: accepted, unused
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

  template <typename F>
  static void launch(F&& f) {
    C10_CUDA_CHECK(f(c10::cuda::getCurrentCUDAStream().stream()));
  }
};

}  // namespace
}  // namespace gsa::cuda

TORCH_LIBRARY_IMPL(gsa_kernels, CUDA, m) { gsa::cuda::register_ops<gsa::cuda::CudaLauncher>(m); }
