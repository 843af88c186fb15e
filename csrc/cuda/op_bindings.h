// The torch side of the CUDA kernels, shared by the CUDA binding (bindings.cpp) and the SIMT
// emulation binding (csrc/emu/cuda_emu.cpp): each calls register_ops<L>(m) (at the end) once for its
// launcher L, which registers every op function below (gaussian_map<L>, ...) as L::op_prefix + the
// op's name -- a new CUDA op is its function and one line of register_ops here. Each op validates
// (gsa::check_*, before touching memory), allocates outputs and workspaces, fills the params
// structs, and hands the launch (csrc/cuda/launchers.h) to L:
//   struct Launcher {
//     static constexpr c10::DeviceType device_type;   // of every tensor argument
//     static constexpr const char* op_prefix;          // of the registered op names
//     static constexpr bool takes_layouts;             // the schema's trailing CPU layout arguments
//     using Guard = ...;                               // RAII "current device = x's device"
//     static int multiprocessors(const at::Tensor& x); // sizes the D / component splits
//     static at::Tensor empty(at::IntArrayRef, const at::TensorOptions&);  // outputs, workspaces
//     template <class F> static void launch(F&& f);   // f(stream) launches a kernel, returns its cudaError_t
//   };
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
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

// The per-row arguments of a map: sigma_from, sigma_to, scale_from, scale_to [B], and kind.
inline void check_map_rows(const at::Tensor& x, const at::Tensor& sigma_from, const at::Tensor& sigma_to,
                           const at::Tensor& scale_from, const at::Tensor& scale_to, int64_t kind, const char* op) {
  const int64_t B = x.size(0);
  check_rows(x, sigma_from, "sigma_from", {B}, op);
  check_rows(x, sigma_to, "sigma_to", {B}, op);
  check_rows(x, scale_from, "scale_from", {B}, op);
  check_rows(x, scale_to, "scale_to", {B}, op);
  TORCH_CHECK_VALUE(kind == kDenoise || kind == kScore || kind == kFlow, op,
                    ": kind must be 0 (denoise), 1 (score) or 2 (flow), got ", kind);
}

// The noise levels of a trajectory: sigmas [T, B], T >= 1.
inline void check_sigmas(const at::Tensor& x, const at::Tensor& sigmas, const char* op) {
  TORCH_CHECK_VALUE(sigmas.dim() == 2 && sigmas.size(0) >= 1, op, ": sigmas must be [T, B] with T >= 1, got ",
                    sigmas.sizes());
  check_rows(x, sigmas, "sigmas", {sigmas.size(0), x.size(0)}, op);
}

// The rows of a labelled map grouped into row tiles of one label each (GaussianMapParams):
// row_of [tiles * kTile] holds x's rows in label order (stable), each label's from a tile start
// on, -1 in the gaps; tile_component [tiles] each tile's label, -1 for a tile without rows.
// Torch ops on the labels' device, no host sync: tiles = ceil(B / kTile) + min(K, B) bounds the
// count (gsa_kernels/triton/gaussian.py label_tiles is the same with its own tile).
struct LabelTiles {
  at::Tensor row_of, tile_component, residual_vars;
};

inline LabelTiles label_tiles(const at::Tensor& labels, const at::Tensor& residual_var, int64_t K) {
  const int64_t B = labels.size(0);
  const auto i64 = labels.options();
  const at::Tensor counts = at::zeros({K}, i64).index_add_(0, labels, at::ones({B}, i64));
  const at::Tensor tiles_of = at::floor_divide(counts + (kTile - 1), kTile);
  const at::Tensor tile_end = tiles_of.cumsum(0);
  const at::Tensor order = std::get<1>(labels.sort(/*stable=*/true, 0, false));
  const at::Tensor sorted = labels.index_select(0, order);
  const at::Tensor first_tile = tile_end - tiles_of, group_begin = counts.cumsum(0) - counts;
  const at::Tensor pos = first_tile.index_select(0, sorted) * kTile + at::arange(B, i64) -
                         group_begin.index_select(0, sorted);
  const int64_t tiles = ceil_div(B, kTile) + (K < B ? K : B);
  const at::Tensor row_of = at::full({tiles * kTile}, -1, i64).index_copy_(0, pos, order);
  const at::Tensor comp = at::searchsorted(tile_end, at::arange(tiles, i64), /*out_int32=*/false, /*right=*/true);
  return {row_of, at::where(comp < K, comp, at::full({}, -1, i64)), residual_var};
}

// out [T, B, D] = the spectral map of x for each of the T rows of sigma_to ([T, B]); with
// `labelled`, row b under its label's component of the stacked mean / basis / eigvals.
template <typename L>
void run_spectral(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                  const at::Tensor& eigvals, double residual_var, const at::Tensor& sigma_from,
                  const at::Tensor& sigma_to, const at::Tensor* scale_from,
                  const at::Tensor* scale_to, int64_t kind, const at::Tensor& out,
                  const LabelTiles* labelled = nullptr) {
  const int64_t B = x.size(0), D = x.size(1), r = basis.size(-1), T = sigma_to.size(0);
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
    p.rows = B;
    if (labelled != nullptr) {
      p.row_of = ptr<const int64_t>(labelled->row_of);
      p.tile_component = ptr<const int64_t>(labelled->tile_component);
      p.residual_vars = ptr<const Acc>(labelled->residual_vars);
      p.rows = labelled->row_of.size(0);
    }
    L::launch([&](auto stream) { return launch_gaussian_map(p, stream); });
  });
}

// Layouts...: the trailing CPU-only layout arguments of the CUDA schemas (basis_rows,
// forward_panels, backward_panels, csrc/ops.cpp), unused here; the cuda_emu_ schemas have none.
template <typename L, typename... Layouts>
at::Tensor gaussian_map(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                        const at::Tensor& eigvals, double residual_var, const at::Tensor& sigma_from,
                        const at::Tensor& sigma_to, const at::Tensor& scale_from,
                        const at::Tensor& scale_to, int64_t kind, const Layouts&...) {
  static const std::string name = std::string(L::op_prefix) + "gaussian_map";  // in error messages
  const char* op = name.c_str();
  check_gaussian(x, mean, basis, eigvals, residual_var, op);
  check_device<L>(x, op);
  check_map_rows(x, sigma_from, sigma_to, scale_from, scale_to, kind, op);
  const int64_t B = x.size(0);
  typename L::Guard guard(x.device());
  at::Tensor out = L::empty(x.sizes(), x.options());
  run_spectral<L>(x, mean, basis, eigvals, residual_var, sigma_from, sigma_to.view({1, B}), &scale_from,
                  &scale_to, kind, out);
  return out;
}

template <typename L, typename... Layouts>
at::Tensor gaussian_trajectory(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                               const at::Tensor& eigvals, double residual_var, const at::Tensor& sigmas,
                               const Layouts&...) {
  static const std::string name = std::string(L::op_prefix) + "gaussian_trajectory";  // in error messages
  const char* op = name.c_str();
  check_gaussian(x, mean, basis, eigvals, residual_var, op);
  check_device<L>(x, op);
  check_sigmas(x, sigmas, op);
  const int64_t T = sigmas.size(0), B = x.size(0);
  typename L::Guard guard(x.device());
  at::Tensor out = L::empty({T, B, x.size(1)}, x.options());
  // flow from sigmas[0] (may be +inf: x is unit noise) to every sigmas[t], scales 1
  run_spectral<L>(x, mean, basis, eigvals, residual_var, sigmas[0], sigmas, nullptr, nullptr, kFlow, out);
  return out;
}

// Labels in [0, K): read on the CPU by check_labeled; on a GPU an asynchronous device-side
// assert (no host sync; a bad label fails the stream). The public ops check them before.
inline void check_label_range_on_device(const at::Tensor& labels, int64_t K) {
  if (labels.device().is_cpu() || labels.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(labels);
  at::_assert_async(at::logical_and(lo >= 0, hi < K), "gsa_kernels: labels must lie in [0, K)");
}

template <typename L>
at::Tensor gaussian_map_labeled(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& means,
                                const at::Tensor& bases, const at::Tensor& eigvals, const at::Tensor& residual_var,
                                const at::Tensor& sigma_from, const at::Tensor& sigma_to,
                                const at::Tensor& scale_from, const at::Tensor& scale_to, int64_t kind) {
  static const std::string name = std::string(L::op_prefix) + "gaussian_map_labeled";  // in error messages
  const char* op = name.c_str();
  check_labeled(x, labels, means, bases, eigvals, residual_var, op);
  check_device<L>(x, op);
  check_map_rows(x, sigma_from, sigma_to, scale_from, scale_to, kind, op);
  const int64_t B = x.size(0);
  typename L::Guard guard(x.device());
  check_label_range_on_device(labels, means.size(0));
  at::Tensor out = L::empty(x.sizes(), x.options());
  if (B == 0) return out;
  const LabelTiles tiles = label_tiles(labels, residual_var, means.size(0));
  run_spectral<L>(x, means, bases, eigvals, 0.0, sigma_from, sigma_to.view({1, B}), &scale_from, &scale_to, kind, out,
                  &tiles);
  return out;
}

template <typename L>
at::Tensor gaussian_trajectory_labeled(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& means,
                                       const at::Tensor& bases, const at::Tensor& eigvals,
                                       const at::Tensor& residual_var, const at::Tensor& sigmas) {
  static const std::string name = std::string(L::op_prefix) + "gaussian_trajectory_labeled";  // in error messages
  const char* op = name.c_str();
  check_labeled(x, labels, means, bases, eigvals, residual_var, op);
  check_device<L>(x, op);
  check_sigmas(x, sigmas, op);
  const int64_t T = sigmas.size(0), B = x.size(0);
  typename L::Guard guard(x.device());
  check_label_range_on_device(labels, means.size(0));
  at::Tensor out = L::empty({T, B, x.size(1)}, x.options());
  if (B == 0) return out;
  const LabelTiles tiles = label_tiles(labels, residual_var, means.size(0));
  run_spectral<L>(x, means, bases, eigvals, 0.0, sigmas[0], sigmas, nullptr, nullptr, kFlow, out, &tiles);
  return out;
}

template <typename L, typename... Layouts>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_posterior(
    const at::Tensor& x, const at::Tensor& means, const at::Tensor& bases, const at::Tensor& eigvals,
    const at::Tensor& residual_var, const at::Tensor& log_weights, const at::Tensor& sigma,
    bool need_denoised, bool need_weights, const Layouts&...) {
  static const std::string name = std::string(L::op_prefix) + "mixture_posterior";  // in error messages
  const char* op = name.c_str();
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
    L::launch([&](auto stream) { return launch_mixture_posterior(p, stream); });
  });
  return {denoised, logp, weights};
}

// Arguments of local_posterior (_contract.py): x [B, C, H, W], images [N >= 1, C, H, W] and sigma
// [B] in the compute dtype on x's device, patch_size odd >= 1, mode / padding / kind in range.
inline void check_local(const at::Tensor& x, const at::Tensor& images, const at::Tensor& sigma, int64_t patch_size,
                        int64_t mode, int64_t padding, int64_t kind, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be [B, C, H, W], got ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
                   ": x must be float16, bfloat16, float32 or float64, got ", t);
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous");
  check_param(x, images, "images", 4, op);
  TORCH_CHECK_VALUE(images.size(0) >= 1 && images.size(1) == x.size(1) && images.size(2) == x.size(2) &&
                        images.size(3) == x.size(3),
                    op, ": images must be [N >= 1, C, H, W] with x's C, H, W = ", x.sizes().slice(1), ", got ",
                    images.sizes());
  check_param(x, sigma, "sigma", 1, op);
  TORCH_CHECK_VALUE(sigma.size(0) == x.size(0), op, ": sigma must be [B] = [", x.size(0), "], got ", sigma.sizes());
  TORCH_CHECK_VALUE(patch_size >= 1 && patch_size % 2 == 1, op,
                    ": patch_size must be an odd int >= 1, got ", patch_size);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, op, ": mode must be 0 (ls), 1 (els) or 2 (bbels), got ", mode);
  TORCH_CHECK_VALUE(padding == 0 || padding == 1, op, ": padding must be 0 (zeros) or 1 (circular), got ", padding);
  TORCH_CHECK_VALUE(!(mode == 2 && padding == 1), op, ": mode bbels needs zeros padding");
  TORCH_CHECK_VALUE(kind == kDenoise || kind == kScore, op, ": kind must be 0 (denoise) or 1 (score), got ", kind);
}

template <typename L>
at::Tensor local_posterior(const at::Tensor& x, const at::Tensor& images, const at::Tensor& sigma, int64_t patch_size,
                           int64_t mode, int64_t padding, int64_t kind) {
  static const std::string name = std::string(L::op_prefix) + "local_posterior";  // in error messages
  const char* op = name.c_str();
  check_local(x, images, sigma, patch_size, mode, padding, kind, op);
  check_device<L>(x, op);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(B * ceil_div(H * W, kLocalThreads) <= kLocalMaxGridX, op, ": B x ceil(H W / ", kLocalThreads,
                    ") must be <= ", kLocalMaxGridX, " blocks, got B = ", B, ", H W = ", H * W);
  // zeros padding: window offsets of |dy| >= H or |dx| >= W read zeros on both sides, so P is cut to
  // 2 max(H, W) - 1 (BB-ELS classes, clipped at p >= max(H, W) - 1, are unchanged)
  const int64_t P = padding == 0 ? std::min<int64_t>(patch_size, 2 * std::max(H, W) - 1) : patch_size;
  TORCH_CHECK_VALUE(C * P * P < (int64_t(1) << 31), op, ": patch_size ", patch_size,
                    " is too large (C P^2 = ", C * P * P, " window entries per candidate >= 2^31)");
  typename L::Guard guard(x.device());
  at::Tensor out = L::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  dispatch_dtype(x.scalar_type(), [&](auto in_tag, auto acc_tag) {
    using In = decltype(in_tag);
    using Acc = decltype(acc_tag);
    LocalParams<In, Acc> p{ptr<const In>(x), ptr<const Acc>(images), ptr<const Acc>(sigma), B, images.size(0), C, H, W,
                           int(P), int(mode), int(padding), int(kind), ptr<In>(out)};
    L::launch([&](auto stream) { return launch_local_posterior(p, stream); });
  });
  return out;
}

// Every CUDA op, registered for launcher L as L::op_prefix + its name. The compiled CUDA ops share
// the CPU ops' schemas, trailing layout arguments included (accepted, unused); the emulated
// cuda_emu_* ops have none (csrc/ops.cpp).
template <typename L>
void register_ops(torch::Library& m) {
  using Layout = std::optional<at::Tensor>;
  const auto name = [](const char* op) { return std::string(L::op_prefix) + op; };
  if constexpr (L::takes_layouts) {
    m.impl(name("gaussian_map").c_str(), &gaussian_map<L, Layout>);
    m.impl(name("gaussian_trajectory").c_str(), &gaussian_trajectory<L, Layout>);
    m.impl(name("mixture_posterior").c_str(), &mixture_posterior<L, Layout, Layout>);
  } else {
    m.impl(name("gaussian_map").c_str(), &gaussian_map<L>);
    m.impl(name("gaussian_trajectory").c_str(), &gaussian_trajectory<L>);
    m.impl(name("mixture_posterior").c_str(), &mixture_posterior<L>);
  }
  m.impl(name("gaussian_map_labeled").c_str(), &gaussian_map_labeled<L>);
  m.impl(name("gaussian_trajectory_labeled").c_str(), &gaussian_trajectory_labeled<L>);
  m.impl(name("local_posterior").c_str(), &local_posterior<L>);
}

}  // namespace gsa::cuda
