// CPU kernel of the mixture posterior (docs/architecture.md): component weights, log p and the
// posterior-mean denoiser of a K-component low-rank Gaussian mixture, r > 0 (isotropic components,
// r = 0, and with them the empirical "delta" mixture of a training set: empirical.cpp).
//
// Parallel over row blocks; inside a row block the components stream in blocks with an online
// softmax (running max m, sum l, and the unnormalised denoiser accumulator), so memory is
// [rows, D] + [rows, components per block], never B x K x D (nor B x K unless the weights are
// returned). Per (row block, component block k0 .. k0 + nk - 1), with the block's components in
// one cached panel (forward_panels, backward_panels in mixture_blocks.h):
//   F = X [M; Ut]^T    x . mu_k and U_k^T x for every component of the block   (one GEMM)
//                      fast squared distances |x - mu_k|^2 = |x|^2 + |mu_k|^2 - 2 x . mu_k,
//                      projections c_k = U_k^T x - U_k^T mu_k
//   logits             component_logpdf (include/gsa/spectral.h) + log weight
//   refinement         the expansion loses ~eps sqrt(D) |x| |mu| of |x - mu|^2, and the GEMM's
//                      c_k ~eps sqrt(D) |x| per coefficient, which is huge next to sigma^2 at
//                      small sigma. When that error bound E (in logit units) exceeds kLogitTol,
//                      every component whose fast logit is within 2 E + kCutoff of the running
//                      max is recomputed in double from y = x - mu_k: |y|^2 (r = 0), or c_k =
//                      U_k^T y and the residual |y - U_k c_k|^2 summed directly (r > 0; the
//                      expansion |y|^2 - |c_k|^2 cancels when y lies near span(U_k)). Skipped
//                      components have weight < exp(-kCutoff) relative to the max, both
//                      exactly and as computed.
//   accumulate         acc = acc * rescale + [P | G] [M | U]^T with P_k = p_k (1 - h_perp),
//                      G_k = p_k g c_k  (one GEMM)
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "empirical.h"
#include "exact_sums.h"
#include "gsa/checks.h"
#include "gsa/spectral.h"
#include "mixture_blocks.h"

namespace gsa::cpu {
namespace {

// Exact (double) terms of component_logpdf for a low-rank component: y = x - mu, c = U^T y
// (returned in c, U: [D, r] row-major), and the residual |y - U c|^2 summed directly (0 when
// r == D). y, c: scratch of D and r doubles.
template <typename T>
double lowrank_terms_exact(const T* x, const T* mu, const T* U, const T* lam, double s2, int64_t D,
                           int64_t r, double* y, double* c, double& cc_w) {
  for (int64_t d = 0; d < D; ++d) y[d] = static_cast<double>(x[d]) - static_cast<double>(mu[d]);
  std::fill(c, c + r, 0.0);
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = 0; j < r; ++j) c[j] += static_cast<double>(U[d * r + j]) * y[d];
  cc_w = 0;
  for (int64_t j = 0; j < r; ++j) cc_w += c[j] * c[j] / (static_cast<double>(lam[j]) + s2);
  if (r == D) return 0.0;
  double residual = 0;
  for (int64_t d = 0; d < D; ++d) {
    double e = y[d];
    for (int64_t j = 0; j < r; ++j) e -= static_cast<double>(U[d * r + j]) * c[j];
    residual += e * e;
  }
  return residual;
}

// (forward, backward) panels of means [K, D] and bases [K, D, r], r > 0, in their dtype.
std::tuple<at::Tensor, at::Tensor> mixture_panels(const at::Tensor& means, const at::Tensor& bases) {
  const char* op = "gsa_kernels::mixture_panels (cpu)";
  TORCH_CHECK_VALUE(means.dim() == 2 && bases.dim() == 3 && bases.size(0) == means.size(0) &&
                        bases.size(1) == means.size(1) && bases.size(2) > 0,
                    op, ": means must be [K, D] and bases [K, D, r] with r > 0, got ", means.sizes(),
                    " and ", bases.sizes());
  TORCH_CHECK_TYPE((means.scalar_type() == at::kFloat || means.scalar_type() == at::kDouble) &&
                       bases.scalar_type() == means.scalar_type(),
                   op, ": means and bases must both be float32 or both float64");
  TORCH_CHECK_VALUE(means.device().is_cpu() && bases.device().is_cpu() && means.is_contiguous() &&
                        bases.is_contiguous(),
                    op, ": means and bases must be contiguous CPU tensors");
  const int64_t K = means.size(0), D = means.size(1), r = bases.size(2), KB = component_block(K, r);
  return AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "mixture_panels", [&] {
    at::Tensor fwd = forward_panels<scalar_t>(means, bases, KB);
    at::Tensor bwd = backward_panels<scalar_t>(fwd, K, D, r + 1, KB);
    return std::make_tuple(fwd, bwd);
  });
}

template <typename X>
void mixture_impl(const at::Tensor& x, const at::Tensor& means, const at::Tensor& bases,
                  const at::Tensor& eigvals, const at::Tensor& residual_var,
                  const at::Tensor& log_weights, const at::Tensor& sigma, bool need_denoised,
                  bool need_weights, const at::Tensor& fwd, const at::Tensor& bwd,
                  at::Tensor& den, at::Tensor& logp, at::Tensor& weights) {
  using T = at::opmath_type<X>;
  const int64_t B = x.size(0), D = x.size(1), K = means.size(0), r = bases.size(2);
  const T* mu = means.data_ptr<T>();
  const T* basis = bases.data_ptr<T>();
  const T* lam = eigvals.data_ptr<T>();
  const T* lpv = residual_var.data_ptr<T>();
  const T* logw = log_weights.data_ptr<T>();
  const T* sig = sigma.data_ptr<T>();
  T* logp_p = logp.data_ptr<T>();
  T* w_p = need_weights ? weights.data_ptr<T>() : nullptr;
  X* den_p = need_denoised ? den.data_ptr<X>() : nullptr;

  // equal_lp: h_perp is one number per row
  const auto [mu_sq, max_mu_sq, min_lp, equal_lp] = component_norms(mu, lpv, K, D);
  // the smallest variance any logit term is divided by (less s^2): residual_var or an eigval
  double min_var = min_lp;
  for (int64_t e = 0; e < K * r; ++e) min_var = std::min(min_var, static_cast<double>(lam[e]));
  // Component blocks of KB (component_block), W = r + 1 panel rows per component; U_k^T mu_k
  // per call (one more row's worth of the forward GEMM).
  const int64_t KB = component_block(K, r);
  const int64_t num_kb = (K + KB - 1) / KB;
  const int64_t W = r + 1;
  const at::Tensor Umu = at::bmm(means.unsqueeze(1), bases).view({K, r});
  const T* umu = Umu.data_ptr<T>();
  // The fast |x - mu|^2 only enters through (|y|^2 - |c|^2) / (lp + s^2); not at all when r = D.
  const bool sq_matters = r < D;
  const double eps = std::numeric_limits<T>::epsilon();
  const double logit_tol = std::is_same_v<T, double> ? kLogitTol64 : kLogitTol;

  const int64_t BB = tall_row_block(B);  // each block streams every component panel twice

  at::parallel_for(0, B, BB, [&](int64_t begin, int64_t end) {
    auto opts = options_for<T>();
    at::Tensor xbuf = std::is_same_v<X, T> ? at::Tensor() : at::empty({BB, D}, opts);
    at::Tensor acc = need_denoised ? at::empty({BB, D}, opts) : at::Tensor();
    // Q = [P | G] per block: P_k = p_k (1 - h_perp) multiplies mu_k, G_k = p_k g c_k multiplies U_k
    at::Tensor Qbuf = at::empty({BB * KB * W}, opts);
    std::vector<double> logit(BB * KB), m(BB), l(BB), hx(BB), m_fast(BB), err(BB), s2v(BB), x_sq(BB);
    std::vector<T> rescale(BB);
    std::vector<double> y_exact(D), c_exact(r);
    std::vector<double> m_block(need_weights ? BB * num_kb : 0);

    for (int64_t b0 = begin; b0 < end; b0 += BB) {
      const int64_t n = std::min(BB, end - b0);
      const at::Tensor Xb = rows_in_compute_dtype<X, T>(x, xbuf, b0, n);
      const T* xb = Xb.data_ptr<T>();
      with_isa([&] {
        for (int64_t i = 0; i < n; ++i) {
          const double s = sig[b0 + i];
          s2v[i] = s * s;
          m[i] = m_fast[i] = -std::numeric_limits<double>::infinity();
          l[i] = hx[i] = 0;
          x_sq[i] = sum_squares(xb + i * D, D);
          // error bound of the fast logits (x 2 (var + s^2)): the expanded |y|^2 (when it enters),
          // |c|^2 from coefficients c_j = U_j^T x - U_j^T mu each off by up to dc, plus
          // c^T (U^T U - I) c of a rounded basis (the exact logit sums the residual directly)
          const double gemm = kGemmErr * eps * std::sqrt(double(D));
          const double y_norm = std::sqrt(x_sq[i]) + std::sqrt(max_mu_sq), dc = gemm * y_norm;  // |U_j| = 1
          const double e = (sq_matters ? gemm * (x_sq[i] + max_mu_sq) / 2 : 0.0) +
                           (r * dc * dc + 2 * std::sqrt(double(r)) * y_norm * dc + 2 * r * eps * y_norm * y_norm);
          err[i] = e / (2 * (min_var + s2v[i]));
        }
      });
      at::Tensor accb = need_denoised ? acc.narrow(0, 0, n).zero_() : at::Tensor();

      for (int64_t kb = 0; kb < num_kb; ++kb) {
        const int64_t k0 = kb * KB, nk = std::min(KB, K - k0);
        // F = [x . mu_k | U_k^T x] for the block's components: [n, nk W]
        const at::Tensor F = gemm_nt(GemmSite::kMixtureForward, Xb, panel(fwd, k0, nk, W, D, false));
        const T* Sp = F.data_ptr<T>();
        const int64_t lds = F.stride(0), ldc = lds;
        T* Cp = F.data_ptr<T>() + nk;  // c_k of row i at Cp + i ldc + k r
        const at::Tensor Q = Qbuf.narrow(0, 0, n * nk * W).view({n, nk * W});
        T* Pp = Q.data_ptr<T>();
        T* Gp = Pp + nk;
        const int64_t ldp = nk * W, ldg = ldp;
        int64_t nonzero_p = 0;

        with_isa([&] {
          for (int64_t i = 0; i < n; ++i) {
            const double s2 = s2v[i];
            double* L = logit.data() + i * KB;
            // fast logits
            for (int64_t k = 0; k < nk; ++k) {
              const int64_t kk = k0 + k;
              const double sq = x_sq[i] + mu_sq[kk] - 2.0 * static_cast<double>(Sp[i * lds + k]);
              double cc = 0, cc_w = 0;
              T* c = Cp + i * ldc + k * r;
              const T* lk = lam + kk * r;
              for (int64_t j = 0; j < r; ++j) {
                c[j] -= umu[kk * r + j];
                const double cj = c[j];
                cc += cj * cj;
                cc_w += cj * cj / (static_cast<double>(lk[j]) + s2);
              }
              L[k] = logw[kk] + component_logpdf<double>(sq, cc_w, cc, log_det_low(lk, r, s2), lpv[kk], s2, D, r);
            }
            double block_fast_max = -std::numeric_limits<double>::infinity();
            for (int64_t k = 0; k < nk; ++k) block_fast_max = std::max(block_fast_max, L[k]);
            m_fast[i] = std::max(m_fast[i], block_fast_max);
            // exact refinement of the components that can matter
            if (err[i] > logit_tol) {
              const double keep = m_fast[i] - 2 * err[i] - kCutoff;
              for (int64_t k = 0; k < nk; ++k) {
                if (L[k] < keep) continue;
                const int64_t kk = k0 + k;
                // exact c (kept for the denoiser) and residual
                double cc_w;
                const double residual = lowrank_terms_exact(xb + i * D, mu + kk * D, basis + kk * D * r, lam + kk * r,
                                                            s2, D, r, y_exact.data(), c_exact.data(), cc_w);
                T* c = Cp + i * ldc + k * r;
                for (int64_t j = 0; j < r; ++j) c[j] = static_cast<T>(c_exact[j]);
                L[k] = logw[kk] + component_logpdf_residual<double>(residual, cc_w, log_det_low(lam + kk * r, r, s2),
                                                                    lpv[kk], s2, D, r);
              }
            }
            // online softmax update
            double m_new = m[i];
            for (int64_t k = 0; k < nk; ++k) m_new = std::max(m_new, L[k]);
            const double scale = merge_scale(m[i], m_new);
            const double hp0 = static_cast<double>(lpv[0]) / (static_cast<double>(lpv[0]) + s2);
            double lsum = 0, hsum = 0;
            for (int64_t k = 0; k < nk; ++k) {
              const int64_t kk = k0 + k;
              const double d = L[k] - m_new;
              const double p = d > -kNegligible ? std::exp(d) : 0.0;
              const double hp = equal_lp ? hp0 : static_cast<double>(lpv[kk]) / (static_cast<double>(lpv[kk]) + s2);
              lsum += p;
              hsum += p * hp;
              Pp[i * ldp + k] = static_cast<T>(p * (1.0 - hp));
              nonzero_p += Pp[i * ldp + k] != T(0);
              if (need_weights) w_p[(b0 + i) * K + kk] = static_cast<T>(p);
              if (need_denoised) {  // G = p (lam / (lam + s^2) - hp) c
                const T* c = Cp + i * ldc + k * r;
                T* g = Gp + i * ldg + k * r;
                for (int64_t j = 0; j < r; ++j) {
                  const double lj = lam[kk * r + j];
                  g[j] = static_cast<T>(p * (lj / (lj + s2) - hp) * c[j]);
                }
              }
            }
            l[i] = l[i] * scale + lsum;
            hx[i] = hx[i] * scale + hsum;
            if (need_weights) m_block[i * num_kb + kb] = m_new;
            rescale[i] = static_cast<T>(scale);
            m[i] = m_new;
          }
        });
        if (!need_denoised) continue;
        // acc = acc * rescale (+ z)
        const bool gemm_back = nonzero_p > 0;
        const at::Tensor z = gemm_back ? gemm_nt(GemmSite::kMixtureBackward, Q, panel(bwd, k0, nk, W, D, true)) : at::Tensor();
        with_isa([&] {
          for (int64_t i = 0; i < n; ++i) {
            T* a = accb.data_ptr<T>() + i * D;
            const T sc = rescale[i];
            if (gemm_back) {
              const T* zi = z.data_ptr<T>() + i * D;
              for (int64_t d = 0; d < D; ++d) a[d] = a[d] * sc + zi[d];
            } else if (sc != T(1)) {
              for (int64_t d = 0; d < D; ++d) a[d] *= sc;
            }
          }
        });
      }

      const T* acc_p = need_denoised ? accb.data_ptr<T>() : nullptr;
      with_isa([&] {
        finish_rows<X, T>(b0, n, D, K, KB, num_kb, m.data(), l.data(), hx.data(), x_sq.data(), m_block.data(), acc_p,
                          xb, logp_p, den_p, w_p);
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_posterior_cpu(
    const at::Tensor& x, const at::Tensor& means, const at::Tensor& bases,
    const at::Tensor& eigvals, const at::Tensor& residual_var, const at::Tensor& log_weights,
    const at::Tensor& sigma, bool need_denoised, bool need_weights,
    const std::optional<at::Tensor>& given_forward_panels,
    const std::optional<at::Tensor>& given_backward_panels) {
  const char* op = "gsa_kernels::mixture_posterior (cpu)";
  check_mixture(x, means, bases, eigvals, residual_var, log_weights, sigma, op);
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor");
  const int64_t B = x.size(0), D = x.size(1), K = means.size(0), r = bases.size(2);
  const auto cd = compute_dtype(x);
  at::Tensor den = need_denoised ? at::empty({B, D}, x.options()) : at::empty({0}, x.options());
  at::Tensor logp = at::empty({B}, x.options().dtype(cd));
  at::Tensor weights = at::empty(need_weights ? at::IntArrayRef{B, K} : at::IntArrayRef{0},
                                 x.options().dtype(cd));
  if (B == 0) return {den, logp, weights};
  if (bases.size(2) == 0) {  // isotropic components / the empirical mixture: empirical.cpp
    empirical_posterior_cpu(x, means, residual_var, log_weights, sigma, need_denoised, need_weights,
                            den, logp, weights);
    return {den, logp, weights};
  }
  at::Tensor fwd, bwd;
  {
    const int64_t KB = component_block(K, r), n = K * (r + 1) * D;
    AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "mixture_panels", [&] {
      fwd = layout_or(given_forward_panels, means, {n}, "forward_panels", op,
                      [&] { return forward_panels<scalar_t>(means, bases, KB); });
      if (need_denoised)
        bwd = layout_or(given_backward_panels, means, {n}, "backward_panels", op,
                        [&] { return backward_panels<scalar_t>(fwd, K, D, r + 1, KB); });
    });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mixture_posterior", [&] {
    mixture_impl<scalar_t>(x, means, bases, eigvals, residual_var, log_weights, sigma,
                           need_denoised, need_weights, fwd, bwd, den, logp, weights);
  });
  return {den, logp, weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(gsa_kernels, CPU, m) {
  m.impl("mixture_posterior", &mixture_posterior_cpu);
  m.impl("mixture_panels", &mixture_panels);
}

}  // namespace gsa::cpu
