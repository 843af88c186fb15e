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
  static constexpr const char* op_prefix = "cuda_emu_";
  static constexpr bool takes_layouts = false;
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

  template <typename F>
  static void launch(F&& f) {
    f(cudaStream_t{});  // launch errors throw in the emulation
  }
};

}  // namespace
}  // namespace gsa::cuda

TORCH_LIBRARY_IMPL(gsa_kernels, CPU, m) { gsa::cuda::register_ops<gsa::cuda::EmulatedLauncher>(m); }
