// Host/device math shared by every backend (C++ CPU, CUDA, SIMT emulation); the Triton kernels
// mirror these formulas in gsa_kernels/triton and answer to the same reference.
//
// Every Gaussian op is one "spectral map" per row b of x [B, D] (DESIGN.md section 1):
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

// Per-row parameters of a spectral map. lp = residual variance lam_perp; sa/sb = sigma_from/to
// (sa only for denoise/score); ka/kb = scale_from/to (flow only). sa = +inf in a flow means x is
// unit noise eps: then y = x (no mean removed) and psi_j * sa -> sqrt(lam_j + sb^2).
template <typename T>
GSA_HD RowCoeffs<T> row_coeffs(int kind, T lp, T sa, T sb, T ka, T kb) {
  RowCoeffs<T> r;
  if (kind == kDenoise) {  // D = mu + h_perp (x - mu) + U diag(h_j - h_perp) c
    T s2 = sa * sa;
    r.p = T(1); r.q = T(1); r.a = lp / (lp + s2); r.b = T(1);
  } else if (kind == kScore) {  // -(Sigma + s^2 I)^-1 (x - mu), without the 1/s^2 cancellation
    T s2 = sa * sa;
    r.p = T(1); r.q = T(1); r.a = -T(1) / (lp + s2); r.b = T(0);
  } else {  // flow: x_b = kb [mu + psi_perp y + U diag(psi_j - psi_perp) c],  y = x/ka - mu
    T sb2 = sb * sb;
    if (isinf(sa)) {
      r.p = T(1); r.q = T(0); r.a = kb * sqrt(lp + sb2);
    } else {
      r.p = T(1) / ka; r.q = T(1); r.a = kb * sqrt((lp + sb2) / (lp + sa * sa));
    }
    r.b = kb;
  }
  return r;
}

// The spectral function f_j for one eigenvalue lam (same row parameters as row_coeffs).
template <typename T>
GSA_HD T spectral_f(int kind, T lam, T lp, T sa, T sb, T ka, T kb) {
  (void)ka;
  if (kind == kDenoise) {
    T s2 = sa * sa;
    return lam / (lam + s2) - lp / (lp + s2);
  } else if (kind == kScore) {
    T s2 = sa * sa;
    return (lam - lp) / ((lam + s2) * (lp + s2));
  } else {
    T sb2 = sb * sb;
    if (isinf(sa)) return kb * (sqrt(lam + sb2) - sqrt(lp + sb2));
    T sa2 = sa * sa;
    return kb * (sqrt((lam + sb2) / (lam + sa2)) - sqrt((lp + sb2) / (lp + sa2)));
  }
}

// The map's gain along an eigenvector of variance v: spectral_f(kind, lam, lp, ...) equals
// eigen_gain(lam) - eigen_gain(lp) and row_coeffs(...).a equals eigen_gain(lp). For a full-rank
// basis (r == D) there are no residual directions and the map is b mu + U diag(eigen_gain(lam_j)) c:
// kernels use that form there, because a y and U diag(f) c both grow like |y| / sigma^2 at small
// sigma (score, flow from small sigma) and cancel to a result of size |y| / lam.
template <typename T>
GSA_HD T eigen_gain(int kind, T v, T sa, T sb, T ka, T kb) {
  (void)ka;
  if (kind == kDenoise) return v / (v + sa * sa);
  if (kind == kScore) return -T(1) / (v + sa * sa);
  if (isinf(sa)) return kb * sqrt(v + sb * sb);
  return kb * sqrt((v + sb * sb) / (v + sa * sa));
}

// Mixture component log-density of the noised component N(mu_k, Sigma_k + s^2 I), given
// sq = |x - mu_k|^2 (computed directly, not by expansion, where accuracy matters),
// cc_w = sum_j c_j^2 / (lam_j + s^2), cc = |c|^2 = sum_j c_j^2, logdet_low = sum_j log(lam_j + s^2).
// D, r are the dimensions. Matches DESIGN.md section 1.
template <typename T>
GSA_HD T component_logpdf(T sq, T cc_w, T cc, T logdet_low, T lp, T s2, long D, long r) {
  const T kLog2Pi = T(1.8378770664093454835606594728112);
  T vp = lp + s2;
  T resid = sq - cc;
  if (resid < T(0) || r == D) resid = T(0);  // rounding: |P_perp y|^2 >= 0, and 0 for full rank
  return T(-0.5) * (cc_w + resid / vp + logdet_low + T(D - r) * log(vp) + T(D) * kLog2Pi);
}

// component_logpdf of an isotropic component (r = 0) split into a per-row part and a
// per-component part, so that kernels take the log once per row when every lp is equal:
//   component_logpdf(sq, 0, 0, 0, lp, s2, D, 0) = isotropic_log_norm(lp + s2, D) - 0.5 sq / (lp + s2)
template <typename T>
GSA_HD T isotropic_log_norm(T vp, long D) {
  return T(-0.5) * T(D) * (log(vp) + T(1.8378770664093454835606594728112));
}

// Mixture per-component denoiser factors: D_k = mu_k + h_perp (x - mu_k) + U diag(g_j) c,
// h_perp = lp / (lp + s^2), g_j = lam_j/(lam_j + s^2) - h_perp. (Same as the kDenoise map.)

// Online-softmax state for streaming over components: running max m, running sum l of
// exp(logit - m); weighted sums are rescaled by exp(m_old - m_new) when m grows. Two partial
// states (over disjoint component sets) merge exactly with merge_scale().
template <typename T>
GSA_HD T merge_scale(T m_from, T m_to) {
  return isinf(m_from) && m_from < T(0) ? T(0) : exp(m_from - m_to);
}

}  // namespace gsa
