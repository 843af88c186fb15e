// What the CPU mixture kernels share: the forward's constants (mixture.cpp for r > 0,
// empirical.cpp for r = 0), which the backward (mixture_backward.cpp) reproduces, the component
// panels and blocks of both directions, and the end of a row block of the forward.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "exact_sums.h"

namespace gsa::cpu {

constexpr double kLogitTol = 1e-4;     // fast low-rank logits this exact (bound) need no refinement
constexpr double kLogitTol64 = 1e-10;  // (float64: its logits are accurate to 1e-9)
constexpr double kCutoff = 30.0;       // exp(-30) ~ 1e-13: weight of a component never refined
constexpr double kNegligible = 50.0;   // exp(-50) ~ 2e-22: below the running max by more, a
                                       // component's weight is dropped (K <= 1e6 moves l, the
                                       // weight sum >= 1, by < 2e-16 relative: double rounding)
constexpr double kGemmErr = 4.0;       // |fl(x.mu) - x.mu| <= kGemmErr eps sqrt(D) |x| |mu|
// Sparse back-projection (an axpy per nonzero weight) while fewer than 1 in kSparseRatio of a
// block's weights are nonzero: an axpy streams a [D] row of acc per point (~8 flop / cycle)
// where the GEMM runs at ~60 (AVX-512); 16 measured fastest between 8 and 32 (empirical.cpp).
constexpr int64_t kSparseRatio = 16;

// The model's components in two GEMM-ready layouts, one [nk (r + 1)]-wide panel per component
// block (components k0 .. k0 + nk - 1, panel at offset k0 (r + 1) D of a flat tensor):
//   forward  [nk (r + 1), D] rows: mu_k0 .. mu_k0+nk-1, then U_k0^T .. U_k0+nk-1^T  (x W^T gives
//            x . mu_k and U_k^T x in one GEMM)
//   backward [D, nk (r + 1)]: the forward panel transposed (Q W^T with Q = [P | G] gives
//            sum_k p_k mu_k + U_k g_k in one GEMM)
// Both have contiguous rows, which is what the oneDNN GEMM wants; the model keeps them
// (mixture_panels, gsa_kernels/_core/_layouts.py) and passes them in, else they are built per call.
inline at::Tensor panel(const at::Tensor& flat, int64_t k0, int64_t nk, int64_t W, int64_t D, bool backward) {
  const at::Tensor block = flat.narrow(0, k0 * W * D, nk * W * D);
  return backward ? block.view({D, nk * W}) : block.view({nk * W, D});
}

template <typename T>
at::Tensor forward_panels(const at::Tensor& means, const at::Tensor& bases, int64_t KB) {
  const int64_t K = means.size(0), D = means.size(1), r = bases.size(2), W = r + 1;
  const at::Tensor Ut = transpose_last2<T>(bases);  // [K, r, D]
  at::Tensor out = at::empty({K * W * D}, means.options());
  for (int64_t k0 = 0; k0 < K; k0 += KB) {
    const int64_t nk = std::min(KB, K - k0);
    at::Tensor p = panel(out, k0, nk, W, D, false);
    at::cat_out(p, {means.narrow(0, k0, nk), Ut.narrow(0, k0, nk).reshape({nk * r, D})});
  }
  return out;
}

template <typename T>
at::Tensor backward_panels(const at::Tensor& forward, int64_t K, int64_t D, int64_t W, int64_t KB) {
  at::Tensor out = at::empty_like(forward);
  for (int64_t k0 = 0; k0 < K; k0 += KB) {
    const int64_t nk = std::min(KB, K - k0);
    panel(out, k0, nk, W, D, true).copy_(transpose_last2<T>(panel(forward, k0, nk, W, D, false).unsqueeze(0)).squeeze(0));
  }
  return out;
}

// Per-component constants of the fast logits' error bounds, per call: |mu_k|^2 (one pass over
// the means, 1 / B of the GEMMs' reads), their max, the smallest residual_var, and whether every
// residual_var is equal.
struct ComponentNorms {
  std::vector<double> mu_sq;
  double max_mu_sq = 0, min_lp = std::numeric_limits<double>::infinity();
  bool equal_lp = true;
};

template <typename T>
ComponentNorms component_norms(const T* mu, const T* lpv, int64_t K, int64_t D) {
  ComponentNorms c;
  c.mu_sq.resize(K);
  at::parallel_for(0, K, 64, [&](int64_t k0, int64_t k1) {
    with_isa([&] {
      for (int64_t k = k0; k < k1; ++k) c.mu_sq[k] = sum_squares(mu + k * D, D);
    });
  });
  for (int64_t k = 0; k < K; ++k) {
    c.max_mu_sq = std::max(c.max_mu_sq, c.mu_sq[k]);
    c.min_lp = std::min(c.min_lp, static_cast<double>(lpv[k]));
    c.equal_lp = c.equal_lp && lpv[k] == lpv[0];
  }
  return c;
}

// Rows per block of B: tall (up to kTallRows), since each block streams every component through
// the GEMMs, and one block per thread while B is small.
constexpr int64_t kTallRows = 256;
inline int64_t tall_row_block(int64_t B) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::clamp<int64_t>((B + threads - 1) / threads, 1, kTallRows);
}

// Rows b0 .. b0 + n - 1 of x [B, D] in the compute dtype T: a view of x, or for float16 /
// bfloat16 x a converted copy in buf ([>= n, D]).
template <typename X, typename T>
at::Tensor rows_in_compute_dtype(const at::Tensor& x, const at::Tensor& buf, int64_t b0, int64_t n) {
  if constexpr (std::is_same_v<X, T>) {
    return x.narrow(0, b0, n);
  } else {
    const int64_t D = x.size(1);
    const at::Tensor rows = buf.narrow(0, 0, n);
    const X* xp = x.data_ptr<X>() + b0 * D;
    T* out = rows.data_ptr<T>();
    with_isa([&] {
      for (int64_t i = 0; i < n; ++i) convert_row(out + i * D, xp + i * D, D);
    });
    return rows;
  }
}

// Components per block of the panels (balanced: the last block is not a sliver), each one GEMM
// per direction against its panel.
inline int64_t component_block(int64_t K, int64_t r) {
  const int64_t KB_max = std::min<int64_t>(K, r == 0 ? 256 : std::max<int64_t>(4, 1024 / r));
  const int64_t num_kb = (K + KB_max - 1) / KB_max;
  return (K + num_kb - 1) / num_kb;
}

// sum_j log(lam_j + s2), one log per 8 factors (each factor is in [s2, lam_max + s2]).
template <typename T>
double log_det_low(const T* lam, int64_t r, double s2) {
  double total = 0;
  for (int64_t j0 = 0; j0 < r; j0 += 8) {
    double prod = 1;
    for (int64_t j = j0; j < std::min(r, j0 + 8); ++j) prod *= static_cast<double>(lam[j]) + s2;
    total += std::log(prod);
  }
  return total;
}

// The end of the forward's online softmax for rows b0 .. b0 + n - 1 (state per row i: max m,
// sum l, hx = sum p hp, acc [n, D] = the unnormalised denoiser less hx x): logp = m + log l,
// den = (acc + hx x) / l when den is given, and the weights when given, stored per component
// block kb of `block` components relative to that block's max m_block[i * num_blocks + kb],
// rescaled to exp(logit - logp). A row with NaN in x (x_sq) gets NaN: the softmax skipped its
// NaN logits.
template <typename X, typename T>
void finish_rows(int64_t b0, int64_t n, int64_t D, int64_t K, int64_t block, int64_t num_blocks,
                 const double* m, const double* l, const double* hx, const double* x_sq,
                 const double* m_block, const T* acc, const T* xb, T* logp, X* den, T* weights) {
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = b0 + i;
    const double mi = std::isnan(x_sq[i]) ? kNaN : m[i], li = std::isnan(x_sq[i]) ? kNaN : l[i];
    logp[b] = static_cast<T>(mi + std::log(li));
    if (den) {
      const T inv_l = static_cast<T>(1.0 / li), hxl = static_cast<T>(hx[i] / li);
      const T* a = acc + i * D;
      const T* xi = xb + i * D;
      X* o = den + b * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<X>(a[d] * inv_l + hxl * xi[d]);
    }
    if (weights) {
      for (int64_t kb = 0; kb < num_blocks; ++kb) {
        const T f = static_cast<T>(std::exp(m_block[i * num_blocks + kb] - mi) / li);
        T* w = weights + b * K + kb * block;
        for (int64_t k = 0; k < std::min(block, K - kb * block); ++k) w[k] *= f;
      }
    }
  }
}

}  // namespace gsa::cpu
