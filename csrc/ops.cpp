// Op schemas of gsa_kernels, as the op registry (gsa_kernels/_core/_contract.py) declares them.
// Backends register implementations with TORCH_LIBRARY_IMPL(gsa_kernels, CPU | CUDA, m) in their
// own files; the fakes and autograd rules are bound in _contract.py. Kernel-level contract
// (gsa_kernels/_core/_args.py prepares it):
//   x: [B, D] contiguous, float16 | bfloat16 | float32 | float64
//   model tensors and per-row sigma / scale tensors: contiguous, "compute dtype"
//   (float64 if x is float64, else float32), same device as x
//   kind: 0 denoise, 1 score, 2 flow (gsa::SpectralKind in include/gsa/spectral.h)
// The optional trailing layouts of gaussian_map / gaussian_trajectory / mixture_posterior
// (basis_rows, forward/backward_panels) are GEMM-ready copies of model tensors that the model
// keeps (gsa_kernels/_core/_layouts.py); the CPU kernels build them per call when absent, the CUDA
// kernels do not use them. The emulated cuda_emu_* ops have no layout arguments.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A bare module so that `import gsa_kernels._C` loads the library and runs its registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

#define GSA_GAUSSIAN_MAP_ARGS                                                                \
  "(Tensor x, Tensor mean, Tensor basis, Tensor eigvals, float residual_var, "              \
  "Tensor sigma_from, Tensor sigma_to, Tensor scale_from, Tensor scale_to, int kind"
#define GSA_TRAJECTORY_ARGS                                                                  \
  "(Tensor x, Tensor mean, Tensor basis, Tensor eigvals, float residual_var, Tensor sigmas"
#define GSA_MIXTURE_ARGS                                                                     \
  "(Tensor x, Tensor means, Tensor bases, Tensor eigvals, Tensor residual_var, "            \
  "Tensor log_weights, Tensor sigma, bool need_denoised, bool need_weights"
// labelled variants: row b under component labels[b] of stacked Gaussians (a mixture's tensors)
#define GSA_LABELED_MAP_ARGS                                                                 \
  "(Tensor x, Tensor labels, Tensor means, Tensor bases, Tensor eigvals, Tensor residual_var, " \
  "Tensor sigma_from, Tensor sigma_to, Tensor scale_from, Tensor scale_to, int kind"
#define GSA_LABELED_TRAJECTORY_ARGS                                                          \
  "(Tensor x, Tensor labels, Tensor means, Tensor bases, Tensor eigvals, Tensor residual_var, " \
  "Tensor sigmas"
#define GSA_TENSOR ") -> Tensor"
#define GSA_TRIPLE ") -> (Tensor, Tensor, Tensor)"
#define GSA_BASIS_ROWS ", Tensor? basis_rows=None) -> Tensor"
#define GSA_PANELS ", Tensor? forward_panels=None, Tensor? backward_panels=None) -> (Tensor, Tensor, Tensor)"

TORCH_LIBRARY(gsa_kernels, m) {
  // out[B, D] = spectral map of x (denoise / score / closed-form flow), per-row sigma [B].
  // Flow: sigma_from[b] = +inf means x is unit noise; scale_* are the schedule scalings.
  m.def("gaussian_map" GSA_GAUSSIAN_MAP_ARGS GSA_BASIS_ROWS);
  // out[T, B, D]: x at sigmas[0, b] carried by the closed-form flow to every sigmas[t, b].
  m.def("gaussian_trajectory" GSA_TRAJECTORY_ARGS GSA_BASIS_ROWS);
  // Posterior of a K-component low-rank mixture: (denoised [B, D] or [0] when not needed,
  // logp [B], weights [B, K] or [0] when not needed). logp and weights in compute dtype.
  m.def("mixture_posterior" GSA_MIXTURE_ARGS GSA_PANELS);
  // gaussian_map / gaussian_trajectory with row b under component labels[b] (int64 [B] in
  // [0, K)) of means [K, D], bases [K, D, r], eigvals [K, r], residual_var [K].
  m.def("gaussian_map_labeled" GSA_LABELED_MAP_ARGS GSA_TENSOR);
  m.def("gaussian_trajectory_labeled" GSA_LABELED_TRAJECTORY_ARGS GSA_TENSOR);
  // Layouts and their validity (gsa_kernels/_core/_layouts.py; CPU): U^T [r, D] of a basis [D, r];
  // the (forward, backward) component panels of a mixture (csrc/cpu/mixture.cpp); a 64-bit hash
  // of a tensor's dtype, sizes and contents.
  m.def("basis_rows(Tensor basis) -> Tensor");
  m.def("mixture_panels(Tensor means, Tensor bases) -> (Tensor, Tensor)");
  m.def("content_hash(Tensor t) -> int");
  // Whether keeping basis_rows pays for batches of B rows on this host (measured; layouts.cpp).
  m.def("basis_rows_pay(int B, Tensor basis) -> bool");
  // Gradients of mixture_posterior (gsa_kernels/_core/_autograd.py; CPU: cpu/mixture_backward.cpp).
  // x and grad tensors in the compute dtype; logp: the forward's; row_term [B] = gL - sum_k w_k
  // gW_k - gD . den; grad_den [B, D] / grad_weights [B, K] or [0] when absent. Returns
  // (grad x, grad means, grad eigvals, grad residual_var, grad log_weights), [0] when not needed.
  // forward_panels / backward_panels: the forward's component panels, when it was given them.
  m.def("mixture_posterior_backward(Tensor x, Tensor means, Tensor bases, Tensor eigvals, "
        "Tensor residual_var, Tensor log_weights, Tensor sigma, Tensor logp, Tensor row_term, "
        "Tensor grad_den, Tensor grad_weights, bool need_x, bool need_means, bool need_eigvals, "
        "bool need_residual_var, bool need_log_weights, Tensor? forward_panels=None, "
        "Tensor? backward_panels=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // The same kernels as the CUDA backend, compiled for the host through the SIMT emulation
  // (csrc/emu): CPU tensors in, for tests only (GSA_KERNELS_CUDA_EMULATE=1).
  m.def("cuda_emu_gaussian_map" GSA_GAUSSIAN_MAP_ARGS GSA_TENSOR);
  m.def("cuda_emu_gaussian_trajectory" GSA_TRAJECTORY_ARGS GSA_TENSOR);
  m.def("cuda_emu_mixture_posterior" GSA_MIXTURE_ARGS GSA_TRIPLE);
  m.def("cuda_emu_gaussian_map_labeled" GSA_LABELED_MAP_ARGS GSA_TENSOR);
  m.def("cuda_emu_gaussian_trajectory_labeled" GSA_LABELED_TRAJECTORY_ARGS GSA_TENSOR);

  // Local score machines (gsa_kernels/_core/_contract.py gives the math): x [B, C, H, W], images
  // [N, C, H, W] and sigma [B] in the compute dtype; patch_size odd >= 1; mode gsa LocalMode
  // (0 ls, 1 els, 2 bbels), padding (0 zeros, 1 circular), kind 0 denoise / 1 score.
  // -> [B, C, H, W] in x's dtype. CPU: cpu/local_score.cpp; CUDA (and its emulation,
  // cuda_emu_local_posterior): cuda/local_kernels.cuh.
  m.def("local_posterior(Tensor x, Tensor images, Tensor sigma, int patch_size, int mode, int padding, "
        "int kind) -> Tensor");
  m.def("cuda_emu_local_posterior(Tensor x, Tensor images, Tensor sigma, int patch_size, int mode, int padding, "
        "int kind) -> Tensor");
}
