// CUDA kernels of the Gaussian spectral map (denoise / score / flow) and the trajectory, in two
// shared-memory tiled passes (the math is gsa::row_coeffs / gsa::spectral_f of spectral.h):
//   project: coeffs[s, i, j] = sum_{d in slice s} y[i, d] U[d, j],   y = p_i x[i] - q_i mu
//   apply:   out[t, i, d]    = a y[i, d] + b mu[d] + sum_j U[d, j] f_j(t, i) sum_s coeffs[s, i, j]
// The projection is shared by all T steps of a trajectory (y does not depend on the target
// sigma). A full-rank basis (r == D) has no residual directions: apply then uses
// out = b mu + U diag(eigen_gain(lam_j)) c, which keeps small-sigma scores and flows accurate.
// Blocks are (kTile, kTileRowsPerPass) = (32, 8) threads and own a 32 x 32 output tile, four
// rows per thread; the reduction dimension streams through shared memory 32 at a time.
// Accumulation in Acc (float, or double for float64 inputs). No torch headers.
// Labelled maps (p.tile_component): each row tile holds rows of one label (through p.row_of);
// a block offsets the model pointers to its tile's component and reads its rows through the map.
#pragma once
#include "kernel_common.cuh"

namespace gsa::cuda {

template <typename Acc>
struct ProjectShared {
  Acc y[kTile][kTile];  // [row][d]
  Acc u[kTile][kTile];  // [d][j]
};

template <typename Acc>
struct ApplyShared {
  Acc g[kTile][kTile];      // [row][j]: f_j c_j
  Acc u[kTile][kTile + 1];  // [d][j], padded: read down a column (u[tx][k]) without bank conflicts
};

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

// grid (ceil(B / 32), ceil(r / 32), splits); block (32, 8). Thread (tx, ty) accumulates
// coeffs[i0 + ty + 8m, j0 + tx] for m < 4 over its block's slice of D.
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

  Acc scale_x[kRowsPerThread], scale_mu[kRowsPerThread], acc[kRowsPerThread];
  int64_t src[kRowsPerThread];  // the rows of x, -1 for none
  for (int m = 0; m < kRowsPerThread; ++m) {
    const int64_t i = src[m] = source_row(p, i0 + ty + kTileRowsPerPass * m);
    const RowCoeffs<Acc> rc = i >= 0 ? coeffs_of_row(p, 0, i) : RowCoeffs<Acc>{};
    scale_x[m] = rc.p;
    scale_mu[m] = rc.q;
    acc[m] = Acc(0);
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
    for (int k = 0; k < kTile; ++k) {
      const Acc u = sm.u[k][tx];
      for (int m = 0; m < kRowsPerThread; ++m) acc[m] += sm.y[ty + kTileRowsPerPass * m][k] * u;
    }
    __syncthreads();  // the next tile overwrites sm
  }
  for (int m = 0; m < kRowsPerThread; ++m) {
    const int64_t i = src[m], j = j0 + tx;
    if (i >= 0 && j < p.r) p.coeffs[(int64_t(blockIdx.z) * p.B + i) * p.r + j] = acc[m];
  }
}

// grid (ceil(B / 32), ceil(D / 32), T); block (32, 8). Thread (tx, ty) writes
// out[t, i0 + ty + 8m, d0 + tx] for m < 4.
template <typename In, typename Acc>
__global__ void __launch_bounds__(kTile * kTileRowsPerPass)
    gaussian_apply_kernel(GaussianMapParams<In, Acc> p) {
  if (!select_tile_model(p, blockIdx.x)) return;  // the whole block: before any barrier
  GSA_SHARED_STRUCT(ApplyShared<Acc>, sm);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i0 = int64_t(blockIdx.x) * kTile, d0 = int64_t(blockIdx.y) * kTile, t = blockIdx.z;
  const bool full_rank = p.r == p.D;
  int64_t src[kRowsPerThread];  // the rows of x, -1 for none
  for (int m = 0; m < kRowsPerThread; ++m) src[m] = source_row(p, i0 + ty + kTileRowsPerPass * m);

  Acc acc[kRowsPerThread] = {};
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
    for (int k = 0; k < kTile; ++k) {
      const Acc u = sm.u[tx][k];
      for (int m = 0; m < kRowsPerThread; ++m) acc[m] += sm.g[ty + kTileRowsPerPass * m][k] * u;
    }
    __syncthreads();  // the next tile overwrites sm
  }
  const int64_t d = d0 + tx;
  if (d >= p.D) return;  // no barrier below
  const Acc mu = p.mean[d];
  for (int m = 0; m < kRowsPerThread; ++m) {
    const int64_t i = src[m];
    if (i < 0) continue;
    const RowCoeffs<Acc> rc = coeffs_of_row(p, t, i);
    const Acc y = rc.p * to_real(p.x[i * p.D + d]) - rc.q * mu;
    store(p.out + (t * p.B + i) * p.D + d, (full_rank ? Acc(0) : rc.a * y) + rc.b * mu + acc[m]);
  }
}

}  // namespace gsa::cuda
