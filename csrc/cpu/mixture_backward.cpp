// CPU kernel of the mixture posterior's backward (formulas in gsa_kernels/_core/_autograd.py): the
// gradients w.r.t. x, means, eigvals, residual_var and log_weights in one streamed pass over the
// components, with the forward's layout (mixture_blocks.h: component blocks of KB, one panel [M; Ut]
// per block; the forward's panels when the caller passes them, else built here) and its logits
// (fast expansion plus the exact refinement near the top). The weights need no online max: the forward's logp is the exact
// normaliser, w_k = exp(l_k - logp). Per (row block, component block):
//   F  = X  [M; Ut]^T      x . mu_k, U_k^T x -> logits, c_k            (the forward's GEMM)
//   Fg = gD [M; Ut]^T      gD . mu_k, U_k^T gD (only with a denoiser gradient gD)
//   a_k = w_k (row_term + gW_k + gD . D_k)   (row_term = gL - sum w gW - gD . den, from Python)
//   acc += [P | G] [M | U]^T with P_k = a_k (1 - hp_k) / s^2, G_k = a_k (h - hp) c_k / s^2
//                                          + w_k (h - hp) U_k^T gD      (the forward's 2nd GEMM)
//   grad x = acc - x sum_k P_k + gD sum_k w_k hp_k
// Per-component sums (log_weights, eigvals, residual_var, and sum_b P, sum_b G for the means)
// go to per-row-block slots, added up at the end; grad means = P^T X + (w (1 - hp))^T gD
// - (sum_b P) mu_k - U_k sum_b G is one more GEMM over [B, K] (only when asked for).
// For r = 0 with few nonzero weights (the delta mixture at small sigma), Fg becomes dot products
// and the back-projection axpys, for the components that carry weight only (as in the forward).
// Cost (M1-like, gD given): three GEMMs of the forward's size instead of two; E1-like (sparse):
// the forward's one distance GEMM.
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "common.h"
#include "exact_sums.h"
#include "gsa/checks.h"
#include "gsa/spectral.h"
#include "mixture_blocks.h"

namespace gsa::cpu {
namespace {

template <typename T>
double dot(const T* a, const T* b, int64_t D) {
  double s = 0;
  for (int64_t d = 0; d < D; ++d) s += static_cast<double>(a[d]) * static_cast<double>(b[d]);
  return s;
}

struct Needs {
  bool x, means, eigvals, residual_var, log_weights;
};

template <typename T>
void backward_impl(const at::Tensor& x, const at::Tensor& means, const at::Tensor& bases,
                   const at::Tensor& eigvals, const at::Tensor& residual_var,
                   const at::Tensor& log_weights, const at::Tensor& sigma, const at::Tensor& logp,
                   const at::Tensor& row_term, const at::Tensor& grad_den,
                   const at::Tensor& grad_weights, const std::optional<at::Tensor>& forward_given,
                   const std::optional<at::Tensor>& backward_given, Needs need, at::Tensor& gx, at::Tensor& gmu,
                   at::Tensor& glam, at::Tensor& glp, at::Tensor& glogw) {
  const int64_t B = x.size(0), D = x.size(1), K = means.size(0), r = bases.size(2), W = r + 1;
  const bool has_gd = grad_den.numel() > 0, has_gw = grad_weights.numel() > 0;
  const T* xp = x.data_ptr<T>();
  const T* mu = means.data_ptr<T>();
  const T* lam = eigvals.data_ptr<T>();
  const T* lpv = residual_var.data_ptr<T>();
  const T* logw = log_weights.data_ptr<T>();
  const T* sig = sigma.data_ptr<T>();
  const T* lse = logp.data_ptr<T>();
  const T* rterm = row_term.data_ptr<T>();
  const T* gdp = has_gd ? grad_den.data_ptr<T>() : nullptr;
  const T* gwp = has_gw ? grad_weights.data_ptr<T>() : nullptr;

  const auto [mu_sq, max_mu_sq, min_lp, equal_lp] = component_norms(mu, lpv, K, D);
  // the forward's component blocks, so that its cached panels serve here too
  const int64_t KB = component_block(K, r);
  const int64_t num_kb = (K + KB - 1) / KB;
  at::Tensor fwd, bwd, Umu;
  if (r > 0) {
    fwd = forward_given.has_value() ? *forward_given : forward_panels<T>(means, bases, KB);
    if (need.x && backward_given.has_value()) bwd = *backward_given;  // else Q F_panel, no transpose
    Umu = at::bmm(means.unsqueeze(1), bases).view({K, r});
  }
  const T* umu = r > 0 ? Umu.data_ptr<T>() : nullptr;
  const bool sq_matters = r < D;
  const double eps = std::numeric_limits<T>::epsilon();

  const int64_t BB = tall_row_block(B);
  const int64_t num_rb = (B + BB - 1) / BB;
  // per-row-block sums per component: log_weights, residual_var, sum_b P | eigvals, sum_b G
  const int64_t S = 3 + 2 * r;
  std::vector<double> slots(num_rb * K * S, 0.0);
  // P and w (1 - hp) per (row, component), for grad means
  at::Tensor Pall = need.means ? at::zeros({B, K}, x.options()) : at::Tensor();
  at::Tensor Ball = need.means && has_gd ? at::zeros({B, K}, x.options()) : at::Tensor();

  at::parallel_for(0, num_rb, 1, [&](int64_t rb_begin, int64_t rb_end) {
    auto opts = options_for<T>();
    at::Tensor acc = need.x ? at::empty({BB, D}, opts) : at::Tensor();
    at::Tensor Qbuf = at::empty({BB * KB * W}, opts);
    std::vector<double> x_sq(BB), err(BB), s2v(BB), gdx(BB), psum(BB), whp(BB), wbuf(BB * KB);
    for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
      const int64_t b0 = rb * BB, n = std::min(BB, B - b0);
      double* slot = slots.data() + rb * K * S;
      const at::Tensor Xb = x.narrow(0, b0, n);
      const at::Tensor Gb = has_gd ? grad_den.narrow(0, b0, n) : at::Tensor();
      const T* xb = xp + b0 * D;
      for (int64_t i = 0; i < n; ++i) {
        const double s = sig[b0 + i];
        s2v[i] = s * s;
        x_sq[i] = sum_squares(xb + i * D, D);
        err[i] = sq_matters ? kGemmErr * eps * std::sqrt(double(D)) * (x_sq[i] + max_mu_sq) /
                                  (2 * (min_lp + s2v[i]))
                            : 0.0;
        gdx[i] = 0;
        if (has_gd)
          for (int64_t d = 0; d < D; ++d) gdx[i] += double(gdp[(b0 + i) * D + d]) * xb[i * D + d];
        psum[i] = whp[i] = 0;
      }
      at::Tensor accb = need.x ? acc.narrow(0, 0, n).zero_() : at::Tensor();

      for (int64_t kb = 0; kb < num_kb; ++kb) {
        const int64_t k0 = kb * KB, nk = std::min(KB, K - k0);
        const at::Tensor Mk = means.narrow(0, k0, nk);
        const at::Tensor pan = r > 0 ? panel(fwd, k0, nk, W, D, false) : Mk;
        const at::Tensor F = gemm_nt(GemmSite::kMixtureForward, Xb, pan);
        const int64_t ldf = F.stride(0);
        int64_t nonzero_w = 0;
        // weights w = exp(l - logp), l as the forward computes it (c_k formed in place in F)
        for (int64_t i = 0; i < n; ++i) {
          const double s2 = s2v[i];
          T* Fi = F.data_ptr<T>() + i * ldf;
          double* L = wbuf.data() + i * nk;
          for (int64_t k = 0; k < nk; ++k) {
            const int64_t kk = k0 + k;
            const double sq = x_sq[i] + mu_sq[kk] - 2.0 * static_cast<double>(Fi[k]);
            double cc = 0, cc_w = 0;
            T* c = Fi + nk + k * r;
            for (int64_t j = 0; j < r; ++j) {
              c[j] -= umu[kk * r + j];
              const double cj = c[j];
              cc += cj * cj;
              cc_w += cj * cj / (static_cast<double>(lam[kk * r + j]) + s2);
            }
            const double ld = log_det_low(lam + kk * r, r, s2);
            L[k] = logw[kk] + component_logpdf<double>(std::max(sq, 0.0), cc_w, cc, ld, lpv[kk], s2, D, r);
            if (err[i] > kLogitTol && L[k] >= lse[b0 + i] - 2 * err[i] - kCutoff) {
              const double sqe = sqdist_exact(xb + i * D, mu + kk * D, D);
              L[k] = logw[kk] + component_logpdf<double>(sqe, cc_w, cc, ld, lpv[kk], s2, D, r);
            }
            const double d = L[k] - lse[b0 + i];
            L[k] = d > -kNegligible ? std::exp(d) : 0.0;
            nonzero_w += L[k] != 0.0;
          }
        }
        // gD . mu_k and U_k^T gD: one GEMM, or (r = 0, few nonzero weights, as at small sigma)
        // dot products for the components that carry weight
        const bool sparse = r == 0 && nonzero_w * kSparseRatio < n * nk;
        const at::Tensor Fg = has_gd && !sparse ? gemm_nt(GemmSite::kMixtureForward, Gb, pan) : at::Tensor();
        const int64_t ldg = Fg.defined() ? Fg.stride(0) : 0;
        const at::Tensor Q = Qbuf.narrow(0, 0, n * nk * W).view({n, nk * W});
        T* Pp = Q.data_ptr<T>();
        T* Gp = Pp + nk;
        const int64_t ldq = nk * W;
        int64_t nonzero = 0;

        for (int64_t i = 0; i < n; ++i) {
          const double s2 = s2v[i];
          const T* Fi = F.data_ptr<T>() + i * ldf;
          const T* Fgi = Fg.defined() ? Fg.data_ptr<T>() + i * ldg : nullptr;
          for (int64_t k = 0; k < nk; ++k) {
            const int64_t kk = k0 + k;
            T* P = Pp + i * ldq + k;
            T* G = Gp + i * ldq + k * r;
            const double w = wbuf[i * nk + k];
            if (w == 0.0) {
              *P = T(0);
              for (int64_t j = 0; j < r; ++j) G[j] = T(0);
              continue;
            }
            const double lp = lpv[kk], vp = lp + s2, hp = lp / vp;
            const T* c = Fi + nk + k * r;
            const T* cg = has_gd ? Fgi + nk + k * r : nullptr;
            double t = rterm[b0 + i] + (has_gw ? double(gwp[(b0 + i) * K + kk]) : 0.0);
            double gcc = 0, gm = 0;  // (U^T gD) . c, gD . mu_k
            if (has_gd) {
              gm = Fgi ? double(Fgi[k]) : dot(gdp + (b0 + i) * D, mu + kk * D, D);
              double gDk = (1 - hp) * gm + hp * gdx[i];
              for (int64_t j = 0; j < r; ++j) {
                const double lj = lam[kk * r + j];
                gDk += (lj / (lj + s2) - hp) * double(c[j]) * double(cg[j]);
                gcc += double(c[j]) * double(cg[j]);
              }
              t += gDk;
            }
            const double a = w * t, p = a * (1 - hp) / s2;
            *P = static_cast<T>(p);
            nonzero += p != 0.0 || r > 0;  // G_k = w (h - hp) U_k^T gD is nonzero even where a_k = 0
            psum[i] += p;
            whp[i] += w * hp;
            double* sl = slot + kk * S;
            sl[0] += a;  // log_weights
            if (need.residual_var) {
              double sq = sqdist_exact(xb + i * D, mu + kk * D, D), cc = 0;
              for (int64_t j = 0; j < r; ++j) cc += double(c[j]) * double(c[j]);
              const double resid = r == D ? 0.0 : std::max(sq - cc, 0.0);
              double g = 0.5 * a * (resid / (vp * vp) - double(D - r) / vp);
              if (has_gd) g += w * s2 / (vp * vp) * (gdx[i] - gm - gcc);
              sl[1] += g;
            }
            sl[2] += p;
            for (int64_t j = 0; j < r; ++j) {
              const double lj = lam[kk * r + j], v = lj + s2, gain = lj / v - hp, cj = c[j];
              const double cgj = has_gd ? double(cg[j]) : 0.0;
              const double gj = a * gain * cj / s2 + w * gain * cgj;
              G[j] = static_cast<T>(gj);
              sl[3 + j] += 0.5 * a * (cj * cj / (v * v) - 1 / v) + w * s2 * cj * cgj / (v * v);
              sl[3 + r + j] += gj;
            }
            if (need.means) {
              Pall.data_ptr<T>()[(b0 + i) * K + kk] = static_cast<T>(p);
              if (has_gd) Ball.data_ptr<T>()[(b0 + i) * K + kk] = static_cast<T>(w * (1 - hp));
            }
          }
        }
        if (!need.x || nonzero == 0) continue;
        if (r > 0) {
          if (bwd.defined()) accb.add_(gemm_nt(GemmSite::kMixtureBackward, Q, panel(bwd, k0, nk, W, D, true)));
          else accb.addmm_(Q, pan);
        } else if (nonzero * kSparseRatio < n * nk) {  // the few P_k mu_k added directly
          for (int64_t i = 0; i < n; ++i)
            for (int64_t k = 0; k < nk; ++k) {
              const T p = Pp[i * ldq + k];
              if (p == T(0)) continue;
              const T* mk = mu + (k0 + k) * D;
              T* ai = accb.data_ptr<T>() + i * D;
              for (int64_t d = 0; d < D; ++d) ai[d] += p * mk[d];
            }
        } else {
          accb.addmm_(Q, Mk);
        }
      }
      if (!need.x) continue;
      T* g = gx.data_ptr<T>();
      for (int64_t i = 0; i < n; ++i) {
        const T* a = accb.data_ptr<T>() + i * D;
        const T* xi = xb + i * D;
        const T ps = static_cast<T>(psum[i]), wh = static_cast<T>(whp[i]);
        T* o = g + (b0 + i) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = a[d] - ps * xi[d];
        if (has_gd) {
          const T* gd = gdp + (b0 + i) * D;
          for (int64_t d = 0; d < D; ++d) o[d] += wh * gd[d];
        }
      }
    }
  });

  // add up the row blocks' per-component sums
  at::Tensor sums = at::empty({K, S}, x.options().dtype(at::kDouble));
  double* sp = sums.data_ptr<double>();
  for (int64_t e = 0; e < K * S; ++e) {
    double t = 0;
    for (int64_t rb = 0; rb < num_rb; ++rb) t += slots[rb * K * S + e];
    sp[e] = t;
  }
  const at::Tensor sumsT = sums.to(x.scalar_type());
  if (need.log_weights) glogw.copy_(sumsT.select(1, 0));
  if (need.residual_var) glp.copy_(sumsT.select(1, 1));
  if (need.eigvals) glam.copy_(sumsT.narrow(1, 3, r));
  if (need.means) {
    gmu.copy_(at::mm(Pall.t(), x));
    if (has_gd) gmu.add_(at::mm(Ball.t(), grad_den));
    gmu.sub_(sumsT.select(1, 2).unsqueeze(1) * means);
    if (r > 0) gmu.sub_(at::bmm(bases, sumsT.narrow(1, 3 + r, r).unsqueeze(2)).squeeze(2));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixture_posterior_backward_cpu(
    const at::Tensor& x, const at::Tensor& means, const at::Tensor& bases, const at::Tensor& eigvals,
    const at::Tensor& residual_var, const at::Tensor& log_weights, const at::Tensor& sigma,
    const at::Tensor& logp, const at::Tensor& row_term, const at::Tensor& grad_den,
    const at::Tensor& grad_weights, bool need_x, bool need_means, bool need_eigvals,
    bool need_residual_var, bool need_log_weights, const std::optional<at::Tensor>& forward_panels,
    const std::optional<at::Tensor>& backward_panels) {
  const char* op = "gsa_kernels::mixture_posterior_backward (cpu)";
  check_mixture(x, means, bases, eigvals, residual_var, log_weights, sigma, op);
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor");
  TORCH_CHECK_TYPE(x.scalar_type() == compute_dtype(x), op, ": x must be in the compute dtype (float32 or float64)");
  const int64_t B = x.size(0), D = x.size(1), K = means.size(0), r = bases.size(2);
  check_rows(x, logp, "logp", {B}, op);
  check_rows(x, row_term, "row_term", {B}, op);
  if (grad_den.numel() > 0) check_rows(x, grad_den, "grad_den", {B, D}, op);
  if (grad_weights.numel() > 0) check_rows(x, grad_weights, "grad_weights", {B, K}, op);
  auto o = x.options();
  auto maybe = [&](bool need, at::IntArrayRef shape) { return need ? at::zeros(shape, o) : at::empty({0}, o); };
  at::Tensor gx = maybe(need_x, {B, D}), gmu = maybe(need_means, {K, D}), glam = maybe(need_eigvals, {K, r});
  at::Tensor glp = maybe(need_residual_var, {K}), glogw = maybe(need_log_weights, {K});
  if (B == 0) return {gx, gmu, glam, glp, glogw};
  const Needs need{need_x, need_means, need_eigvals, need_residual_var, need_log_weights};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixture_posterior_backward", [&] {
    backward_impl<scalar_t>(x, means, bases, eigvals, residual_var, log_weights, sigma, logp, row_term,
                            grad_den, grad_weights, forward_panels, backward_panels, need, gx, gmu, glam,
                            glp, glogw);
  });
  return {gx, gmu, glam, glp, glogw};
}

}  // namespace

TORCH_LIBRARY_IMPL(gsa_kernels, CPU, m) {
  m.impl("mixture_posterior_backward", &mixture_posterior_backward_cpu);
}

}  // namespace gsa::cpu
