// CUDA kernel of the local score machines (local_posterior; gsa_kernels/_core/_contract.py gives the
// math): per query row b and pixel u, a softmax over the candidate training patches (n, v) of
// -d2(u, v) / (2 sigma_b^2), d2 the squared distance of the P x P windows over all C channels.
// One thread per query pixel, kLocalThreads pixels of one row per block; every thread streams its
// candidates (LS: (n, u) for every n; ELS: every (n, v); BB-ELS: v in u's boundary class) with its
// own online softmax state in registers. d2 is summed from direct differences in double whatever
// the dtype (differences of float values are exact in double), so the logits, which scale as
// 1 / sigma^2, keep their digits at every sigma without an error bound or a refinement pass. The
// running max, the sum and the accumulator sum_c w (value_c - x_u) (the contract's
// non-cancelling difference form) are double. The candidates of a block are read in the same
// order by all its threads (broadcast loads). No workspace: registers and one shared flag.
// A NaN anywhere in x[b] makes the block's whole output NaN (the contract's row-level rule).
#pragma once
#include "kernel_common.cuh"

namespace gsa::cuda {

struct LocalShared {
  int row_has_nan;
};

// The flat index of pixel (i, j) of an H x W image: wrapped (circular), or -1 outside (zeros).
GSA_DEVICE int64_t local_pixel(int64_t i, int64_t j, int64_t H, int64_t W, bool circular) {
  if (circular) {
    i = ((i % H) + H) % H;
    j = ((j % W) + W) % W;
  } else if (i < 0 || i >= H || j < 0 || j >= W) {
    return -1;
  }
  return i * W + j;
}

GSA_DEVICE int64_t clip_at(int64_t d, int64_t p) { return d < p ? d : p; }

// BB-ELS boundary class of pixel (i, j): its distances to the four edges, each clipped at p.
GSA_DEVICE int64_t boundary_class(int64_t i, int64_t j, int64_t H, int64_t W, int64_t p) {
  return ((clip_at(i, p) * (p + 1) + clip_at(H - 1 - i, p)) * (p + 1) + clip_at(j, p)) * (p + 1) +
         clip_at(W - 1 - j, p);
}

// The online softmax state of one query pixel over one group of up to kLocalChannels channels.
struct LocalState {
  double m, z, acc[kLocalChannels];
};

// Candidate (image `img`, pixel (vi, vj)) into the state of query pixel (ui, uj) of x_row.
template <typename In, typename Acc>
GSA_DEVICE void local_candidate(LocalState& s, const LocalParams<In, Acc>& p, const In* x_row, const Acc* img,
                                int64_t ui, int64_t uj, int64_t vi, int64_t vj, int64_t c0, int cg,
                                const double (&x_u)[kLocalChannels], double two_s2) {
  const int64_t H = p.H, W = p.W, HW = H * W, half = p.patch_size / 2;
  const bool circular = p.padding == 1;
  double d2 = 0.0;
  for (int64_t dy = -half; dy <= half; ++dy) {
    for (int64_t dx = -half; dx <= half; ++dx) {
      const int64_t a = local_pixel(ui + dy, uj + dx, H, W, circular);
      const int64_t b = local_pixel(vi + dy, vj + dx, H, W, circular);
      if (a < 0 && b < 0) continue;  // both windows read padding zeros there
      for (int64_t c = 0; c < p.C; ++c) {
        const double xv = a >= 0 ? double(to_real(x_row[c * HW + a])) : 0.0;
        const double iv = b >= 0 ? double(img[c * HW + b]) : 0.0;
        const double d = xv - iv;
        d2 += d * d;
      }
    }
  }
  const double logit = -d2 / two_s2;
  if (logit == neg_infinity<double>()) return;  // weight 0 (and no -inf - -inf below)
  const int64_t v = vi * W + vj;
  double w = 1.0;
  if (logit > s.m) {  // a new max: rescale what came before (exp(-inf) = 0 for the first)
    const double alpha = exp(s.m - logit);
    s.z *= alpha;
#pragma unroll
    for (int k = 0; k < kLocalChannels; ++k) s.acc[k] *= alpha;  // (all k: stays in registers)
    s.m = logit;
  } else {
    w = exp(logit - s.m);
  }
  s.z += w;
#pragma unroll
  for (int k = 0; k < kLocalChannels; ++k) {
    if (k < cg) s.acc[k] += w * (double(img[(c0 + k) * HW + v]) - x_u[k]);
  }
}

template <typename In, typename Acc>
__global__ void __launch_bounds__(kLocalThreads) local_posterior_kernel(LocalParams<In, Acc> p) {
  GSA_SHARED_STRUCT(LocalShared, sm);
  const int64_t H = p.H, W = p.W, HW = H * W, CHW = p.C * HW;
  const int64_t u_blocks = ceil_div(HW, kLocalThreads);
  const int64_t b = int64_t(blockIdx.x) / u_blocks;
  const int64_t u = (int64_t(blockIdx.x) % u_blocks) * kLocalThreads + threadIdx.x;
  const In* x_row = p.x + b * CHW;

  // the row-level NaN rule: every thread of the block scans a stride of x[b]
  if (threadIdx.x == 0) sm.row_has_nan = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < CHW; i += kLocalThreads) {
    const Acc v = to_real(x_row[i]);
    if (v != v) sm.row_has_nan = 1;
  }
  __syncthreads();
  const bool row_has_nan = sm.row_has_nan != 0;
  if (u >= HW) return;  // no barrier below

  const int64_t ui = u / W, uj = u % W, half = p.patch_size / 2;
  const double sigma = double(p.sigma[b]), s2 = sigma * sigma, two_s2 = 2.0 * s2;
  const int64_t u_class = boundary_class(ui, uj, H, W, half);
  for (int64_t c0 = 0; c0 < p.C; c0 += kLocalChannels) {
    const int cg = int(p.C - c0 < kLocalChannels ? p.C - c0 : kLocalChannels);
    double x_u[kLocalChannels];
    LocalState s;
    s.m = neg_infinity<double>();
    s.z = 0.0;
#pragma unroll
    for (int k = 0; k < kLocalChannels; ++k) {
      x_u[k] = k < cg ? double(to_real(x_row[(c0 + k) * HW + u])) : 0.0;
      s.acc[k] = 0.0;
    }
    for (int64_t n = 0; n < p.N; ++n) {
      const Acc* img = p.images + n * CHW;
      if (p.mode == 0) {  // LS: the patch at the query's own pixel
        local_candidate(s, p, x_row, img, ui, uj, ui, uj, c0, cg, x_u, two_s2);
        continue;
      }
      for (int64_t vi = 0; vi < H; ++vi) {
        for (int64_t vj = 0; vj < W; ++vj) {
          if (p.mode == 2 && boundary_class(vi, vj, H, W, half) != u_class) continue;
          local_candidate(s, p, x_row, img, ui, uj, vi, vj, c0, cg, x_u, two_s2);
        }
      }
    }
    // every pixel has a candidate (LS: N >= 1; ELS / BB-ELS: u itself), so s.z >= 1
#pragma unroll
    for (int k = 0; k < kLocalChannels; ++k) {
      if (k >= cg) break;
      const double diff = s.acc[k] / s.z;
      double out = p.kind == 1 ? diff / s2 : x_u[k] + diff;
      if (row_has_nan) out = NAN;
      store(p.out + b * CHW + (c0 + k) * HW + u, Acc(out));
    }
  }
}

}  // namespace gsa::cuda
