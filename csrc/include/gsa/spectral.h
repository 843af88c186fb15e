// Host/device math shared by every backend (C++ CPU, CUDA, SIMT emulation); the Triton kernels
// mirror these formulas in gsa_kernels/triton and answer to the same reference.
//
// Every Gaussian op is one "spectral map" per row b of x [B, D] (docs/architecture.md):
//     y   = p * x - q * mu                     (p, q: per-row scalars)
//     c   = U^T y                              ([r] coefficients, U: [D, r] orthonormal)
//     out = a * y + b * mu + U diag(f_j) c     (f_j = f(lam_j; row params))
// so a kernel reads x once to form c, applies f, and writes out once. No D x D matrix.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define GSA_HD __host__ __device__ __forceinline__
#else
#define GSA_HD inline
#endif

namespace gsa {

#if !defined(__CUDACC__)
using std::exp;
using std::isinf;
using std::log;
using std::sqrt;
#endif

// Which op a spectral map computes. Values are part of the op schema (int kind): keep in sync
// with gsa_kernels/ops.py (KIND_*).
enum SpectralKind : int { kDenoise = 0, kScore = 1, kFlow = 2 };

template <typename T>
struct RowCoeffs {
  T p, q, a, b;
};

// Per-row parameters of a spectral map: residual_var (the variance off span(U)), sigma_from /
// sigma_to (sigma_to for flows only), scale_from / scale_to (flow only). sigma_from = +inf in a
// flow means x is unit noise eps: then y = x (no mean removed) and psi_j * sigma_from ->
// sqrt(lam_j + sigma_to^2).
template <typename T>
GSA_HD RowCoeffs<T> row_coeffs(int kind, T residual_var, T sigma_from, T sigma_to, T scale_from, T scale_to) {
  RowCoeffs<T> r;
  if (kind == kDenoise) {  // D = mu + h_perp (x - mu) + U diag(h_j - h_perp) c
    T s2 = sigma_from * sigma_from;
    r.p = T(1); r.q = T(1); r.a = residual_var / (residual_var + s2); r.b = T(1);
  } else if (kind == kScore) {  // -(Sigma + s^2 I)^-1 (x - mu), without the 1/s^2 cancellation
    T s2 = sigma_from * sigma_from;
    r.p = T(1); r.q = T(1); r.a = -T(1) / (residual_var + s2); r.b = T(0);
  } else {  // flow: scale_to [mu + psi_perp y + U diag(psi_j - psi_perp) c],  y = x / scale_from - mu
    T to2 = sigma_to * sigma_to;
    if (isinf(sigma_from)) {
      r.p = T(1); r.q = T(0); r.a = scale_to * sqrt(residual_var + to2);
    } else {
      r.p = T(1) / scale_from; r.q = T(1);
      r.a = scale_to * sqrt((residual_var + to2) / (residual_var + sigma_from * sigma_from));
    }
    r.b = scale_to;
  }
  return r;
}

// The spectral function f_j for one eigenvalue lam (same row parameters as row_coeffs).
template <typename T>
GSA_HD T spectral_f(int kind, T lam, T residual_var, T sigma_from, T sigma_to, T scale_from, T scale_to) {
  (void)scale_from;
  if (kind == kDenoise) {
    T s2 = sigma_from * sigma_from;
    return lam / (lam + s2) - residual_var / (residual_var + s2);
  } else if (kind == kScore) {
    T s2 = sigma_from * sigma_from;
    return (lam - residual_var) / ((lam + s2) * (residual_var + s2));
  } else {
    T to2 = sigma_to * sigma_to;
    if (isinf(sigma_from)) return scale_to * (sqrt(lam + to2) - sqrt(residual_var + to2));
    T from2 = sigma_from * sigma_from;
    return scale_to * (sqrt((lam + to2) / (lam + from2)) - sqrt((residual_var + to2) / (residual_var + from2)));
  }
}

// The map's gain along an eigenvector of variance v: spectral_f(kind, lam, residual_var, ...)
// equals eigen_gain(lam) - eigen_gain(residual_var) and row_coeffs(...).a equals
// eigen_gain(residual_var). For a full-rank basis (r == D) there are no residual directions and
// the map is b mu + U diag(eigen_gain(lam_j)) c: kernels use that form there, because a y and
// U diag(f) c both grow like |y| / sigma^2 at small sigma (score, flow from small sigma) and
// cancel to a result of size |y| / lam.
template <typename T>
GSA_HD T eigen_gain(int kind, T v, T sigma_from, T sigma_to, T scale_from, T scale_to) {
  (void)scale_from;
  const T from2 = sigma_from * sigma_from, to2 = sigma_to * sigma_to;
  if (kind == kDenoise) return v / (v + from2);
  if (kind == kScore) return -T(1) / (v + from2);
  if (isinf(sigma_from)) return scale_to * sqrt(v + to2);
  return scale_to * sqrt((v + to2) / (v + from2));
}

// log(2 pi), exact in double (a float64 path never sees a float32 constant)
constexpr double kLog2Pi = 1.8378770664093454835606594728112;

// Mixture component log-density of the noised component N(mu_k, Sigma_k + s^2 I), given the
// residual |P_perp y|^2 = |y - U_k c|^2 (y = x - mu_k), cc_w = sum_j c_j^2 / (lam_j + s^2) and
// logdet_low = sum_j log(lam_j + s^2). D, r are the dimensions (docs/architecture.md).
template <typename T>
GSA_HD T component_logpdf_residual(T residual, T cc_w, T logdet_low, T residual_var, T s2, long D, long r) {
  T vp = residual_var + s2;
  if (r == D) residual = T(0);  // no residual directions at full rank
  return T(-0.5) * (cc_w + residual / vp + logdet_low + T(D - r) * log(vp) + T(D) * T(kLog2Pi));
}

// The same given sq = |y|^2 (computed directly, not by expansion, where accuracy matters) and
// cc = |c|^2: the residual is sq - cc, which cancels when y lies near span(U_k) (kernels that
// need accuracy there sum the residual directly and call component_logpdf_residual).
template <typename T>
GSA_HD T component_logpdf(T sq, T cc_w, T cc, T logdet_low, T residual_var, T s2, long D, long r) {
  const T residual = sq - cc;  // rounding: |P_perp y|^2 >= 0
  return component_logpdf_residual(residual < T(0) ? T(0) : residual, cc_w, logdet_low, residual_var, s2, D, r);
}

// component_logpdf of an isotropic component (r = 0) split into a per-row part and a
// per-component part, so that kernels take the log once per row when every residual_var is equal:
//   component_logpdf(sq, 0, 0, 0, residual_var, s2, D, 0)
//     = isotropic_log_norm(residual_var + s2, D) - 0.5 sq / (residual_var + s2)
template <typename T>
GSA_HD T isotropic_log_norm(T vp, long D) {
  return T(-0.5) * T(D) * (log(vp) + T(kLog2Pi));
}

// Mixture per-component denoiser factors: D_k = mu_k + h_perp (x - mu_k) + U diag(g_j) c,
// h_perp = residual_var / (residual_var + s^2), g_j = lam_j/(lam_j + s^2) - h_perp. (Same as the kDenoise map.)

// Online-softmax state for streaming over components: running max m, running sum l of
// exp(logit - m); weighted sums are rescaled by exp(m_old - m_new) when m grows. Two partial
// states (over disjoint component sets) merge exactly with merge_scale().
template <typename T>
GSA_HD T merge_scale(T m_from, T m_to) {
  return isinf(m_from) && m_from < T(0) ? T(0) : exp(m_from - m_to);
}

}  // namespace gsa
