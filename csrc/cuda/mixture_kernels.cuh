// CUDA kernels of the mixture posterior: per row, the component logits
//   logit_k = log_weights[k] + gsa::component_logpdf(|x - mu_k|^2, ...)
// streamed over the components with an online softmax (running max m, sum l, and the weighted
// sum of the component denoisers rescaled by gsa::merge_scale when m grows), so no [B, K]
// buffer is needed unless the weights are asked for (then the logits are kept in p.logits).
// Logits and their running max are double: they grow like 1/sigma^2. A fast logit whose error
// bound exceeds logit_tol<Acc>() (params.h) is recomputed exactly unless it trails the running
// max by more than kCutoff plus the bounds (the CPU backend's refinement, csrc/cpu/mixture.cpp).
// The components are split into p.splits slices (blockIdx.y) when the rows alone would leave
// the GPU idle; every slice leaves its partial state (max, sum, weighted sum) and
// mixture_merge_kernel combines them into logp, the weights and the denoiser. Kernels:
//   mixture_delta_kernel    r = 0 (the empirical "delta" mixture when residual_var = 0)
//   mixture_lowrank_kernel  r > 0
//   mixture_merge_kernel    both
// Accumulation of the denoiser in Acc (float, or double for float64). No torch headers.
#pragma once
#include "kernel_common.cuh"
#include "tensor_core.cuh"

namespace gsa::cuda {

template <typename Acc>
struct DeltaShared {
  Acc x[kMixtureRows][kTile + 4];         // [row][d]: the rows' x tile
  Acc mu[kMixtureChunk][kTile + 1];       // [component][d], padded: lane k reads row k
  Acc weight[kMixtureRows][kMixtureChunk + 4];  // [row][component]: p_k (1 - h_k) of the chunk
  Acc rescale[kMixtureRows];              // per row: exp(m_old - m_new) of the chunk
  int busy[kMixtureRows];                 // per row: the chunk weighs or moves the max
  union {  // (used in turn, between barriers)
    Acc points[kMixtureChunk][kProjTile + 8];  // back-projection: [component][d] means tile
    struct {
      float xmu[4][kMixtureRows][kMixtureChunk + 1];  // per quarter of the d tiles: partial x . mu
      double mu_sq[kWarps][kMixtureChunk];            // per warp: partial |mu|^2
    } dots;
  } tiles;
};  // (paddings: the mma fragments' reads fall in different banks)
static_assert(sizeof(DeltaShared<double>) <= kSharedMemoryLimit);

// r = 0: component k is N(mu_k, residual_var_k I); its denoiser is (1 - h_k) mu_k + h_k x with
// h_k = residual_var_k / (residual_var_k + s^2). grid (ceil(B / 8), splits); block (32, 8): warp w
// owns row i0 + w and lane k component k0 + k of each 32-component chunk of the block's slice.
// Per chunk, from shared-memory tiles of x and the means (32 d at a time):
// - the 8 x 32 squared distances. float: |x|^2 + |mu|^2 - 2 x.mu, the norms in double and x.mu
//   as tensor-core tiles (tensor_core.cuh: 3xTF32 mma on sm_80+; C^T = M X^T, warp w the 16
//   components at 16 (w % 2) and the 8 d at 8 (w / 2) of every tile, the 4 partials summed in
//   shared memory), then the exact double distance of the components that can still compete
//   (fast logit + its error bound within kCutoff of the running max; csrc/cpu/empirical.cpp),
//   each summed by the whole warp (a record max of one-hot rows refines its component: D / 32
//   coalesced steps, not D steps of one lane that stall the block).
//   double: from the differences (each tile summed in double).
// - the warp-wide online softmax update;
// - the back-projection accum[rows, d] = rescale accum + W M as one dense tile product: W the
//   [8 rows, 32 components] weights p_k (1 - h_k), M the [32, 128 d] means tile, warp w the 16 d
//   at 16 w (mma tiles C^T = M^T W^T, 16 d x 8 rows). A chunk that weighs nothing (every p below
//   Acc's range) and leaves every row's max where it was skips it: with a one-hot posterior that
//   is nearly every chunk.
template <typename In, typename Acc>
__global__ void __launch_bounds__(32 * kWarps) mixture_delta_kernel(MixtureParams<In, Acc> p) {
  GSA_SHARED_STRUCT(DeltaShared<Acc>, sm);
  const int lane = threadIdx.x, w = threadIdx.y;
  const int64_t i = int64_t(blockIdx.x) * kMixtureRows + w;
  const bool row_ok = i < p.B;
  const double s2 = row_ok ? double(p.sigma[i]) * double(p.sigma[i]) : 1.0;
  const int64_t split = blockIdx.y, per_split = components_per_split(p.K, p.splits);
  const int64_t k_begin = split * per_split, k_end = k_begin + per_split < p.K ? k_begin + per_split : p.K;
  constexpr bool kExpand = sizeof(Acc) < sizeof(double);
  // float: |x|^2 in double, and the relative error bound of x . mu against |x| |mu|: the split's
  // 3 x 2^-22 per product, and a truncating float rounding (2^-23) per mma and tile (3 per d tile,
  // the 8 products and the accumulator of an mma, the 4 partials)
  double x_sq = 0;
  if (kExpand && row_ok)
    for (int64_t d = lane; d < p.D; d += 32) x_sq += double(to_real(p.x[i * p.D + d])) * double(to_real(p.x[i * p.D + d]));
  x_sq = warp_sum(x_sq);
  const double x_norm = sqrt(x_sq);
  const double dot_err = 3 * 0x1p-22 + double(3 * ceil_div(p.D, kTile) + 16) * 0x1p-23;

  double m = neg_infinity<double>();  // per row, the same in every lane
  double m_fast = neg_infinity<double>(), err_at_max = 0;  // largest fast logit, its error bound
  Acc l = Acc(0), h_sum = Acc(0);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kMixtureChunk) {
    const int64_t k = k0 + lane;
    const bool comp_ok = k < k_end;
    Acc dots[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};  // x . mu: C^T fragment (component, row)
    double sq = 0, mu_sq = 0;
    for (int64_t d0 = 0; d0 < p.D; d0 += kTile) {
      const int64_t d = d0 + lane;
      sm.x[w][lane] = row_ok && d < p.D ? to_real(p.x[i * p.D + d]) : Acc(0);
      for (int c = w; c < kMixtureChunk; c += kWarps)
        sm.mu[c][lane] = k0 + c < k_end && d < p.D ? p.means[(k0 + c) * p.D + d] : Acc(0);
      __syncthreads();
      if constexpr (kExpand) {
        const int c16 = 16 * (w & 1), d8 = 8 * (w >> 1);
        mma_16x8x8(dots, lane, [&](int c, int dd) { return sm.mu[c16 + c][d8 + dd]; },
                   [&](int dd, int row) { return sm.x[row][d8 + dd]; });
        Acc part = Acc(0);  // 4 squares in float (double work would cost as much as the mma)
        for (int dd = w; dd < kTile; dd += kWarps) part += sm.mu[lane][dd] * sm.mu[lane][dd];
        mu_sq += part;
      } else {
        Acc tile_sq = Acc(0);
        for (int dd = 0; dd < kTile; ++dd) {
          const Acc diff = sm.x[w][dd] - sm.mu[lane][dd];
          tile_sq += diff * diff;
        }
        sq += tile_sq;
      }
      __syncthreads();
    }
    double err = 0;  // of the logit
    if constexpr (kExpand) {  // the partials of the 4 quarters (warp pairs) and 8 warps
      const int g = lane >> 2, t = lane & 3;
      for (int q = 0; q < 4; ++q)
        sm.tiles.dots.xmu[w >> 1][2 * t + (q & 1)][16 * (w & 1) + g + 8 * (q >> 1)] = float(dots[q]);
      sm.tiles.dots.mu_sq[w][lane] = mu_sq;
      __syncthreads();
      float xmu = 0;
      for (int quarter = 0; quarter < 4; ++quarter) xmu += sm.tiles.dots.xmu[quarter][w][lane];
      mu_sq = 0;
      for (int v = 0; v < kWarps; ++v) mu_sq += sm.tiles.dots.mu_sq[v][lane];
      sq = x_sq + mu_sq - 2 * double(xmu);
      sq = sq < 0 ? 0 : sq;  // (NaN rows stay NaN)
      // half the error of sq: 2 x.mu, and |mu|^2's float partials (4 terms: 4 x 2^-24 relative)
      err = comp_ok ? dot_err * x_norm * sqrt(mu_sq) + 0x1p-23 * mu_sq : 0.0;
    }
    const double residual_var = comp_ok ? double(p.residual_var[k]) : 0.0;
    const double vp = residual_var + s2;
    double logit = comp_ok ? double(p.log_weights[k]) + component_logpdf<double>(sq, 0, 0, 0, residual_var, s2, p.D, 0)
                           : neg_infinity<double>();
    if constexpr (kExpand) {  // exact distances for the components that can still compete
      err /= vp;
      const double chunk_max = warp_max(logit);
      const double chunk_err = warp_max(logit == chunk_max ? err : 0.0);
      if (chunk_max > m_fast) {
        m_fast = chunk_max;
        err_at_max = chunk_err;
      }
      const int refine = row_ok && err > logit_tol<Acc>() && logit + err >= m_fast - err_at_max - kCutoff;
      if (warp_max(refine))  // the whole warp sums each refined distance (lanes over d, coalesced)
        for (int src = 0; src < 32; ++src) {
          if (!__shfl_sync(0xffffffffu, refine, src)) continue;  // (uniform over the warp)
          const Acc* mu_src = p.means + (k0 + src) * p.D;
          double exact = 0;
          for (int64_t d = lane; d < p.D; d += 32) {
            const double diff = double(to_real(p.x[i * p.D + d])) - double(mu_src[d]);
            exact += diff * diff;
          }
          exact = warp_sum(exact);
          if (lane == src) logit = double(p.log_weights[k]) + component_logpdf<double>(exact, 0, 0, 0, residual_var, s2, p.D, 0);
        }
    }
    if (p.logits && row_ok && comp_ok) p.logits[i * p.K + k] = logit;
    const double chunk_max = warp_max(logit);
    const double m_new = chunk_max > m ? chunk_max : m;
    const Acc rescale = Acc(merge_scale(m, m_new));
    const Acc pk = logit == neg_infinity<double>() ? Acc(0) : Acc(exp(logit - m_new));
    const Acc chunk_sum = warp_sum(pk);
    l = l * rescale + chunk_sum;
    m = m_new;
    if (!p.accum) continue;  // uniform over the block: no barrier skipped by some threads only

    const Acc h = Acc(residual_var / vp);
    h_sum = h_sum * rescale + warp_sum(pk * h);
    sm.weight[w][lane] = pk * (Acc(1) - h);
    if (lane == 0) {
      sm.rescale[w] = rescale;
      sm.busy[w] = row_ok && (chunk_sum != Acc(0) || rescale != Acc(1));  // (the first chunk: rescale 0)
    }
    __syncthreads();  // publishes weight, rescale, busy
    bool busy = false;
    for (int v = 0; v < kMixtureRows; ++v) busy = busy || sm.busy[v];
    if (!busy) continue;  // uniform; the next writes of these arrays follow the next chunk's barriers
    const int64_t row0 = int64_t(blockIdx.x) * kMixtureRows;
    for (int64_t d0 = 0; d0 < p.D; d0 += kProjTile) {
      for (int c = w; c < kMixtureChunk; c += kWarps)
        for (int dd = lane; dd < kProjTile; dd += 32)
          sm.tiles.points[c][dd] = k0 + c < k_end && d0 + dd < p.D ? p.means[(k0 + c) * p.D + d0 + dd] : Acc(0);
      __syncthreads();
      // v[q]: row 2 (lane % 4) + q % 2, d = d0 + 16 w + lane / 4 + 8 (q / 2) (mma's C fragment)
      Acc v[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
      for (int c0 = 0; c0 < kMixtureChunk; c0 += 8)
        mma_16x8x8(v, lane, [&](int dm, int k) { return sm.tiles.points[c0 + k][16 * w + dm]; },
                   [&](int k, int row) { return sm.weight[row][c0 + k]; });
      for (int q = 0; q < 4; ++q) {
        const int row = 2 * (lane & 3) + (q & 1);
        const int64_t d = d0 + 16 * w + (lane >> 2) + 8 * (q >> 1);
        if (row0 + row < p.B && d < p.D) {
          Acc& a = p.accum[(split * p.B + row0 + row) * p.D + d];  // only this thread writes it here
          a = k0 == k_begin ? v[q] : a * sm.rescale[row] + v[q];
        }
      }
      __syncthreads();  // the next tile overwrites points; orders accum before the final pass below
    }
  }
  if (!row_ok) return;  // no barrier below
  if (lane == 0) {
    p.part_max[split * p.B + i] = m;
    p.part_sum[split * p.B + i] = l;
  }
  if (p.accum && k_begin < k_end)  // (the merge skips empty slices: their max is -inf)
    for (int64_t d = lane; d < p.D; d += 32) p.accum[(split * p.B + i) * p.D + d] += h_sum * to_real(p.x[i * p.D + d]);
}

template <typename Acc>
struct LowRankShared {
  Acc y[kMixtureRows][kTile + 4];        // [row][d]: y = x - mu_k, one d tile
  Acc part[4][kMixtureRows][kTile + 1];  // per quarter of the d tiles: partial c [row][j]
  Acc rescale[kMixtureRows];             // per row: exp(m_old - m_new) of the component
  Acc mean_weight[kMixtureRows];         // per row: p_k (1 - h_k), the weight of mu_k
  Acc x_weight[kMixtureRows];            // per row: p_k h_k, the weight of x
  int busy[kMixtureRows];                // per row: the component weighs or moves the max
};  // followed at kLowRankTileBytes by the rows' coefficients [row][j] in double
static_assert(sizeof(LowRankShared<double>) <= kLowRankTileBytes);

// r > 0: component k has D_k = (1 - h) mu_k + h x + U_k diag(g_j) c, c = U_k^T (x - mu_k),
// g_j = lam_j / (lam_j + s^2) - h. grid (ceil(B / 8), splits); block (32, 8): warp w owns row
// i0 + w; the components of the block's slice one after another. Per component:
// - the projection C = Y U_k of the 8 rows (Y = x - mu_k rounded to Acc) as tensor-core tiles
//   (tensor_core.cuh: 3xTF32 mma on sm_80+, exact double products for float64), 32
//   coefficients at a time: C^T = U^T Y^T, warp w the 16 j at 16 (w % 2) and the 8 d at
//   8 (w / 2) of every 32-d tile of Y (Y in shared memory, U read from global memory), the 4
//   partials summed in shared memory; |y|^2 in double on the way.
// - per row (warp w, lanes over j) the terms of component_logpdf and the fast logit's error
//   bound: each c_j off by at most dot_err |y| (|U_j| = 1), and the expansion |y|^2 - |c|^2 (its
//   rounding, and c^T (U^T U - I) c of a rounded basis). A component that can still compete
//   (within kCutoff plus the bounds of the running max) and whose bound exceeds logit_tol gets
//   c recomputed by warp w in double and the residual |y - U_k c|^2 summed directly.
// - the warp's online softmax update; then the back-projection accum[rows, d] = rescale accum +
//   p ((1 - h) mu_k + h x) + G U_k^T, G [8 rows, r] = p g c, as mma tiles (C^T = U G^T, warp w the 16 d
//   at 16 w of every 128 d, 16 d x 8 rows; U and mu from global memory). A component that weighs
//   nothing in every row and leaves each max where it was skips it. Each term is summed as
//   ((1 - h) mu + h x) + U g c, the order of the float sums of D_k that keeps the score's
//   cancellation D_k - x at float32 accuracy (test_autograd's float32 mixture gradients).
template <typename In, typename Acc>
__global__ void __launch_bounds__(32 * kWarps) mixture_lowrank_kernel(MixtureParams<In, Acc> p) {
  GSA_SHARED_STRUCT(LowRankShared<Acc>, sm);
  const int lane = threadIdx.x, w = threadIdx.y, g = lane >> 2, t = lane & 3;
  const int64_t D = p.D, r = p.r;
  double* coeff = reinterpret_cast<double*>(reinterpret_cast<unsigned char*>(&sm) + kLowRankTileBytes);
  double* c_row = coeff + w * r;  // this warp's row: c, then p g c
  const int64_t row0 = int64_t(blockIdx.x) * kMixtureRows, i = row0 + w;
  const bool row_ok = i < p.B;
  const In* x = p.x + (row_ok ? i : 0) * D;
  const double s2 = row_ok ? double(p.sigma[i]) * double(p.sigma[i]) : 1.0;
  const int64_t split = blockIdx.y, per_split = components_per_split(p.K, p.splits);
  const int64_t k_begin = split * per_split, k_end = k_begin + per_split < p.K ? k_begin + per_split : p.K;
  // relative error bound of c_j against |U_j| |y|. float: the split's 3 x 2^-22 per product, y's
  // rounding 2^-24, and a truncating float rounding (2^-23) per mma and tile (3 per d tile, the 4
  // partials, slack); double: a rounding per product and sum
  constexpr bool kSplit = sizeof(Acc) < sizeof(double);
  const double dot_err = kSplit ? 3 * 0x1p-22 + 0x1p-24 + double(3 * ceil_div(D, kTile) + 16) * 0x1p-23
                                : double(D + 16) * machine_eps<double>();

  double m = neg_infinity<double>();  // per row, the same in every lane
  Acc l = Acc(0);
  for (int64_t k = k_begin; k < k_end; ++k) {
    const Acc* mu = p.means + k * D;
    const Acc* U = p.bases + k * D * r;
    const Acc* lam = p.eigvals + k * r;
    const double residual_var = p.residual_var[k], vp = residual_var + s2;
    double sq = 0;  // |y|^2
    for (int64_t j0 = 0; j0 < r; j0 += kTile) {
      const int jm = 16 * (w & 1), dq = 8 * (w >> 1);  // this warp's 16 j and 8 d of each tile
      Acc dots[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};  // C^T fragment (j, row)
      for (int64_t d0 = 0; d0 < D; d0 += kTile) {
        const int64_t d = d0 + lane;
        Acc y = Acc(0);
        if (row_ok && d < D) {
          y = to_real(x[d]) - mu[d];
          const double y64 = double(to_real(x[d])) - double(mu[d]);
          sq += j0 == 0 ? y64 * y64 : 0.0;
        }
        sm.y[w][lane] = y;
        __syncthreads();
        mma_16x8x8(dots, lane,
                   [&](int jj, int dd) {
                     const int64_t j = j0 + jm + jj, dk = d0 + dq + dd;
                     return j < r && dk < D ? U[dk * r + j] : Acc(0);
                   },
                   [&](int dd, int row) { return sm.y[row][dq + dd]; });
        __syncthreads();  // the next tile overwrites y
      }
      for (int q = 0; q < 4; ++q) sm.part[w >> 1][2 * t + (q & 1)][jm + g + 8 * (q >> 1)] = dots[q];
      __syncthreads();
      Acc cj = Acc(0);
      for (int quarter = 0; quarter < 4; ++quarter) cj += sm.part[quarter][w][lane];
      if (j0 + lane < r) c_row[j0 + lane] = double(cj);  // (lane j % 32 writes and reads c_j)
    }
    sq = warp_sum(sq);
    // sum over j of c^2 / (lam + s^2), c^2, log(lam + s^2), and the bounds of the first two
    const double dc = dot_err * sqrt(sq);
    double terms[5] = {0, 0, 0, 0, 0};
    for (int64_t j = lane; j < r; j += 32) {
      const double v = double(lam[j]) + s2, c = c_row[j], e = (2 * (c < 0 ? -c : c) + dc) * dc;
      terms[0] += c * c / v;
      terms[1] += c * c;
      terms[2] += log(v);
      terms[3] += e / v;
      terms[4] += e;
    }
    for (double& term : terms) term = warp_sum(term);
    const double log_weight = p.log_weights[k];
    double logit = row_ok ? log_weight + component_logpdf<double>(sq, terms[0], terms[1], terms[2], residual_var, s2, D, r)
                          : neg_infinity<double>();
    const double residual_err = r < D ? terms[4] + 4 * machine_eps<double>() * sq + 2 * r * machine_eps<Acc>() * terms[1] : 0.0;
    const double err = (terms[3] + residual_err / vp) / 2;
    if (row_ok && err > logit_tol<Acc>() && logit + err >= m - logit_tol<Acc>() - kCutoff) {  // uniform over the warp
      for (int64_t j = lane; j < r; j += 32) {  // c in double
        double c = 0;
        for (int64_t d = 0; d < D; ++d) c += double(U[d * r + j]) * (double(to_real(x[d])) - double(mu[d]));
        c_row[j] = c;
      }
      __syncwarp();  // the residual reads every lane's c
      double exact[2] = {0, 0};  // sum over j of c^2 / (lam + s^2); |y - U c|^2 (0 at full rank)
      for (int64_t j = lane; j < r; j += 32) exact[0] += c_row[j] * c_row[j] / (double(lam[j]) + s2);
      for (int64_t d = lane; d < D && r < D; d += 32) {
        double e = double(to_real(x[d])) - double(mu[d]);
        for (int64_t j = 0; j < r; ++j) e -= double(U[d * r + j]) * c_row[j];
        exact[1] += e * e;
      }
      for (double& term : exact) term = warp_sum(term);  // (also orders the reads of c before its update below)
      logit = log_weight + component_logpdf_residual<double>(exact[1], exact[0], terms[2], residual_var, s2, D, r);
    }
    if (p.logits && row_ok && lane == 0) p.logits[i * p.K + k] = logit;
    const double m_new = logit > m ? logit : m;
    const Acc rescale = Acc(merge_scale(m, m_new));
    const Acc pk = logit == neg_infinity<double>() ? Acc(0) : Acc(exp(logit - m_new));
    l = l * rescale + pk;
    m = m_new;
    if (!p.accum) continue;  // uniform over the block: no barrier skipped by some threads only

    const double h = residual_var / vp;
    for (int64_t j = lane; j < r; j += 32) c_row[j] *= double(pk) * (double(lam[j]) / (double(lam[j]) + s2) - h);
    if (lane == 0) {
      sm.rescale[w] = rescale;
      sm.mean_weight[w] = pk * Acc(1 - h);
      sm.x_weight[w] = pk * Acc(h);
      sm.busy[w] = row_ok && (pk != Acc(0) || rescale != Acc(1));  // (the first component: rescale 0)
    }
    __syncthreads();  // publishes p g c, rescale, mean_weight, x_weight, busy
    bool busy = false;
    for (int v = 0; v < kMixtureRows; ++v) busy = busy || sm.busy[v];
    if (!busy) continue;  // uniform; the next writes of these arrays follow the next component's barriers
    for (int64_t d0 = 16 * w; d0 < D; d0 += kProjTile) {  // this warp's 16 d of every 128
      // v[q]: d = d0 + lane / 4 + 8 (q / 2), row 2 (lane % 4) + q % 2 (mma's C fragment)
      Acc v[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
      for (int64_t j0 = 0; j0 < r; j0 += 8)
        mma_16x8x8(v, lane,
                   [&](int dm, int jj) {
                     const int64_t d = d0 + dm, j = j0 + jj;
                     return d < D && j < r ? U[d * r + j] : Acc(0);
                   },
                   [&](int jj, int row) { return j0 + jj < r ? Acc(coeff[row * r + j0 + jj]) : Acc(0); });
      for (int q = 0; q < 4; ++q) {
        const int row = 2 * t + (q & 1);
        const int64_t d = d0 + g + 8 * (q >> 1);
        if (row0 + row < p.B && d < D) {
          Acc& a = p.accum[(split * p.B + row0 + row) * D + d];  // only this thread writes it
          const Acc term = sm.mean_weight[row] * mu[d] + sm.x_weight[row] * to_real(p.x[(row0 + row) * D + d]) + v[q];
          a = k == k_begin ? term : a * sm.rescale[row] + term;
        }
      }
    }
    // the next component's barriers order these reads of coeff and the arrays before their writes
  }
  if (row_ok && lane == 0) {
    p.part_max[split * p.B + i] = m;
    p.part_sum[split * p.B + i] = l;
  }
}

// grid (B); block (256). Row i: the slices' states merge into M = max_s m_s,
// L = sum_s l_s exp(m_s - M); logp = M + log L, weights = exp(logit - M) / L, and the denoiser
// sum_s exp(m_s - M) accum_s / L. Threads stride over k and d (coalesced).
template <typename In, typename Acc>
__global__ void __launch_bounds__(32 * kWarps) mixture_merge_kernel(MixtureParams<In, Acc> p) {
  const int64_t i = blockIdx.x;
  const double* part_max = p.part_max + i;  // stride B
  double m = neg_infinity<double>();
  Acc l = Acc(0);
  for (int s = 0; s < p.splits; ++s) m = part_max[s * p.B] > m ? part_max[s * p.B] : m;
  for (int s = 0; s < p.splits; ++s) l += p.part_sum[s * p.B + i] * Acc(merge_scale(part_max[s * p.B], m));
  if (threadIdx.x == 0) p.logp[i] = Acc(m + log(double(l)));
  if (p.weights)  // (in place when p.logits is the weights' memory)
    for (int64_t k = threadIdx.x; k < p.K; k += blockDim.x) p.weights[i * p.K + k] = Acc(exp(p.logits[i * p.K + k] - m)) / l;
  if (p.accum)
    for (int64_t d = threadIdx.x; d < p.D; d += blockDim.x) {
      Acc v = Acc(0);
      for (int s = 0; s < p.splits; ++s)
        if (part_max[s * p.B] != neg_infinity<double>()) v += p.accum[(s * p.B + i) * p.D + d] * Acc(exp(part_max[s * p.B] - m));
      store(p.denoised + i * p.D + d, v / l);
    }
}

}  // namespace gsa::cuda
