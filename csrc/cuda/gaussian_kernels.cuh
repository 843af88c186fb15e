// CUDA kernels of the Gaussian spectral map (denoise / score / flow) and the trajectory, in two
// shared-memory tiled passes (the math is gsa::row_coeffs / gsa::spectral_f of spectral.h):
//   project: coeffs[s, i, j] = sum_{d in slice s} y[i, d] U[d, j],   y = p_i x[i] - q_i mu
//   apply:   out[t, i, d]    = a y[i, d] + b mu[d] + sum_j U[d, j] f_j(t, i) sum_s coeffs[s, i, j]
// The projection is shared by all T steps of a trajectory (y does not depend on the target
// sigma). A full-rank basis (r == D) has no residual directions: apply then uses
// out = b mu + U diag(eigen_gain(lam_j)) c, which keeps small-sigma scores and flows accurate.
// Blocks are (kTile, kTileRowsPerPass) = (32, 8) threads and own a 32 x 32 output tile; the
// reduction dimension streams through shared memory 32 at a time. The tile products are warp
// tiles of mma_16x8x8 (tensor_core.cuh: 3xTF32 tensor cores on sm_80+ for float, scalar
// elsewhere and for double): warp w owns the 16 rows at 16 (w % 2) and the 8 columns at 8 (w / 2).
// Accumulation in Acc (float, or double for float64 inputs). No torch headers.
// Labelled maps (p.tile_component): each row tile holds rows of one label (through p.row_of);
// a block offsets the model pointers to its tile's component and reads its rows through the map.
#pragma once
#include "kernel_common.cuh"
#include "tensor_core.cuh"

namespace gsa::cuda {

// (paddings: the 32 lanes' fragment reads of a warp tile fall in 32 different banks)
template <typename Acc>
struct ProjectShared {
  Acc y[kTile][kTile + 4];  // [row][d]
  Acc u[kTile][kTile + 8];  // [d][j]
};

template <typename Acc>
struct ApplyShared {
  Acc g[kTile][kTile + 4];  // [row][j]: f_j c_j
  Acc u[kTile][kTile + 4];  // [d][j]
};

// The C fragment of warp w's tile: element q of a lane is (row 16 (w % 2) + lane / 4 + 8 (q / 2),
// column 8 (w / 2) + 2 (lane % 4) + q % 2) of the block's 32 x 32 tile.
GSA_DEVICE int frag_row(int w, int lane, int q) { return 16 * (w & 1) + (lane >> 2) + 8 * (q >> 1); }
GSA_DEVICE int frag_col(int w, int lane, int q) { return 8 * (w >> 1) + 2 * (lane & 3) + (q & 1); }

template <typename Acc>
struct RowParams {
  Acc sigma_from, sigma_to, scale_from, scale_to;
};

template <typename In, typename Acc>
GSA_DEVICE RowParams<Acc> row_params(const GaussianMapParams<In, Acc>& p, int64_t t, int64_t i) {
  return {p.sigma_from[i], p.sigma_to[t * p.B + i], p.scale_from ? p.scale_from[i] : Acc(1),
          p.scale_to ? p.scale_to[i] : Acc(1)};
}

// The model of row tile `tile`: for labelled maps, p's pointers are offset to the tile's
// component. Returns false for a tile without rows (the block has nothing to do).
template <typename In, typename Acc>
GSA_DEVICE bool select_tile_model(GaussianMapParams<In, Acc>& p, int64_t tile) {
  if (p.tile_component == nullptr) return true;
  const int64_t k = p.tile_component[tile];
  if (k < 0) return false;
  p.mean += k * p.D;
  p.basis += k * p.D * p.r;
  p.eigvals += k * p.r;
  p.residual_var = p.residual_vars[k];
  return true;
}

// The row of x at tile row i, or -1.
template <typename In, typename Acc>
GSA_DEVICE int64_t source_row(const GaussianMapParams<In, Acc>& p, int64_t i) {
  if (i >= p.rows) return -1;
  return p.row_of ? p.row_of[i] : i;
}

template <typename In, typename Acc>
GSA_DEVICE RowCoeffs<Acc> coeffs_of_row(const GaussianMapParams<In, Acc>& p, int64_t t, int64_t i) {
  const RowParams<Acc> rp = row_params(p, t, i);
  return row_coeffs<Acc>(p.kind, p.residual_var, rp.sigma_from, rp.sigma_to, rp.scale_from, rp.scale_to);
}

// grid (ceil(B / 32), ceil(r / 32), splits); block (32, 8). Thread (tx, ty) loads tile rows
// ty + 8m and accumulates its C fragment of coeffs[i0.., j0..] over its block's slice of D.
template <typename In, typename Acc>
__global__ void __launch_bounds__(kTile * kTileRowsPerPass)
    gaussian_project_kernel(GaussianMapParams<In, Acc> p) {
  if (!select_tile_model(p, blockIdx.x)) return;  // the whole block: before any barrier
  GSA_SHARED_STRUCT(ProjectShared<Acc>, sm);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i0 = int64_t(blockIdx.x) * kTile, j0 = int64_t(blockIdx.y) * kTile;
  const int64_t tiles_per_split = ceil_div(ceil_div(p.D, kTile), p.splits);
  const int64_t d_begin = int64_t(blockIdx.z) * tiles_per_split * kTile;
  const int64_t d_end = d_begin + tiles_per_split * kTile < p.D ? d_begin + tiles_per_split * kTile : p.D;

  Acc scale_x[kRowsPerThread], scale_mu[kRowsPerThread], acc[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
  int64_t src[kRowsPerThread];  // the rows of x this thread loads, -1 for none
  for (int m = 0; m < kRowsPerThread; ++m) {
    const int64_t i = src[m] = source_row(p, i0 + ty + kTileRowsPerPass * m);
    const RowCoeffs<Acc> rc = i >= 0 ? coeffs_of_row(p, 0, i) : RowCoeffs<Acc>{};
    scale_x[m] = rc.p;
    scale_mu[m] = rc.q;
  }
  for (int64_t d0 = d_begin; d0 < d_end; d0 += kTile) {
    // coalesced along d (x, mu) and along j (U); zeros outside the matrices
    const int64_t d = d0 + tx, j = j0 + tx;
    for (int m = 0; m < kRowsPerThread; ++m) {
      const int row = ty + kTileRowsPerPass * m;
      const int64_t i = src[m];
      sm.y[row][tx] = i >= 0 && d < d_end ? scale_x[m] * to_real(p.x[i * p.D + d]) - scale_mu[m] * p.mean[d] : Acc(0);
      const int64_t du = d0 + row;
      sm.u[row][tx] = du < d_end && j < p.r ? p.basis[du * p.r + j] : Acc(0);
    }
    __syncthreads();
    for (int k0 = 0; k0 < kTile; k0 += 8)
      mma_16x8x8(acc, tx, [&](int m, int k) { return sm.y[16 * (ty & 1) + m][k0 + k]; },
                 [&](int k, int n) { return sm.u[k0 + k][8 * (ty >> 1) + n]; });
    __syncthreads();  // the next tile overwrites sm
  }
  // the fragment's rows are other tile rows than the loaded ones: map them to x's rows again
  for (int q = 0; q < 4; ++q) {
    const int64_t i = source_row(p, i0 + frag_row(ty, tx, q)), j = j0 + frag_col(ty, tx, q);
    if (i >= 0 && j < p.r) p.coeffs[(int64_t(blockIdx.z) * p.B + i) * p.r + j] = acc[q];
  }
}

// grid (ceil(B / 32), ceil(D / 32), T); block (32, 8). Thread (tx, ty) loads tile rows ty + 8m
// and writes its C fragment of out[t, i0.., d0..].
template <typename In, typename Acc>
__global__ void __launch_bounds__(kTile * kTileRowsPerPass)
    gaussian_apply_kernel(GaussianMapParams<In, Acc> p) {
  if (!select_tile_model(p, blockIdx.x)) return;  // the whole block: before any barrier
  GSA_SHARED_STRUCT(ApplyShared<Acc>, sm);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i0 = int64_t(blockIdx.x) * kTile, d0 = int64_t(blockIdx.y) * kTile, t = blockIdx.z;
  const bool full_rank = p.r == p.D;
  int64_t src[kRowsPerThread];  // the rows of x this thread loads, -1 for none
  for (int m = 0; m < kRowsPerThread; ++m) src[m] = source_row(p, i0 + ty + kTileRowsPerPass * m);

  Acc acc[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
  for (int64_t j0 = 0; j0 < p.r; j0 += kTile) {
    const int64_t j = j0 + tx;
    for (int m = 0; m < kRowsPerThread; ++m) {
      const int row = ty + kTileRowsPerPass * m;
      const int64_t i = src[m];
      Acc g = Acc(0);
      if (i >= 0 && j < p.r) {
        Acc c = Acc(0);
        for (int s = 0; s < p.splits; ++s) c += p.coeffs[(s * p.B + i) * p.r + j];
        const RowParams<Acc> rp = row_params(p, t, i);
        g = c * (full_rank ? eigen_gain<Acc>(p.kind, p.eigvals[j], rp.sigma_from, rp.sigma_to, rp.scale_from, rp.scale_to)
                           : spectral_f<Acc>(p.kind, p.eigvals[j], p.residual_var, rp.sigma_from, rp.sigma_to,
                                             rp.scale_from, rp.scale_to));
      }
      sm.g[row][tx] = g;
      const int64_t d = d0 + row;
      sm.u[row][tx] = d < p.D && j < p.r ? p.basis[d * p.r + j] : Acc(0);
    }
    __syncthreads();
    for (int k0 = 0; k0 < kTile; k0 += 8)
      mma_16x8x8(acc, tx, [&](int m, int k) { return sm.g[16 * (ty & 1) + m][k0 + k]; },
                 [&](int k, int n) { return sm.u[8 * (ty >> 1) + n][k0 + k]; });
    __syncthreads();  // the next tile overwrites sm
  }
  // the fragment's rows are other tile rows than the loaded ones: map them to x's rows again
  for (int q = 0; q < 4; ++q) {
    const int64_t i = source_row(p, i0 + frag_row(ty, tx, q)), d = d0 + frag_col(ty, tx, q);
    if (i < 0 || d >= p.D) continue;  // (no barrier below)
    const RowCoeffs<Acc> rc = coeffs_of_row(p, t, i);
    const Acc mu = p.mean[d];
    const Acc y = rc.p * to_real(p.x[i * p.D + d]) - rc.q * mu;
    store(p.out + (t * p.B + i) * p.D + d, (full_rank ? Acc(0) : rc.a * y) + rc.b * mu + acc[q]);
  }
}

}  // namespace gsa::cuda
