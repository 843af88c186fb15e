// CUDA kernels of the mixture posterior: per row, the component logits
//   logit_k = log_weights[k] + gsa::component_logpdf(|x - mu_k|^2, ...)
// streamed over the components with an online softmax (running max m, sum l, and the weighted
// sum of the component denoisers rescaled by gsa::merge_scale when m grows), so no [B, K]
// buffer is needed unless the weights are asked for (then the raw logits are written there).
// |x - mu_k|^2 is summed from the differences, never expanded, so small-sigma logits stay
// accurate. The components are split into p.splits slices (blockIdx.y) when the rows alone
// would leave the GPU idle; every slice leaves its partial state (max, sum, weighted sum) and
// mixture_merge_kernel combines them into logp, the weights and the denoiser. Kernels:
//   mixture_delta_kernel    r = 0 (the empirical "delta" mixture when residual_var = 0)
//   mixture_lowrank_kernel  r > 0
//   mixture_merge_kernel    both
// Accumulation in Acc (float, or double for float64). No torch headers.
#pragma once
#include "kernel_common.cuh"

namespace gsa::cuda {

template <typename Acc>
struct DeltaShared {
  Acc x[kMixtureRows][kTile];             // [row][d]: the rows' x tile
  Acc mu[kMixtureChunk][kTile + 1];       // [component][d], padded: lane k reads row k
  Acc weight[kMixtureRows][kMixtureChunk];  // [row][component]: p_k (1 - h_k) of the chunk
};

// r = 0: component k is N(mu_k, lp_k I); its denoiser is (1 - h_k) mu_k + h_k x with
// h_k = lp_k / (lp_k + s^2). grid (ceil(B / 8), splits); block (32, 8): warp w owns row i0 + w
// and lane k component k0 + k of each 32-component chunk of the block's slice. Per chunk: the 8 x 32 squared distances
// from shared-memory tiles of x and the means (32 d at a time), the warp-wide online softmax
// update, then accum[row, d] += sum_k p_k (1 - h_k) mu_k[d] (lane = d) from the means tile again.
template <typename In, typename Acc>
__global__ void __launch_bounds__(32 * kWarps) mixture_delta_kernel(MixtureParams<In, Acc> p) {
  GSA_SHARED_STRUCT(DeltaShared<Acc>, sm);
  const int lane = threadIdx.x, w = threadIdx.y;
  const int64_t i = int64_t(blockIdx.x) * kMixtureRows + w;
  const bool row_ok = i < p.B;
  const Acc s2 = row_ok ? p.sigma[i] * p.sigma[i] : Acc(1);
  const int64_t split = blockIdx.y, per_split = components_per_split(p.K, p.splits);
  const int64_t k_begin = split * per_split, k_end = k_begin + per_split < p.K ? k_begin + per_split : p.K;

  Acc m = neg_infinity<Acc>(), l = Acc(0), h_sum = Acc(0);  // per row, the same in every lane
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kMixtureChunk) {
    const int64_t k = k0 + lane;
    const bool comp_ok = k < k_end;
    Acc sq = Acc(0);
    for (int64_t d0 = 0; d0 < p.D; d0 += kTile) {
      const int64_t d = d0 + lane;
      sm.x[w][lane] = row_ok && d < p.D ? to_real(p.x[i * p.D + d]) : Acc(0);
      for (int c = w; c < kMixtureChunk; c += kWarps)
        sm.mu[c][lane] = k0 + c < k_end && d < p.D ? p.means[(k0 + c) * p.D + d] : Acc(0);
      __syncthreads();
      for (int dd = 0; dd < kTile; ++dd) {
        const Acc diff = sm.x[w][dd] - sm.mu[lane][dd];
        sq += diff * diff;
      }
      __syncthreads();
    }
    const Acc lp = comp_ok ? p.residual_var[k] : Acc(0);
    const Acc logit = comp_ok ? p.log_weights[k] + component_logpdf<Acc>(sq, 0, 0, 0, lp, s2, p.D, 0)
                              : neg_infinity<Acc>();
    if (p.weights && row_ok && comp_ok) p.weights[i * p.K + k] = logit;
    const Acc chunk_max = warp_max(logit);
    const Acc m_new = chunk_max > m ? chunk_max : m;
    const Acc rescale = merge_scale(m, m_new);
    const Acc pk = logit == neg_infinity<Acc>() ? Acc(0) : exp(logit - m_new);
    l = l * rescale + warp_sum(pk);
    m = m_new;
    if (!p.accum) continue;  // uniform over the block: no barrier skipped by some threads only

    const Acc h = lp / (lp + s2);
    h_sum = h_sum * rescale + warp_sum(pk * h);
    sm.weight[w][lane] = pk * (Acc(1) - h);
    for (int64_t d0 = 0; d0 < p.D; d0 += kTile) {
      const int64_t d = d0 + lane;
      for (int c = w; c < kMixtureChunk; c += kWarps)
        sm.mu[c][lane] = k0 + c < k_end && d < p.D ? p.means[(k0 + c) * p.D + d] : Acc(0);
      __syncthreads();  // (the first pass also publishes sm.weight)
      if (row_ok && d < p.D) {
        Acc v = Acc(0);
        for (int c = 0; c < kMixtureChunk; ++c) v += sm.weight[w][c] * sm.mu[c][lane];
        Acc& a = p.accum[(split * p.B + i) * p.D + d];  // only this thread ever touches it
        a = k0 == k_begin ? v : a * rescale + v;
      }
      __syncthreads();
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
  Acc partial[kWarps][32];  // per-warp partial sums of a 32-wide slice of c
  Acc scratch[kWarps * 4];  // block_sum
};  // followed in shared memory by c [r] (mixture_lowrank_smem_bytes)
static_assert(sizeof(LowRankShared<float>) + 7 * sizeof(float) == mixture_lowrank_smem_bytes<float>(7));

// r > 0: component k has D_k = (1 - h) mu_k + h x + U_k diag(g_j) c, c = U_k^T (x - mu_k),
// g_j = lam_j / (lam_j + s^2) - h. grid (B, splits); block (32, 8): one row per block, the
// components of the block's slice one after another. Warps stride over d and lanes over j, so every warp reads whole rows of
// U_k (coalesced); c is reduced over warps in shared memory, the logit terms with block_sum,
// and each reconstructed d with a warp sum.
template <typename In, typename Acc>
__global__ void __launch_bounds__(32 * kWarps) mixture_lowrank_kernel(MixtureParams<In, Acc> p) {
  GSA_SHARED_STRUCT(LowRankShared<Acc>, sm);
  Acc* coeff = reinterpret_cast<Acc*>(&sm + 1);  // c = U_k^T (x - mu_k), then g * c
  const int lane = threadIdx.x, w = threadIdx.y, tid = w * 32 + lane;
  const int64_t i = blockIdx.x, D = p.D, r = p.r;
  const In* x = p.x + i * D;
  const Acc s2 = p.sigma[i] * p.sigma[i];
  const int64_t split = blockIdx.y, per_split = components_per_split(p.K, p.splits);
  const int64_t k_begin = split * per_split, k_end = k_begin + per_split < p.K ? k_begin + per_split : p.K;

  Acc m = neg_infinity<Acc>(), l = Acc(0);  // the same in every thread
  for (int64_t k = k_begin; k < k_end; ++k) {
    const Acc* mu = p.means + k * D;
    const Acc* U = p.bases + k * D * r;
    const Acc* lam = p.eigvals + k * r;
    const Acc lp = p.residual_var[k];
    // c = U^T (x - mu), 32 coefficients at a time
    for (int64_t j0 = 0; j0 < r; j0 += 32) {
      const int64_t j = j0 + lane;
      Acc cj = Acc(0);
      if (j < r)
        for (int64_t d = w; d < D; d += kWarps) cj += U[d * r + j] * (to_real(x[d]) - mu[d]);
      sm.partial[w][lane] = cj;
      __syncthreads();
      if (w == 0 && j < r) {
        Acc sum = Acc(0);
        for (int v = 0; v < kWarps; ++v) sum += sm.partial[v][lane];
        coeff[j] = sum;
      }
      __syncthreads();
    }
    // sum over d of (x - mu)^2, and over j of c^2 / (lam + s^2), c^2, log(lam + s^2)
    Acc terms[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
    for (int64_t d = tid; d < D; d += 32 * kWarps) {
      const Acc y = to_real(x[d]) - mu[d];
      terms[0] += y * y;
    }
    for (int64_t j = tid; j < r; j += 32 * kWarps) {
      const Acc v = lam[j] + s2, c = coeff[j];
      terms[1] += c * c / v;
      terms[2] += c * c;
      terms[3] += log(v);
    }
    block_sum(terms, sm.scratch);
    const Acc logit = p.log_weights[k] + component_logpdf<Acc>(terms[0], terms[1], terms[2], terms[3], lp, s2, D, r);
    if (p.weights && tid == 0) p.weights[i * p.K + k] = logit;
    const Acc m_new = logit > m ? logit : m;
    const Acc rescale = merge_scale(m, m_new);
    const Acc pk = logit == neg_infinity<Acc>() ? Acc(0) : exp(logit - m_new);
    l = l * rescale + pk;
    m = m_new;
    if (!p.accum) continue;  // uniform over the block

    const Acc h = lp / (lp + s2);
    for (int64_t j = tid; j < r; j += 32 * kWarps) coeff[j] *= lam[j] / (lam[j] + s2) - h;  // c -> g c
    __syncthreads();
    for (int64_t d = w; d < D; d += kWarps) {
      Acc v = Acc(0);
      for (int64_t j = lane; j < r; j += 32) v += U[d * r + j] * coeff[j];
      v = warp_sum(v);
      if (lane == 0) {
        const Acc dk = (Acc(1) - h) * mu[d] + h * to_real(x[d]) + v;
        Acc& a = p.accum[(split * p.B + i) * D + d];  // only lane 0 of warp d % kWarps touches it
        a = k == k_begin ? pk * dk : a * rescale + pk * dk;
      }
    }
    // the next component's first barrier orders these reads of coeff before its writes
  }
  if (tid == 0) {
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
  const Acc* part_max = p.part_max + i;  // stride B
  Acc m = neg_infinity<Acc>(), l = Acc(0);
  for (int s = 0; s < p.splits; ++s) m = part_max[s * p.B] > m ? part_max[s * p.B] : m;
  for (int s = 0; s < p.splits; ++s) l += p.part_sum[s * p.B + i] * merge_scale(part_max[s * p.B], m);
  if (threadIdx.x == 0) p.logp[i] = m + log(l);
  if (p.weights)
    for (int64_t k = threadIdx.x; k < p.K; k += blockDim.x) p.weights[i * p.K + k] = exp(p.weights[i * p.K + k] - m) / l;
  if (p.accum)
    for (int64_t d = threadIdx.x; d < p.D; d += blockDim.x) {
      Acc v = Acc(0);
      for (int s = 0; s < p.splits; ++s)
        if (part_max[s * p.B] != neg_infinity<Acc>()) v += p.accum[(s * p.B + i) * p.D + d] * exp(part_max[s * p.B] - m);
      store(p.denoised + i * p.D + d, v / l);
    }
}

}  // namespace gsa::cuda
