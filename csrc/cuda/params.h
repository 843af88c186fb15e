// Kernel parameters and launch geometry of the CUDA kernels, shared by the kernels (.cuh), the
// launchers and the torch bindings. Plain C++: no CUDA and no torch headers.
#pragma once
#include <cstdint>

#include "gsa/spectral.h"  // GSA_HD

namespace gsa {

// Storage types of float16 / bfloat16 inputs: the raw 16 bits (same layout as c10::Half,
// c10::BFloat16, __half and __nv_bfloat16); kernels convert them with to_real / store.
struct f16 {
  uint16_t bits;
};
struct bf16 {
  uint16_t bits;
};

namespace cuda {

// Tiles of the Gaussian spectral map: blocks of (kTile, kTileRowsPerPass) threads compute
// kTile x kTile output tiles, kTile / kTileRowsPerPass rows per thread.
constexpr int kTile = 32;
constexpr int kTileRowsPerPass = 8;
constexpr int kRowsPerThread = kTile / kTileRowsPerPass;
// The projection c = U^T y splits D over blocks when the (row, rank) tiles alone cannot fill
// the GPU; each split covers at least this many D tiles.
constexpr int64_t kMinTilesPerSplit = 4;

// Mixture kernels: blocks of kWarps warps (32 x kWarps threads), one row of x per warp (kWarps
// rows per block). The r = 0 kernel gives each lane one component of a 32-component chunk.
constexpr int kWarps = 8;
constexpr int kMixtureRows = kWarps;
constexpr int kMixtureChunk = 32;
// The mixture kernels' back-projections cover 16 d per warp (one mma tile) at a time.
constexpr int kProjTile = 16 * kWarps;
constexpr int64_t kSharedMemoryLimit = 48 * 1024;  // dynamic shared memory without opt-in
// The mixture kernels split the components over blocks when the row blocks alone cannot fill
// the GPU; each split covers at least this many components.
constexpr int64_t kMinComponentsPerSplitDelta = 4 * kMixtureChunk;
constexpr int64_t kMinComponentsPerSplitLowRank = 1;
// Mixture logits are double (they grow like |x - mu|^2 / sigma^2, and float32 would round a
// logit of 1e6 by 0.06). A fast logit whose error bound exceeds logit_tol is recomputed exactly
// (the r = 0 distance in double, the r > 0 residual summed directly) unless it trails the
// running max by more than kCutoff plus the bounds: such a component weighs < exp(-kCutoff).
constexpr double kCutoff = 30.0;
template <typename Acc>
GSA_HD constexpr double logit_tol() {
  return sizeof(Acc) == sizeof(double) ? 1e-10 : 1e-4;
}
template <typename Acc>
GSA_HD constexpr double machine_eps() {
  return sizeof(Acc) == sizeof(double) ? 2.220446049250313e-16 : 1.1920928955078125e-7;
}
// Grid limits: gridDim.y and gridDim.z are at most 65535 (rows go on gridDim.x, up to 2^31 - 1).
constexpr int64_t kMaxGridYZ = 65535;

GSA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How many slices of D the projection uses: enough blocks for about two per multiprocessor.
inline int projection_splits(int64_t B, int64_t D, int64_t r, int multiprocessors) {
  if (B <= 0 || r <= 0) return 1;  // no projection
  const int64_t tiles = ceil_div(r, kTile) * ceil_div(B, kTile);
  const int64_t wanted = ceil_div(2 * int64_t(multiprocessors), tiles);
  const int64_t most = ceil_div(D, kTile) / kMinTilesPerSplit;
  const int64_t splits = wanted < most ? wanted : most;
  return splits > 1 ? int(splits) : 1;
}

// How many slices of the K components the mixture kernels use (about two blocks per
// multiprocessor); their partial softmax states are merged by mixture_merge_kernel.
inline int mixture_splits(int64_t B, int64_t K, int64_t r, int multiprocessors) {
  if (B <= 0) return 1;
  const int64_t row_blocks = ceil_div(B, kMixtureRows);
  const int64_t wanted = ceil_div(2 * int64_t(multiprocessors), row_blocks);
  const int64_t most = K / (r == 0 ? kMinComponentsPerSplitDelta : kMinComponentsPerSplitLowRank);
  const int64_t splits = wanted < most ? wanted : most;
  return splits > 1 ? int(splits) : 1;
}

GSA_HD int64_t components_per_split(int64_t K, int splits) { return ceil_div(K, splits); }

// Shared memory of the low-rank mixture kernel: its tiles (LowRankShared in mixture_kernels.cuh,
// at most kLowRankTileBytes), then the rows' coefficients [kMixtureRows, r] in double.
constexpr int64_t kLowRankTileBytes = 12 * 1024;
constexpr int64_t mixture_lowrank_smem_bytes(int64_t r) {
  return kLowRankTileBytes + int64_t(sizeof(double)) * kMixtureRows * r;
}

// Gaussian spectral map over T steps (T = 1 for gaussian_map; T = #sigmas for a trajectory):
// out[t, i] = a y + b mu + U diag(f_j) c with c = U^T y, y = p x[i] - q mu, and the row
// scalars / f_j of gsa::row_coeffs / gsa::spectral_f at (sigma_from[i], sigma_to[t, i],
// scale_from[i], scale_to[i]). Launchers cut T into chunks of at most kMaxGridYZ steps.
template <typename In, typename Acc>
struct GaussianMapParams {
  const In* x;            // [B, D]
  const Acc* mean;        // [D]
  const Acc* basis;       // [D, r]
  const Acc* eigvals;     // [r]
  Acc residual_var;
  const Acc* sigma_from;  // [B]
  const Acc* sigma_to;    // [T, B]
  const Acc* scale_from;  // [B], or nullptr for 1
  const Acc* scale_to;    // [B], or nullptr for 1
  int kind;               // gsa::SpectralKind
  int64_t B, D, r, T;
  int splits;             // projection_splits(...)
  Acc* coeffs;            // workspace [splits, B, r]: partial sums of c over the D slices
  In* out;                // [T, B, D]
  // Labelled maps (row i under component labels[i] of stacked Gaussians: mean [K, D], basis
  // [K, D, r], eigvals [K, r]): the rows are grouped by label into row tiles of kTile rows that
  // hold one label each. nullptr / 0: one Gaussian, row tile rows are x's rows.
  const int64_t* row_of = nullptr;          // [rows]: the row of x at each tile row, -1 for none
  const int64_t* tile_component = nullptr;  // [rows / kTile]: each tile's component, -1 for none
  const Acc* residual_vars = nullptr;       // [K]
  int64_t rows = 0;                         // tile rows: B, or the labelled row map's length
};

// Posterior of a K-component mixture at per-row sigma.
template <typename In, typename Acc>
struct MixtureParams {
  const In* x;             // [B, D]
  const Acc* means;        // [K, D]
  const Acc* bases;        // [K, D, r]
  const Acc* eigvals;      // [K, r]
  const Acc* residual_var; // [K]
  const Acc* log_weights;  // [K]
  const Acc* sigma;        // [B]
  int64_t B, D, K, r;
  int splits;              // mixture_splits(...): slices of the components, one per blockIdx.y
  double* part_max;        // workspace [splits, B]: running max of the logits of each slice
  Acc* part_sum;           // workspace [splits, B]: sum of exp(logit - part_max)
  Acc* accum;              // workspace [splits, B, D]: sum of exp(logit - part_max) D_k(x), or nullptr
  In* denoised;            // [B, D], or nullptr when not needed
  Acc* logp;               // [B]
  double* logits;          // workspace [B, K]: the logits (the weights' own memory when Acc is
                           // double), or nullptr when the weights are not needed
  Acc* weights;            // [B, K], or nullptr when not needed
};

// Local score machines (local_posterior, gsa_kernels/_core/_contract.py): one thread per query pixel,
// kLocalThreads pixels of one row per block; each thread streams every candidate with its own
// online softmax state in registers (double), kLocalChannels channels of the accumulator per
// pass over the candidates (more channels take more passes).
constexpr int kLocalThreads = 128;
constexpr int kLocalChannels = 4;
constexpr int64_t kLocalMaxGridX = 2147483647;

template <typename In, typename Acc>
struct LocalParams {
  const In* x;          // [B, C, H, W]
  const Acc* images;    // [N, C, H, W]
  const Acc* sigma;     // [B]
  int64_t B, N, C, H, W;
  int patch_size;       // odd >= 1
  int mode;             // 0 ls, 1 els, 2 bbels (gsa_kernels LocalMode)
  int padding;          // 0 zeros, 1 circular
  int kind;             // 0 denoise, 1 score
  In* out;              // [B, C, H, W]
};

}  // namespace cuda
}  // namespace gsa
