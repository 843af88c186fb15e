// CPU kernel of the r = 0 mixture posterior: isotropic components, and with residual_var = 0 the
// empirical ("delta") mixture of a training set (DESIGN.md section 1). Called by
// mixture_posterior_cpu (mixture.cpp) when the bases have no columns.
//
// Parallel over row blocks; inside a row block the points stream in blocks of <= 256 with an
// online softmax (running max m, sum l, unnormalised denoiser accumulator acc), as in
// mixture.cpp. Per (row block, point block):
//   F = X M^T          x . mu_k (one GEMM): fast |x - mu_k|^2 = |x|^2 + |mu_k|^2 - 2 x . mu_k
//   refinement         where the fast logits may be off by more than kLogitTol, the points
//                      within reach of the running max get |x - mu_k|^2 from the differences in
//                      double (see err_bound / err_estimate below)
//   p = exp(L - m)     one vectorized exp over the block (ATen's exp kernel)
//   acc = acc * rescale + P M
//                      dense posterior (sigma large): one GEMM; few nonzero p (sigma small):
//                      the nonzero p_k mu_k rows are added directly. The choice counts the
//                      nonzero p of the block (kSparseRatio, measured below).
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "common.h"
#include "empirical.h"
#include "gsa/spectral.h"

namespace gsa::cpu {
namespace {

constexpr double kLogitTol = 1e-4;    // fast logits this exact need no refinement
constexpr double kCutoff = 30.0;      // exp(-30) ~ 1e-13: weight of a point never refined
constexpr double kNegligible = 50.0;  // below the running max by more: weight dropped (< 2e-22)
constexpr double kGemmErr = 4.0;      // |fl(x.mu) - x.mu| <= kGemmErr eps sqrt(D) |x| |mu|
// Rounding errors of the fast distances are measured on kProbes points per row; the estimate
// is kSafety times the worst measured rate (the largest of 1e5 roughly Gaussian errors is
// ~4.5 standard deviations; the largest of 16 ~2).
constexpr int64_t kProbes = 16;
constexpr double kSafety = 8.0;
// Sparse back-projection (axpy per nonzero p) while fewer than 1 in kSparseRatio of the block's
// weights are nonzero: an axpy streams a [D] row of acc per point (~8 flop / cycle) where the
// GEMM runs at ~60 (AVX-512, this machine); 16 measured fastest between 8 and 32.
constexpr int64_t kSparseRatio = 16;
constexpr int64_t kPointBlock = 256;

// |a - b|^2 summed in double from the exact differences (a, b float32-representable).
inline double sqdist_exact(const float* a, const float* b, int64_t D) {
  int64_t d = 0;
  double s = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  for (; d + 8 <= D; d += 8) {
    __m256 fa = _mm256_loadu_ps(a + d), fb = _mm256_loadu_ps(b + d);
    __m256d lo = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(fa)),
                               _mm256_cvtps_pd(_mm256_castps256_ps128(fb)));
    __m256d hi = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(fa, 1)),
                               _mm256_cvtps_pd(_mm256_extractf128_ps(fb, 1)));
    acc0 = _mm256_fmadd_pd(lo, lo, acc0);
    acc1 = _mm256_fmadd_pd(hi, hi, acc1);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(acc0, acc1));
  s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
  for (; d < D; ++d) {
    const double t = static_cast<double>(a[d]) - static_cast<double>(b[d]);
    s += t * t;
  }
  return s;
}

inline double sqdist_exact(const double* a, const double* b, int64_t D) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const double t0 = a[d] - b[d], t1 = a[d + 1] - b[d + 1];
    const double t2 = a[d + 2] - b[d + 2], t3 = a[d + 3] - b[d + 3];
    s0 += t0 * t0; s1 += t1 * t1; s2 += t2 * t2; s3 += t3 * t3;
  }
  for (; d < D; ++d) s0 += (a[d] - b[d]) * (a[d] - b[d]);
  return (s0 + s1) + (s2 + s3);
}

template <typename T>
double sum_squares(const T* v, int64_t D) {
  double s = 0;
  for (int64_t d = 0; d < D; ++d) s += static_cast<double>(v[d]) * static_cast<double>(v[d]);
  return s;
}

template <typename X>
void empirical_impl(const at::Tensor& x, const at::Tensor& means, const at::Tensor& residual_var,
                    const at::Tensor& log_weights, const at::Tensor& sigma, bool need_denoised,
                    bool need_weights, at::Tensor& den, at::Tensor& logp, at::Tensor& weights) {
  using T = at::opmath_type<X>;
  const int64_t B = x.size(0), D = x.size(1), K = means.size(0);
  const X* xp = x.data_ptr<X>();
  const T* mu = means.data_ptr<T>();
  const T* lpv = residual_var.data_ptr<T>();
  const T* logw = log_weights.data_ptr<T>();
  const T* sig = sigma.data_ptr<T>();
  T* logp_p = logp.data_ptr<T>();
  T* w_p = need_weights ? weights.data_ptr<T>() : nullptr;
  X* den_p = need_denoised ? den.data_ptr<X>() : nullptr;

  const at::Tensor mu_sq_t = cached_layout({means}, Layout::kSquaredNorms, 0, [&] {
    at::Tensor out = at::empty({K}, means.options().dtype(at::kDouble));
    double* o = out.data_ptr<double>();
    at::parallel_for(0, K, 64, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) o[k] = sum_squares(mu + k * D, D);
    });
    return out;
  });
  const double* mu_sq = mu_sq_t.data_ptr<double>();
  double max_mu_sq = 0, min_lp = std::numeric_limits<double>::infinity();
  bool equal_lp = true;  // then the log-density's normalisation is one log per row
  for (int64_t k = 0; k < K; ++k) {
    max_mu_sq = std::max(max_mu_sq, mu_sq[k]);
    min_lp = std::min(min_lp, static_cast<double>(lpv[k]));
    equal_lp = equal_lp && lpv[k] == lpv[0];
  }
  const double max_mu = std::sqrt(max_mu_sq);
  const int64_t num_kb = (K + kPointBlock - 1) / kPointBlock;
  const int64_t KB = (K + num_kb - 1) / num_kb;  // balanced: the last block is not a sliver
  const double eps = std::numeric_limits<T>::epsilon();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // tall row blocks: each block streams every point once through the GEMMs
  const int64_t BB = std::clamp<int64_t>((B + threads - 1) / threads, 1, 256);

  at::parallel_for(0, B, BB, [&](int64_t begin, int64_t end) {
    auto opts = options_for<T>();
    at::Tensor xbuf = std::is_same_v<X, T> ? at::Tensor() : at::empty({BB, D}, opts);
    at::Tensor acc = need_denoised ? at::empty({BB, D}, opts) : at::Tensor();
    at::Tensor Pbuf = at::empty({BB * KB}, opts);  // p_k (1 - h_perp_k), [n, nk]
    std::vector<double> logit(BB * KB), m(BB), l(BB), hx(BB), m_fast(BB), err(BB), s2v(BB), x_sq(BB);
    std::vector<T> rescale(BB);
    std::vector<double> m_block(need_weights ? BB * num_kb : 0);

    for (int64_t b0 = begin; b0 < end; b0 += BB) {
      const int64_t n = std::min(BB, end - b0);
      at::Tensor Xb;
      if constexpr (std::is_same_v<X, T>) {
        Xb = x.narrow(0, b0, n);
      } else {
        Xb = xbuf.narrow(0, 0, n);
        for (int64_t i = 0; i < n; ++i) convert_row(Xb.data_ptr<T>() + i * D, xp + (b0 + i) * D, D);
      }
      const T* xb = Xb.data_ptr<T>();
      for (int64_t i = 0; i < n; ++i) {
        const double s = sig[b0 + i];
        s2v[i] = s * s;
        m[i] = m_fast[i] = -std::numeric_limits<double>::infinity();
        l[i] = hx[i] = 0;
        x_sq[i] = sum_squares(xb + i * D, D);
        // error bound of the fast logits (|x|^2, |mu|^2 are exact sums in double; only the dot
        // product rounds): kGemmErr eps sqrt(D) |x| |mu| / (lp + s^2)
        err[i] = kGemmErr * eps * std::sqrt(double(D) * x_sq[i]) * max_mu / (min_lp + s2v[i]);
      }
      at::Tensor accb = need_denoised ? acc.narrow(0, 0, n).zero_() : at::Tensor();

      for (int64_t kb = 0; kb < num_kb; ++kb) {
        const int64_t k0 = kb * KB, nk = std::min(KB, K - k0);
        const at::Tensor Mk = means.narrow(0, k0, nk);
        const at::Tensor F = gemm_nt(Xb, Mk);  // [n, nk]: x . mu_k
        const T* Sp = F.data_ptr<T>();
        const int64_t lds = F.stride(0);
        const at::Tensor P = Pbuf.narrow(0, 0, n * nk).view({n, nk});
        T* Pp = P.data_ptr<T>();
        int64_t nonzero_p = 0;

        for (int64_t i = 0; i < n; ++i) {
          const double s2 = s2v[i];
          double* L = logit.data() + i * KB;
          const double vp0 = static_cast<double>(lpv[0]) + s2;
          const double iso_norm = isotropic_log_norm<double>(vp0, D);
          const double iso_scale = 0.5 / vp0;
          const auto logit_of = [&](int64_t kk, double sq) {
            return equal_lp ? logw[kk] + iso_norm - iso_scale * sq
                            : logw[kk] + component_logpdf<double>(sq, 0, 0, 0, lpv[kk], s2, D, 0);
          };
          for (int64_t k = 0; k < nk; ++k) {
            const double sq = x_sq[i] + mu_sq[k0 + k] - 2.0 * static_cast<double>(Sp[i * lds + k]);
            L[k] = logit_of(k0 + k, std::max(sq, 0.0));
          }
          // The bound above is worst case; in the noise-dominated regime (large sigma, where
          // every point is within reach of the max) it overstates the rounding by ~100x and would
          // send every point through the double refinement. So the first block measures the
          // actual error on kProbes points, and the smaller of bound and estimate decides.
          if (kb == 0 && err[i] > kLogitTol) {
            const int64_t probes = std::min(nk, kProbes);
            double rate = eps / 4;  // one rounding of the result: the least a GEMM can err
            for (int64_t j = 0; j < probes; ++j) {
              const int64_t k = j * nk / probes;
              const double fast = x_sq[i] + mu_sq[k] - 2.0 * static_cast<double>(Sp[i * lds + k]);
              const double norms = std::sqrt(x_sq[i] * mu_sq[k]);
              if (norms > 0)
                rate = std::max(rate, std::abs(fast - sqdist_exact(xb + i * D, mu + k * D, D)) / (2 * norms));
            }
            err[i] = std::min(err[i], kSafety * rate * std::sqrt(x_sq[i]) * max_mu / (min_lp + s2));
          }
          double block_fast_max = -std::numeric_limits<double>::infinity();
          for (int64_t k = 0; k < nk; ++k) block_fast_max = std::max(block_fast_max, L[k]);
          m_fast[i] = std::max(m_fast[i], block_fast_max);
          if (err[i] > kLogitTol) {  // exact distances of the points that can matter
            const double keep = m_fast[i] - 2 * err[i] - kCutoff;
            for (int64_t k = 0; k < nk; ++k)
              if (L[k] >= keep) L[k] = logit_of(k0 + k, sqdist_exact(xb + i * D, mu + (k0 + k) * D, D));
          }
          double m_new = m[i];
          for (int64_t k = 0; k < nk; ++k) m_new = std::max(m_new, L[k]);
          T* Pi = Pp + i * nk;
          for (int64_t k = 0; k < nk; ++k) {
            const double d = L[k] - m_new;
            const bool kept = d > -kNegligible;
            nonzero_p += kept;
            if constexpr (std::is_same_v<T, float>) {
              Pi[k] = kept ? static_cast<float>(d) : -std::numeric_limits<float>::infinity();
            } else {
              Pi[k] = kept ? std::exp(d) : 0.0;
            }
          }
          rescale[i] = static_cast<T>(merge_scale(m[i], m_new));
          if (need_weights) m_block[i * num_kb + kb] = m_new;
          m[i] = m_new;
        }
        if constexpr (std::is_same_v<T, float>) P.exp_();  // vectorized; exp(-inf) = 0

        for (int64_t i = 0; i < n; ++i) {
          const double s2 = s2v[i];
          T* Pi = Pp + i * nk;
          double lsum = 0, hsum = 0;
          for (int64_t k = 0; k < nk; ++k) {
            const double p = Pi[k];
            lsum += p;
            if (!equal_lp || lpv[0] != T(0)) {  // isotropic: D_k = mu_k + h_perp (x - mu_k)
              const double hp = static_cast<double>(lpv[k0 + k]) / (static_cast<double>(lpv[k0 + k]) + s2);
              hsum += p * hp;
              Pi[k] = static_cast<T>(p * (1.0 - hp));
            }
            if (need_weights) w_p[(b0 + i) * K + k0 + k] = static_cast<T>(p);
          }
          l[i] = l[i] * rescale[i] + lsum;
          hx[i] = hx[i] * rescale[i] + hsum;
        }
        if (!need_denoised) continue;
        T* a = accb.data_ptr<T>();
        for (int64_t i = 0; i < n; ++i) {
          const T sc = rescale[i];
          if (sc != T(1))
            for (int64_t d = 0; d < D; ++d) a[i * D + d] *= sc;
        }
        if (nonzero_p == 0) continue;
        if (nonzero_p * kSparseRatio < n * nk) {
          for (int64_t i = 0; i < n; ++i)
            for (int64_t k = 0; k < nk; ++k) {
              const T p = Pp[i * nk + k];
              if (p == T(0)) continue;
              const T* mk = mu + (k0 + k) * D;
              T* ai = a + i * D;
              for (int64_t d = 0; d < D; ++d) ai[d] += p * mk[d];
            }
        } else {
          accb.addmm_(P, Mk);  // dense posterior: one GEMM
        }
      }

      for (int64_t i = 0; i < n; ++i) {  // finalize the rows of this block
        const int64_t b = b0 + i;
        logp_p[b] = static_cast<T>(m[i] + std::log(l[i]));
        if (need_denoised) {
          const T inv_l = static_cast<T>(1.0 / l[i]), hxl = static_cast<T>(hx[i] / l[i]);
          const T* a = accb.data_ptr<T>() + i * D;
          const T* xi = xb + i * D;
          X* o = den_p + b * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<X>(a[d] * inv_l + hxl * xi[d]);
        }
        if (need_weights) {
          for (int64_t kb = 0; kb < num_kb; ++kb) {
            const T f = static_cast<T>(std::exp(m_block[i * num_kb + kb] - m[i]) / l[i]);
            T* w = w_p + b * K + kb * KB;
            for (int64_t k = 0; k < std::min(KB, K - kb * KB); ++k) w[k] *= f;
          }
        }
      }
    }
  });
}

}  // namespace

void empirical_posterior_cpu(const at::Tensor& x, const at::Tensor& means,
                             const at::Tensor& residual_var, const at::Tensor& log_weights,
                             const at::Tensor& sigma, bool need_denoised, bool need_weights,
                             at::Tensor& den, at::Tensor& logp, at::Tensor& weights) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "empirical_posterior", [&] {
    empirical_impl<scalar_t>(x, means, residual_var, log_weights, sigma, need_denoised, need_weights,
                             den, logp, weights);
  });
}

}  // namespace gsa::cpu
