// The torch side of the CUDA kernels, shared by the CUDA binding (bindings.cpp) and the SIMT
// emulation binding (csrc/emu/cuda_emu.cpp): validate (gsa::check_*, before touching memory),
// allocate outputs and workspaces, fill the params structs, and hand them to a Launcher:
//   struct Launcher {
//     static constexpr c10::DeviceType device_type;   // of every tensor argument
//     using Guard = ...;                               // RAII "current device = x's device"
//     static int multiprocessors(const at::Tensor& x); // sizes the D / component splits
//     static at::Tensor empty(at::IntArrayRef, const at::TensorOptions&);  // outputs, workspaces
//     template <class In, class Acc> static void gaussian_map(const GaussianMapParams<In, Acc>&);
//     template <class In, class Acc> static void mixture_posterior(const MixtureParams<In, Acc>&);
//   };
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "gsa/checks.h"
#include "gsa/spectral.h"
#include "params.h"

namespace gsa::cuda {

// Calls f(In{}, Acc{}) with the kernel types of x's dtype (check_x has vetted it).
template <typename F>
void dispatch_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kHalf: return f(f16{}, float{});
    case at::kBFloat16: return f(bf16{}, float{});
    case at::kFloat: return f(float{}, float{});
    default: return f(double{}, double{});
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.numel() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

template <typename L>
void check_device(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.device().type() == L::device_type, op, ": x must be a ", L::device_type,
                    " tensor, got one on ", x.device());
}

// out [T, B, D] = the spectral map of x for each of the T rows of sigma_to ([T, B]).
template <typename L>
void run_spectral(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                  const at::Tensor& eigvals, double residual_var, const at::Tensor& sigma_from,
                  const at::Tensor& sigma_to, const at::Tensor* scale_from,
                  const at::Tensor* scale_to, int64_t kind, const at::Tensor& out) {
  const int64_t B = x.size(0), D = x.size(1), r = basis.size(1), T = sigma_to.size(0);
  if (B == 0 || D == 0 || T == 0) return;
  TORCH_CHECK_VALUE(ceil_div(D, kTile) <= kMaxGridYZ, "the cuda spectral map takes D <= ", kMaxGridYZ * kTile,
                    ", got D = ", D);
  const int splits = projection_splits(B, D, r, L::multiprocessors(x));
  const at::Tensor coeffs = L::empty({r > 0 ? splits : 0, B, r}, x.options().dtype(compute_dtype(x)));
  dispatch_dtype(x.scalar_type(), [&](auto in_tag, auto acc_tag) {
    using In = decltype(in_tag);
    using Acc = decltype(acc_tag);
    GaussianMapParams<In, Acc> p{ptr<const In>(x), ptr<const Acc>(mean), ptr<const Acc>(basis),
                                 ptr<const Acc>(eigvals), Acc(residual_var), ptr<const Acc>(sigma_from),
                                 ptr<const Acc>(sigma_to), scale_from ? ptr<const Acc>(*scale_from) : nullptr,
                                 scale_to ? ptr<const Acc>(*scale_to) : nullptr, int(kind), B, D, r, T,
                                 splits, ptr<Acc>(coeffs), ptr<In>(out)};
    L::gaussian_map(p);
  });
}

template <typename L>
at::Tensor gaussian_map(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                        const at::Tensor& eigvals, double residual_var, const at::Tensor& sigma_from,
                        const at::Tensor& sigma_to, const at::Tensor& scale_from,
                        const at::Tensor& scale_to, int64_t kind, const char* op) {
  check_gaussian(x, mean, basis, eigvals, residual_var, op);
  check_device<L>(x, op);
  const int64_t B = x.size(0);
  check_rows(x, sigma_from, "sigma_from", {B}, op);
  check_rows(x, sigma_to, "sigma_to", {B}, op);
  check_rows(x, scale_from, "scale_from", {B}, op);
  check_rows(x, scale_to, "scale_to", {B}, op);
  TORCH_CHECK_VALUE(kind == kDenoise || kind == kScore || kind == kFlow, op,
                    ": kind must be 0 (denoise), 1 (score) or 2 (flow), got ", kind);
  typename L::Guard guard(x.device());
  at::Tensor out = L::empty(x.sizes(), x.options());
  run_spectral<L>(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to.view({1, B}), &scale_from,
                  &scale_to, kind, out);
  return out;
}

template <typename L>
at::Tensor gaussian_trajectory(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                               const at::Tensor& eigvals, double residual_var, const at::Tensor& sigmas,
                               const char* op) {
  check_gaussian(x, mean, basis, eigvals, residual_var, op);
  check_device<L>(x, op);
  TORCH_CHECK_VALUE(sigmas.dim() == 2 && sigmas.size(0) >= 1, op, ": sigmas must be [T, B] with T >= 1, got ",
                    sigmas.sizes());
  const int64_t T = sigmas.size(0), B = x.size(0);
  check_rows(x, sigmas, "sigmas", {T, B}, op);
  typename L::Guard guard(x.device());
  at::Tensor out = L::empty({T, B, x.size(1)}, x.options());
  // flow from sigmas[0] (may be +inf: x is unit noise) to every sigmas[t], scales 1
  run_spectral<L>(x, mean, basis, eigvals, residual_var, sigmas[0], sigmas, nullptr, nullptr, kFlow, out);
  return out;
}

template <typename L>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_posterior(
    const at::Tensor& x, const at::Tensor& means, const at::Tensor& bases, const at::Tensor& eigvals,
    const at::Tensor& residual_var, const at::Tensor& log_weights, const at::Tensor& sigma,
    bool need_denoised, bool need_weights, const char* op) {
  check_mixture(x, means, bases, eigvals, residual_var, log_weights, sigma, op);
  check_device<L>(x, op);
  const int64_t B = x.size(0), D = x.size(1), K = means.size(0), r = bases.size(2);
  const auto cd = x.options().dtype(compute_dtype(x));
  TORCH_CHECK_VALUE(r == 0 || mixture_lowrank_smem_bytes(r) <= kSharedMemoryLimit, op, ": rank r = ", r,
                    " is too large for the cuda mixture kernel (its coefficients must fit in 48 KiB of "
                    "shared memory); use backend='triton' or 'cpu'");
  typename L::Guard guard(x.device());
  at::Tensor denoised = L::empty(need_denoised ? x.sizes() : at::IntArrayRef{0}, x.options());
  at::Tensor logp = L::empty({B}, cd);
  at::Tensor weights = need_weights ? L::empty({B, K}, cd) : L::empty({0}, cd);
  if (B == 0) return {denoised, logp, weights};
  const int splits = mixture_splits(B, K, r, L::multiprocessors(x));
  const auto f64 = x.options().dtype(at::kDouble);
  const at::Tensor part_max = L::empty({splits, B}, f64), part_sum = L::empty({splits, B}, cd);
  // the logits in double: the weights' own memory when they are double
  const at::Tensor logits = !need_weights || weights.scalar_type() == at::kDouble ? weights : L::empty({B, K}, f64);
  const at::Tensor accum = L::empty({need_denoised ? splits : 0, B, D}, cd);
  dispatch_dtype(x.scalar_type(), [&](auto in_tag, auto acc_tag) {
    using In = decltype(in_tag);
    using Acc = decltype(acc_tag);
    MixtureParams<In, Acc> p{ptr<const In>(x), ptr<const Acc>(means), ptr<const Acc>(bases),
                             ptr<const Acc>(eigvals), ptr<const Acc>(residual_var), ptr<const Acc>(log_weights),
                             ptr<const Acc>(sigma), B, D, K, r, splits, ptr<double>(part_max),
                             ptr<Acc>(part_sum), ptr<Acc>(accum), ptr<In>(denoised),
                             ptr<Acc>(logp), ptr<double>(logits), ptr<Acc>(weights)};
    L::mixture_posterior(p);
  });
  return {denoised, logp, weights};
}

}  // namespace gsa::cuda
