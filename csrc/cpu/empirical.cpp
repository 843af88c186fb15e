// CPU kernel of the r = 0 mixture posterior: isotropic components, and with residual_var = 0 the
// empirical ("delta") mixture of a training set (docs/architecture.md, section 1.3). Called by
// mixture_posterior_cpu (mixture.cpp) when the bases have no columns.
//
// Row blocks of up to 256 rows, one per thread when there are enough, else one after another
// with threaded GEMMs and row passes (see row_block); inside a row block the points stream in
// blocks (a [rows, block] float tile, 16 MiB per thread) with an online softmax (running max m,
// sum l, unnormalised denoiser accumulator acc). Per (row block, point block):
//   F = X M^T          x . mu_k (one GEMM): fast |x - mu_k|^2 = |x|^2 + |mu_k|^2 - 2 x . mu_k
//   per row           fast logits; the row's max over the block (m moves there once per
//                      block); where the logits may be off by more than kDeltaLogitTol (the smaller
//                      of an error bound and a measured estimate), the points within reach of
//                      the max get |x - mu_k|^2 from the differences in double
//   p = exp(L - m)     written over F and summed in one vectorized pass per row (weights_row)
//   acc = acc * rescale + P M
//                      dense posterior (sigma large): one GEMM over the block; few nonzero p
//                      (sigma small): the nonzero p_k mu_k rows are added directly. The choice
//                      counts the block's weights above exp(-kNegligible) (kSparseRatio).
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "empirical.h"
#include "exact_sums.h"
#include "gsa/spectral.h"
#include "mixture_blocks.h"

namespace gsa::cpu {
namespace {

// Fast logits this exact need no refinement. Logit errors within +-e move the weights by a
// total variation <= tanh(e) <= e: 2.5e-4 keeps a 4x margin on the 1e-3 asked for. (kCutoff,
// kNegligible, kGemmErr, kSparseRatio: mixture_blocks.h.)
constexpr double kDeltaLogitTol = 2.5e-4;
// Rounding errors of the fast distances are measured on kProbes points per row; the estimate
// is kSafety times the worst measured rate, relative to |x| |mu| (measured here with D = 784
// and 3072, sigma 0.5 to 30: the estimate is 0.4 to 3x the largest error over 4000 points,
// the low end at small sigma, where the bound decides anyway).
constexpr int64_t kProbes = 16;
constexpr double kSafety = 8.0;
constexpr int64_t kPointBlockBytes = 16 << 20;

using Int64x8 = int64_t __attribute__((vector_size(64)));

// exp(d) on 8 lanes, 0 where d <= -kNegligible (or NaN); for d <= 0 as the weights need, with a
// relative error below 1e-8 (float T: degree 7) or 2e-16 (double T: degree 12). Cody-Waite
// reduction d = n ln2 + r (|r| <= ln2 / 2; n from the shifter 1.5 2^52: round to nearest), the
// Taylor polynomial of exp(r), and 2^n built in the exponent bits. Fixed IEEE operations in a
// fixed order: the same bits on every ISA (isa.h).
template <typename T>
inline void exp_lanes(const Double8& d, Double8& p) {
  constexpr int kDegree = std::is_same_v<T, float> ? 7 : 12;
  constexpr double kShift = 0x1.8p52, kLog2e = 1.4426950408889634, kLn2Hi = 6.93147180369123816490e-01,
                   kLn2Lo = 1.90821492927058770002e-10;
  static constexpr std::array<double, kDegree + 1> coef = [] {  // 1 / j!
    std::array<double, kDegree + 1> c{};
    c[0] = 1;
    for (int j = 1; j <= kDegree; ++j) c[j] = c[j - 1] / j;
    return c;
  }();
  const Double8 zero = {};
  const Double8 dc = d > -kNegligible ? d : zero - kNegligible;  // finite stand-in, masked below
  const Double8 t = dc * kLog2e + kShift;
  const Double8 n = t - kShift;
  const Double8 r = (dc - n * kLn2Hi) - n * kLn2Lo;
  p = zero + coef[kDegree];
  for (int j = kDegree - 1; j >= 0; --j) p = p * r + coef[j];
  Int64x8 bits;
  std::memcpy(&bits, &t, sizeof bits);
  bits = (bits - static_cast<int64_t>(0x4338000000000000) + 1023) << 52;  // 2^n
  Double8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  p = d > -kNegligible ? p * scale : zero;
}

// Row pass of the weights: P[k] = exp(L[k] - m) (0 below exp(-kNegligible)) for k < n, in T;
// returns their sum (8 lanes, then pairwise) and adds the count of nonzero ones to kept.
template <typename T>
double weights_row(const double* L, double m, int64_t n, T* P, int64_t& kept) {
  const Double8 zero = {};
  Double8 sum = zero;
  Int64x8 count = {};
  using Out8 = std::conditional_t<std::is_same_v<T, double>, Double8, float __attribute__((vector_size(32)))>;
  for (int64_t k = 0; k < n; k += 8) {
    const int64_t lanes = std::min<int64_t>(8, n - k);
    Double8 d = zero - INFINITY, p;  // lanes past n: weight 0
    if (lanes == 8) std::memcpy(&d, L + k, sizeof d);  // (fixed sizes: inlined moves, no calls)
    else std::memcpy(&d, L + k, lanes * sizeof(double));
    d -= m;
    exp_lanes<T>(d, p);
    sum += p;
    count -= d > -kNegligible;
    const Out8 out = __builtin_convertvector(p, Out8);
    if (lanes == 8) std::memcpy(P + k, &out, sizeof out);
    else std::memcpy(P + k, &out, lanes * sizeof(T));
  }
  for (int j = 0; j < 8; ++j) kept += count[j];
  return ((sum[0] + sum[1]) + (sum[2] + sum[3])) + ((sum[4] + sum[5]) + (sum[6] + sum[7]));
}

template <typename X>
void empirical_impl(const at::Tensor& x, const at::Tensor& means, const at::Tensor& residual_var,
                    const at::Tensor& log_weights, const at::Tensor& sigma, bool need_denoised,
                    bool need_weights, at::Tensor& den, at::Tensor& logp, at::Tensor& weights) {
  using T = at::opmath_type<X>;
  const int64_t B = x.size(0), D = x.size(1), K = means.size(0);
  const T* mu = means.data_ptr<T>();
  const T* lpv = residual_var.data_ptr<T>();
  const T* logw = log_weights.data_ptr<T>();
  const T* sig = sigma.data_ptr<T>();
  T* logp_p = logp.data_ptr<T>();
  T* w_p = need_weights ? weights.data_ptr<T>() : nullptr;
  X* den_p = need_denoised ? den.data_ptr<X>() : nullptr;

  // |mu_k|^2 per call (a cache keyed by tensor identity went stale through .data / numpy writes;
  // the model owns no r = 0 layout); equal_lp: the log-density's normalisation is one log per row
  const auto [mu_sq_v, max_mu_sq, min_lp, equal_lp] = component_norms(mu, lpv, K, D);
  const double* mu_sq = mu_sq_v.data();
  const double max_mu = std::sqrt(max_mu_sq);
  const bool isotropic_delta = equal_lp && lpv[0] == T(0);  // the empirical mixture: D_k = mu_k
  const double eps = std::numeric_limits<T>::epsilon();
  // Row blocks of up to kTallRows rows (balanced). Each streams every point through the GEMMs,
  // and a GEMM is faster the more rows share each streamed point (measured: one threaded
  // 256-row GEMM ran ~14 % faster than two single-threaded 128-row ones on 2 cores). So while
  // there are fewer blocks than threads, the blocks run one after another, each with threaded
  // GEMMs and its row passes split over the threads; with enough blocks, one block per thread.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t num_rb = (B + kTallRows - 1) / kTallRows;
  const int64_t BB = (B + num_rb - 1) / num_rb;
  const bool one_block_per_thread = num_rb >= threads;
  // blocks of SB points: one distance GEMM each, its [BB, SB] result kept for the two passes
  // below and then overwritten by the weights: kPointBlockBytes per thread (in L2 / L3), so a
  // row block that all threads work on gets them all. Fewer, longer point blocks also refine
  // less: each block's max is nearer the row's final max. Balanced: the last is not a sliver.
  const int64_t tile_bytes = kPointBlockBytes * (one_block_per_thread ? 1 : threads);
  const int64_t num_sb = std::max<int64_t>(1, (K * BB * int64_t(sizeof(T)) + tile_bytes - 1) / tile_bytes);
  const int64_t SB = (K + num_sb - 1) / num_sb;

  // rows b0 .. b0 + n - 1; its row loops are split over the threads unless this runs inside a
  // parallel region already (at::parallel_for then runs them inline)
  const auto row_block = [&](int64_t b0, int64_t n) {
    const auto rows = [&](const auto& body) {  // body(i0, i1) over rows of the block, vectorized
      at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) { with_isa([&] { body(i0, i1); }); });
    };
    auto opts = options_for<T>();
    at::Tensor xbuf = std::is_same_v<X, T> ? at::Tensor() : at::empty({n, D}, opts);
    at::Tensor accb = need_denoised ? at::zeros({n, D}, opts) : at::Tensor();
    T* acc_p = need_denoised ? accb.data_ptr<T>() : nullptr;  // [n, D]
    std::vector<double> m(n), l(n), hx(n), m_fast(n), err(n), s2v(n), x_sq(n), iso_norm(n);
    std::vector<double> m_block(need_weights ? n * num_sb : 0);  // m after each point block
    // logit of point kk for row i from its squared distance
    const auto logit_of = [&](int64_t i, int64_t kk, double sq) {
      return equal_lp ? logw[kk] + iso_norm[i] - 0.5 * sq / (static_cast<double>(lpv[0]) + s2v[i])
                      : logw[kk] + component_logpdf<double>(sq, 0, 0, 0, lpv[kk], s2v[i], D, 0);
    };
    const at::Tensor Xb = rows_in_compute_dtype<X, T>(x, xbuf, b0, n);
    const T* xb = Xb.data_ptr<T>();
    rows([&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const double s = sig[b0 + i];
        s2v[i] = s * s;
        iso_norm[i] = isotropic_log_norm<double>(static_cast<double>(lpv[0]) + s2v[i], D);
        m[i] = m_fast[i] = -std::numeric_limits<double>::infinity();
        l[i] = hx[i] = 0;
        x_sq[i] = sum_squares(xb + i * D, D);
        // error bound of the fast logits (|x|^2, |mu|^2 are exact sums in double; only the dot
        // product rounds): kGemmErr eps sqrt(D) |x| |mu| / (lp + s^2)
        err[i] = kGemmErr * eps * std::sqrt(double(D) * x_sq[i]) * max_mu / (min_lp + s2v[i]);
      }
    });

    for (int64_t g0 = 0; g0 < K; g0 += SB) {  // blocks of points
      const int64_t gn = std::min(SB, K - g0);
      const at::Tensor F = gemm_nt(GemmSite::kDistances, Xb, means.narrow(0, g0, gn));  // [n, gn]: x . mu_k
      const T* Sp = F.data_ptr<T>();
      const int64_t lds = F.stride(0);
      T* Pp = F.data_ptr<T>();  // p of row i, point g0 + k will overwrite Sp[i lds + k]
      std::atomic<int64_t> nonzero_p{0};
      rows([&](int64_t i0, int64_t i1) {
        std::vector<double> Lrow(gn);  // one row's logits over the point block
        int64_t kept = 0;
        for (int64_t i = i0; i < i1; ++i) {
          // fast logits of the row (one vectorizable loop when every lp is equal)
          double* L = Lrow.data();
          const T* Fi = Sp + i * lds;
          if (equal_lp) {
            const double c = 0.5 / (static_cast<double>(lpv[0]) + s2v[i]), xs = x_sq[i], base = iso_norm[i];
            for (int64_t k = 0; k < gn; ++k) {
              const double sq = xs + mu_sq[g0 + k] - 2.0 * static_cast<double>(Fi[k]);
              L[k] = base + static_cast<double>(logw[g0 + k]) - c * (sq > 0 ? sq : 0.0);
            }
          } else {
            for (int64_t k = 0; k < gn; ++k)
              L[k] = logit_of(i, g0 + k, std::max(0.0, x_sq[i] + mu_sq[g0 + k] - 2.0 * static_cast<double>(Fi[k])));
          }
          // the row's fast max over the block first: refinement and the weights below then work
          // against (nearly) the final max; against a running max the first blocks would see
          // hundreds of points "within reach" at moderate sigma
          double mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
          int64_t k = 0;
          for (; k + 4 <= gn; k += 4)
            for (int j = 0; j < 4; ++j) mx[j] = std::max(mx[j], L[k + j]);
          for (; k < gn; ++k) mx[0] = std::max(mx[0], L[k]);
          const double best = std::max(std::max(mx[0], mx[1]), std::max(mx[2], mx[3]));
          m_fast[i] = std::max(m_fast[i], best);
          // The bound err is worst case; in the noise-dominated regime (large sigma, where every
          // point is within reach of the max) it overstates the rounding by ~100x and would send
          // every point through the double refinement. So the first block measures the actual
          // error on the nearest point (aligned with x: its dot product errs the most) and
          // kProbes - 1 others, and the smaller of bound and estimate decides.
          if (g0 == 0 && err[i] > kDeltaLogitTol) {
            const int64_t probes = std::min(gn, kProbes);
            const int64_t best_k = std::find(L, L + gn, best) - L;
            double rate = eps / 4;  // one rounding of the result: the least a GEMM can err
            for (int64_t j = 0; j < probes; ++j) {
              const int64_t kp = j == 0 ? best_k : j * gn / probes;
              const double fast = x_sq[i] + mu_sq[kp] - 2.0 * static_cast<double>(Fi[kp]);
              const double norms = std::sqrt(x_sq[i] * mu_sq[kp]);
              if (norms > 0)
                rate = std::max(rate, std::abs(fast - sqdist_exact(xb + i * D, mu + kp * D, D)) / (2 * norms));
            }
            err[i] = std::min(err[i], kSafety * rate * std::sqrt(x_sq[i]) * max_mu / (min_lp + s2v[i]));
          }
          // exact distances of the points that can matter; the block's max logit is among them
          double block_max = best + err[i];  // unrefined: fast max + its error (p <= e^err)
          if (err[i] > kDeltaLogitTol) {
            const double keep = m_fast[i] - 2 * err[i] - kCutoff;
            block_max = -INFINITY;
            for (int64_t kk = 0; kk < gn; ++kk)
              if (L[kk] >= keep) {
                L[kk] = logit_of(i, g0 + kk, sqdist_exact(xb + i * D, mu + (g0 + kk) * D, D));
                block_max = std::max(block_max, L[kk]);
              }
          }
          // one softmax reference for the whole block
          const double m_new = std::max(m[i], block_max);
          const T sc = static_cast<T>(merge_scale(m[i], m_new));
          m[i] = m_new;
          l[i] *= sc;
          hx[i] *= sc;
          if (need_denoised && sc != T(1)) {
            T* a = acc_p + i * D;
            for (int64_t d = 0; d < D; ++d) a[d] *= sc;
          }
          // p = exp(L - m) over F's row, summed; the weights as asked; isotropic components
          // (lp > 0): D_k = mu_k + h_perp (x - mu_k), so P_k = p_k (1 - h_perp) multiplies mu_k
          T* Pi = Pp + i * lds;
          l[i] += weights_row(L, m[i], gn, Pi, kept);
          if (need_weights) std::copy(Pi, Pi + gn, w_p + (b0 + i) * K + g0);
          if (!isotropic_delta) {
            double hsum = 0;
            for (int64_t k = 0; k < gn; ++k) {
              const double lp = lpv[g0 + k], hp = lp / (lp + s2v[i]);
              hsum += Pi[k] * hp;
              Pi[k] = static_cast<T>(Pi[k] * (1.0 - hp));
            }
            hx[i] += hsum;
          }
          if (need_weights) m_block[i * num_sb + g0 / SB] = m[i];
        }
        nonzero_p += kept;
      });
      if (need_denoised && nonzero_p > 0) {
        if (nonzero_p * kSparseRatio < n * gn) {  // few weights: add the p_k mu_k rows
          rows([&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i)
              for (int64_t k = 0; k < gn; ++k) {
                const T p = Pp[i * lds + k];
                if (p == T(0)) continue;
                const T* mk = mu + (g0 + k) * D;
                T* ai = acc_p + i * D;
                for (int64_t d = 0; d < D; ++d) ai[d] += p * mk[d];
              }
          });
        } else {
          accb.addmm_(F, means.narrow(0, g0, gn));  // dense posterior: one GEMM
        }
      }
    }

    rows([&](int64_t i0, int64_t i1) {
      finish_rows<X, T>(b0 + i0, i1 - i0, D, K, SB, num_sb, m.data() + i0, l.data() + i0, hx.data() + i0,
                        x_sq.data() + i0, need_weights ? m_block.data() + i0 * num_sb : nullptr,
                        acc_p ? acc_p + i0 * D : nullptr, xb + i0 * D, logp_p, den_p, w_p);
    });
  };

  if (one_block_per_thread) {
    at::parallel_for(0, num_rb, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t rb = r0; rb < r1; ++rb) row_block(rb * BB, std::min(BB, B - rb * BB));
    });
  } else {
    for (int64_t b0 = 0; b0 < B; b0 += BB) row_block(b0, std::min(BB, B - b0));
  }
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
