// CPU kernels of the Gaussian spectral map and the closed-form trajectory (docs/architecture.md sections 1.1-1.2,
// math in include/gsa/spectral.h). Per block of rows, fused:
//   pass 1   y = p x - q mu                  (reads x once; y stays in cache)
//   GEMM 1   c = y U                         ([rows, r], gemm_nt against U^T: the model's
//                                             basis_rows layout when it keeps one, else a view)
//            c_j *= f_j(row)                 (spectral function, per row and eigenvalue)
//   GEMM 2   z = c U^T                       ([rows, D], gemm_nt against U)
//   pass 2   out = a y + b mu + z            (in place over y; out written once)
// Denoising in float32/float64 takes a shorter route (denoise_expanded): whole-batch GEMMs.
// Row blocks run in parallel (at::parallel_for); the GEMMs run single-threaded inside a block.
// fp16/bf16 x is computed in float32 and converted on the way in and out.
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "gsa/checks.h"
#include "gsa/spectral.h"

namespace gsa::cpu {
namespace {

// Pass 1 for rows [0, n) of a block: y = p x - q mu, with the per-row coefficients saved.
template <typename X, typename T>
void form_y(const X* x, const T* mu, T* y, int64_t n, int64_t D, const RowCoeffs<T>* rc) {
  for (int64_t i = 0; i < n; ++i) {
    const X* __restrict xi = x + i * D;
    T* __restrict yi = y + i * D;
    const T p = rc[i].p, q = rc[i].q;
    for (int64_t d = 0; d < D; ++d) yi[d] = p * static_cast<T>(xi[d]) - q * mu[d];
  }
}

// Pass 2: out = a y + b mu (+ z when z is given), row by row (out may alias y).
template <typename T>
void affine_rows(const T* y, const T* mu, const T* z, T* out, int64_t n, int64_t D,
                 const RowCoeffs<T>* rc) {
  for (int64_t i = 0; i < n; ++i) {
    const T* yi = y + i * D;
    T* oi = out + i * D;
    const T a = rc[i].a, b = rc[i].b;
    if (z == nullptr) {
      for (int64_t d = 0; d < D; ++d) oi[d] = a * yi[d] + b * mu[d];
    } else {
      const T* __restrict zi = z + i * D;
      for (int64_t d = 0; d < D; ++d) oi[d] = a * yi[d] + b * mu[d] + zi[d];
    }
  }
}

// f_j = c_j * gain_j for one row (j < r), with the op kind fixed at compile time so that the
// loop vectorizes. With a full-rank basis (r == D) there is no residual subspace, and the map is
// b mu + U diag(eigen_gain(lam_j)) c with a = 0 (set by the callers): a y and U diag(f) c would
// otherwise both grow like |y| / sigma^2 at small sigma and cancel (see spectral.h).
template <int Kind, typename T>
void scale_coeffs_kind(const T* c, T* f, const T* lam, int64_t r, bool full_rank, T lp, T sa,
                       T sb, T ka, T kb) {
  if (full_rank) {
    for (int64_t j = 0; j < r; ++j) f[j] = c[j] * eigen_gain<T>(Kind, lam[j], sa, sb, ka, kb);
  } else {
    for (int64_t j = 0; j < r; ++j) f[j] = c[j] * spectral_f<T>(Kind, lam[j], lp, sa, sb, ka, kb);
  }
}

template <typename T>
void scale_coeffs(int kind, const T* c, T* f, const T* lam, int64_t r, bool full_rank, T lp, T sa,
                  T sb, T ka, T kb) {
  if (kind == kDenoise) scale_coeffs_kind<kDenoise>(c, f, lam, r, full_rank, lp, sa, sb, ka, kb);
  else if (kind == kScore) scale_coeffs_kind<kScore>(c, f, lam, r, full_rank, lp, sa, sb, ka, kb);
  else scale_coeffs_kind<kFlow>(c, f, lam, r, full_rank, lp, sa, sb, ka, kb);
}

// Denoising, float32/float64, r > 0. Its gains lie in [-1, 1], so c = U^T x - U^T mu (the
// expansion) rounds to errors below the mean's term, and x can feed the first GEMM directly.
// Both GEMMs run over the whole batch (the GEMM engine threads them; one call each, not one per
// row block), and the second GEMM's result becomes the output, finished in place:
//   out = a x + (1 - a) mu + U f c.
template <typename T>
at::Tensor denoise_expanded(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                            const at::Tensor& basis_t, const at::Tensor& eigvals, T lp,
                            const at::Tensor& sigma) {
  const int64_t B = x.size(0), D = x.size(1), r = basis.size(1);
  const bool full_rank = r == D;
  const T *x_p = x.data_ptr<T>(), *mu = mean.data_ptr<T>(), *lam = eigvals.data_ptr<T>();
  // U^T mu costs a read of U (D r values); centring x first costs a write and a read of y
  // (2 B D): take the cheaper. With y, c is exact-centred and needs no U^T mu.
  const bool centre_x = r > 2 * B;
  at::Tensor y;
  if (centre_x) {
    y = at::empty_like(x);
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      with_isa([&] {
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t d = 0; d < D; ++d) yp[b * D + d] = x_p[b * D + d] - mu[d];
      });
    });
  }
  const at::Tensor umu = centre_x ? at::Tensor() : at::mv(basis_t, mean);  // one more row of GEMM 1
  at::Tensor c = gemm_nt(GemmSite::kProject, centre_x ? y : x, basis_t);  // [B, r]
  y.reset();
  const T *sig = sigma.data_ptr<T>(), *um = centre_x ? nullptr : umu.data_ptr<T>();
  T* cp = c.data_ptr<T>();
  std::vector<T> a(B);
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    with_isa([&] {
      for (int64_t b = b0; b < b1; ++b) {
        T* cb = cp + b * r;
        if (um != nullptr)
          for (int64_t j = 0; j < r; ++j) cb[j] -= um[j];
        a[b] = full_rank ? T(0) : row_coeffs<T>(kDenoise, lp, sig[b], T(0), T(1), T(1)).a;
        scale_coeffs_kind<kDenoise>(cb, cb, lam, r, full_rank, lp, sig[b], T(0), T(1), T(1));
      }
    });
  });
  at::Tensor out = gemm_nt(GemmSite::kExpand, c, basis);  // U f c, [B, D]
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    with_isa([&] {
      for (int64_t b = b0; b < b1; ++b) {
        const T ab = a[b], mb = T(1) - a[b];
        const T* xb = x_p + b * D;
        T* ob = op + b * D;
        for (int64_t d = 0; d < D; ++d) ob[d] += ab * xb[d] + mb * mu[d];
      }
    });
  });
  return out;
}

template <typename X>
void gaussian_map_impl(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                       const at::Tensor& basis_t, const at::Tensor& eigvals, double residual_var, const at::Tensor& sigma_from,
                       const at::Tensor& sigma_to, const at::Tensor& scale_from,
                       const at::Tensor& scale_to, int kind, at::Tensor& out) {
  using T = at::opmath_type<X>;
  constexpr bool kDirect = std::is_same_v<X, T>;  // out is in the compute dtype: work in place
  const int64_t B = x.size(0), D = x.size(1), r = basis.size(1);
  const T lp = static_cast<T>(residual_var);
  const X* xp = x.data_ptr<X>();
  const T* mu = mean.data_ptr<T>();
  const T* lam = eigvals.data_ptr<T>();
  const T *sa = sigma_from.data_ptr<T>(), *sb = sigma_to.data_ptr<T>();
  const T *ka = scale_from.data_ptr<T>(), *kb = scale_to.data_ptr<T>();
  X* op = out.data_ptr<X>();
  const int64_t BB = row_block(B, D, r, sizeof(T));
  const bool full_rank = r == D;

  at::parallel_for(0, B, BB, [&](int64_t begin, int64_t end) {
    at::Tensor ybuf = kDirect ? at::Tensor() : at::empty({BB, D}, options_for<T>());
    std::vector<RowCoeffs<T>> rc(BB);
    for (int64_t b0 = begin; b0 < end; b0 += BB) {
      const int64_t n = std::min(BB, end - b0);
      at::Tensor yb = kDirect ? out.narrow(0, b0, n) : ybuf.narrow(0, 0, n);
      T* y = yb.data_ptr<T>();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = b0 + i;
        rc[i] = row_coeffs<T>(kind, lp, sa[b], sb[b], ka[b], kb[b]);
        if (full_rank) rc[i].a = T(0);
      }
      with_isa([&] { form_y(xp + b0 * D, mu, y, n, D, rc.data()); });
      at::Tensor z;
      if (r > 0) {
        at::Tensor cb = gemm_nt(GemmSite::kProject, yb, basis_t);
        T* c = cb.data_ptr<T>();
        with_isa([&] {
          for (int64_t i = 0; i < n; ++i) {
            const int64_t b = b0 + i;
            scale_coeffs<T>(kind, c + i * r, c + i * r, lam, r, full_rank, lp, sa[b], sb[b], ka[b], kb[b]);
          }
        });
        z = gemm_nt(GemmSite::kExpand, cb, basis);
      }
      const T* zp = r > 0 ? z.data_ptr<T>() : nullptr;
      with_isa([&] { affine_rows(y, mu, zp, y, n, D, rc.data()); });
      if constexpr (!kDirect) {
        with_isa([&] {
          for (int64_t i = 0; i < n; ++i) convert_row(op + (b0 + i) * D, y + i * D, D);
        });
      }
    }
  });
}

at::Tensor gaussian_map_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                            const at::Tensor& eigvals, double residual_var,
                            const at::Tensor& sigma_from, const at::Tensor& sigma_to,
                            const at::Tensor& scale_from, const at::Tensor& scale_to, int64_t kind,
                            const std::optional<at::Tensor>& given_basis_rows) {
  const char* op = "gsa_kernels::gaussian_map (cpu)";
  check_gaussian(x, mean, basis, eigvals, residual_var, op);
  for (auto [t, name] : {std::pair{&sigma_from, "sigma_from"}, {&sigma_to, "sigma_to"},
                         {&scale_from, "scale_from"}, {&scale_to, "scale_to"}})
    check_rows(x, *t, name, {x.size(0)}, op);
  TORCH_CHECK_VALUE(kind == kDenoise || kind == kScore || kind == kFlow, op,
                    ": kind must be 0 (denoise), 1 (score) or 2 (flow), got ", kind);
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor");
  const at::Tensor basis_t = layout_or(given_basis_rows, basis, {basis.size(1), basis.size(0)},
                                       "basis_rows", op, [&] { return basis.t(); });
  if (kind == kDenoise && basis.size(1) > 0 && x.numel() > 0) {  // no y pass: see denoise_expanded
    if (x.scalar_type() == at::kFloat)
      return denoise_expanded<float>(x, mean, basis, basis_t, eigvals, static_cast<float>(residual_var), sigma_from);
    if (x.scalar_type() == at::kDouble)
      return denoise_expanded<double>(x, mean, basis, basis_t, eigvals, residual_var, sigma_from);
  }
  at::Tensor out = empty_output(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gaussian_map", [&] {
    gaussian_map_impl<scalar_t>(x, mean, basis, basis_t, eigvals, residual_var, sigma_from, sigma_to,
                                scale_from, scale_to, static_cast<int>(kind), out);
  });
  return out;
}

// out[t] = flow of x from sigmas[0] to sigmas[t] (scales 1). c = U^T y is formed once per row
// block and reused for every t; each out[t] block is written once.
template <typename X>
void trajectory_impl(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                     const at::Tensor& basis_t, const at::Tensor& eigvals, double residual_var, const at::Tensor& sigmas,
                     at::Tensor& out) {
  using T = at::opmath_type<X>;
  constexpr bool kDirect = std::is_same_v<X, T>;
  const int64_t B = x.size(0), D = x.size(1), r = basis.size(1), steps = sigmas.size(0);
  const T lp = static_cast<T>(residual_var);
  const X* xp = x.data_ptr<X>();
  const T* mu = mean.data_ptr<T>();
  const T* lam = eigvals.data_ptr<T>();
  const T* sig = sigmas.data_ptr<T>();
  X* op = out.data_ptr<X>();
  const int64_t BB = row_block(B, D, r, sizeof(T));
  const bool full_rank = r == D;
  const T one(1);

  at::parallel_for(0, B, BB, [&](int64_t begin, int64_t end) {
    at::Tensor ybuf = at::empty({BB, D}, options_for<T>());
    at::Tensor obuf = kDirect ? at::Tensor() : at::empty({BB, D}, options_for<T>());
    at::Tensor fbuf = at::empty({BB, r}, options_for<T>());
    std::vector<RowCoeffs<T>> rc(BB);
    for (int64_t b0 = begin; b0 < end; b0 += BB) {
      const int64_t n = std::min(BB, end - b0);
      at::Tensor yb = ybuf.narrow(0, 0, n), fb = fbuf.narrow(0, 0, n);
      T* y = yb.data_ptr<T>();
      for (int64_t i = 0; i < n; ++i) rc[i] = row_coeffs<T>(kFlow, lp, sig[b0 + i], one, one, one);
      // p, q do not depend on the target sigma: y serves every t
      with_isa([&] { form_y(xp + b0 * D, mu, y, n, D, rc.data()); });
      const at::Tensor cb = r > 0 ? gemm_nt(GemmSite::kProject, yb, basis_t) : at::Tensor();
      const T* c = r > 0 ? cb.data_ptr<T>() : nullptr;
      T* f = fb.data_ptr<T>();
      for (int64_t t = 0; t < steps; ++t) {
        const T* sa = sig;          // sigmas[0, :]
        const T* sb = sig + t * B;  // sigmas[t, :]
        with_isa([&] {
          for (int64_t i = 0; i < n; ++i) {
            const int64_t b = b0 + i;
            rc[i] = row_coeffs<T>(kFlow, lp, sa[b], sb[b], one, one);
            if (full_rank) rc[i].a = T(0);
            if (r > 0) scale_coeffs_kind<kFlow>(c + i * r, f + i * r, lam, r, full_rank, lp, sa[b], sb[b], one, one);
          }
        });
        T* o = kDirect ? reinterpret_cast<T*>(op) + (t * B + b0) * D : obuf.data_ptr<T>();
        const at::Tensor z = r > 0 ? gemm_nt(GemmSite::kExpand, fb, basis) : at::Tensor();
        const T* zp = r > 0 ? z.data_ptr<T>() : nullptr;
        with_isa([&] { affine_rows(y, mu, zp, o, n, D, rc.data()); });
        if constexpr (!kDirect) {
          with_isa([&] {
            for (int64_t i = 0; i < n; ++i) convert_row(op + (t * B + b0 + i) * D, o + i * D, D);
          });
        }
      }
    }
  });
}

at::Tensor gaussian_trajectory_cpu(const at::Tensor& x, const at::Tensor& mean,
                                   const at::Tensor& basis, const at::Tensor& eigvals,
                                   double residual_var, const at::Tensor& sigmas,
                                   const std::optional<at::Tensor>& given_basis_rows) {
  const char* op = "gsa_kernels::gaussian_trajectory (cpu)";
  check_gaussian(x, mean, basis, eigvals, residual_var, op);
  check_param(x, sigmas, "sigmas", 2, op);
  TORCH_CHECK_VALUE(sigmas.size(1) == x.size(0), op, ": sigmas must be [T, B] with B = ",
                    x.size(0), ", got ", sigmas.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor");
  at::Tensor out = empty_output({sigmas.size(0), x.size(0), x.size(1)}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor basis_t = layout_or(given_basis_rows, basis, {basis.size(1), basis.size(0)},
                                       "basis_rows", op, [&] { return basis.t(); });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gaussian_trajectory",
                                  [&] {
                                    trajectory_impl<scalar_t>(x, mean, basis, basis_t, eigvals,
                                                              residual_var, sigmas, out);
                                  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gsa_kernels, CPU, m) {
  m.impl("gaussian_map", &gaussian_map_cpu);
  m.impl("gaussian_trajectory", &gaussian_trajectory_cpu);
}

}  // namespace gsa::cpu
