// CPU kernel of the r = 0 mixture posterior: isotropic components, and with residual_var = 0 the
// empirical ("delta") mixture of a training set (docs/architecture.md section 1.3). Called by
// mixture_posterior_cpu (mixture.cpp) when the bases have no columns.
//
// Many queries (B > kFewRows, and in float B > kFewRowsF32): row blocks of up to 256 rows, one per thread when there are
// enough, else one after another with threaded GEMMs and row passes (see row_block); inside a row
// block the points stream in blocks (a [rows, block] float tile, 16 MiB per thread) with an online
// softmax (running max m, sum l, unnormalised denoiser accumulator acc). Per (row block, point block):
//   F = X M^T          x . mu_k (one GEMM): fast |x - mu_k|^2 = |x|^2 + |mu_k|^2 - 2 x . mu_k
//   per row           fast logits; the row's max over the block (m moves there once per
//                      block); where the logits may be off by more than kDeltaLogitTol (the smaller
//                      of an error bound and a measured estimate), the points whose weight that
//                      error could move by more than the budget (refine_threshold) get
//                      |x - mu_k|^2 from the differences in double
//   p = exp(L - m)     written over F and summed in one vectorized pass per row (weights_row)
//   acc = acc * rescale + P M
//                      dense posterior (sigma large): one GEMM over the block; few nonzero p
//                      (sigma small): the p_k mu_k rows of the significant weights (>= p_min,
//                      where the others could not move the result in T) are added directly. The
//                      choice counts the block's significant weights (kSparseRatio); between 1 in
//                      16 and 1 in 4 they are first counted again above each row's own cut
//                      (tail_cut: the weights below it sum to < eps / 1024 of the row's).
// Few queries (B <= kFewRows; in float B <= kFewRowsF32; memory-bound at B 1): the points are cut
// into parts (runs of chunks) that the threads take in turn, each an online softmax over its
// points, merged exactly in part order. Each chunk (~kChunkBytes) stays in L2 for both products
// while the part's next chunk is prefetched into L2, so every point is read from memory once:
//   chunk_dots        x . mu_k for all rows in register tiles over L1-sized d-blocks: in double
//                      up to kFewRows rows, |mu_k|^2 in the same pass (a rigorous bound, no
//                      refinement); in float beyond, with the row blocks' bound / measured
//                      estimate / refinement (row_pass)
//   per row           row_pass as above
//   backproject_tile  acc = acc * rescale + the chunk's p_k mu_k, rows and a column tile in
//                      registers, over the points significant in some row
// Constant coordinates (every point the same there, and one residual variance): the row blocks
// run on the varying coordinates only, the others filled in after (see
// empirical_without_constant_coordinates).
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
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
// the low end at small sigma, where the bound decides anyway; for the few-query float tiles,
// chunk_dots, emulated in float64 with 6 rows per setting, MNIST-5k and uniform points: 2.4 to 15x).
constexpr int64_t kProbes = 16;
constexpr double kSafety = 8.0;
constexpr int64_t kPointBlockBytes = 16 << 20;
// Few queries: up to kFewRows rows take the split over the points with double dot products, in
// float up to kFewRowsF32 with float ones (at B 16 the double ones made it compute-bound, slower
// than the GEMM path: quiet AMD EPYC, D 3072, N 20k, 89.5 vs 72.5 ms; the float tiles ran it in
// ~0.6x the GEMM path's time, noisy, same host), in chunks of ~kChunkBytes (two chunks, x and acc:
// < 1 MiB of L2 at B 16, D 3072); kPartsPerThread parts per thread (a core slowed by other work
// takes fewer); d-blocks of kDotBlock elements (a block of 16 rows and 16 points fits L1).
constexpr int64_t kFewRows = 4;
constexpr int64_t kFewRowsF32 = 16;
constexpr int64_t kChunkBytes = 192 << 10;
constexpr int64_t kPartsPerThread = 4;
constexpr int64_t kDotBlock = 256;

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
// returns their sum (8 lanes, then pairwise) and adds the count of those above exp(-significant)
// to kept.
template <typename T>
double weights_row(const double* L, double m, int64_t n, T* P, double significant, int64_t& kept) {
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
    count -= d > -significant;
    const Out8 out = __builtin_convertvector(p, Out8);
    if (lanes == 8) std::memcpy(P + k, &out, sizeof out);
    else std::memcpy(P + k, &out, lanes * sizeof(T));
  }
  for (int j = 0; j < 8; ++j) kept += count[j];
  return ((sum[0] + sum[1]) + (sum[2] + sum[3])) + ((sum[4] + sum[5]) + (sum[6] + sum[7]));
}

// A row's back-projection cut in a block of points: the largest of kCutLevels weights
// exp(-c), c from log(1024 / eps) nats (one weight there could move the denoiser by eps / 1024 of
// the largest |mu_k|) to `significant`, in steps of 1.5 nats, whose weights below it sum to at
// most eps / 1024 of the row's block sum (with 1 % for the rounding of the lane sums); p_min
// (= exp(-significant)) if none does. Summed over the blocks cut this way, the weights left out
// are <= eps / 1024 of l, the bound K p_min gives (now from the weights themselves); a row whose
// other blocks keep p_min may lose both: < eps / 512 of l at worst (halving this budget would
// restore eps / 1024). In the transition from one-hot to dense posteriors most of the weights
// above p_min are far too small to matter together (MNIST-5k at sigma 2: 229 of 423 per row are
// left). Adds the count of the weights >= the cut to kept.
constexpr int kCutLevels = 6;
template <typename T>
T tail_cut(const T* P, int64_t n, T p_min, double significant, int64_t& kept) {
  using Float16v = float __attribute__((vector_size(64)));
  using Int32x16 = int32_t __attribute__((vector_size(64)));
  using V = std::conditional_t<std::is_same_v<T, float>, Float16v, Double8>;
  using I = std::conditional_t<std::is_same_v<T, float>, Int32x16, Int64x8>;
  constexpr int64_t kLanes = 64 / sizeof(T);
  const double eps = std::numeric_limits<T>::epsilon(), first = std::log(1024.0 / eps);
  T level[kCutLevels];
  for (int j = 0; j < kCutLevels; ++j) level[j] = static_cast<T>(std::exp(-std::min(significant, first + 1.5 * j)));
  V total = {}, below[kCutLevels] = {};
  I above[kCutLevels] = {};
  for (int64_t k = 0; k < n; k += kLanes) {
    V p = {};
    std::memcpy(&p, P + k, std::min(kLanes, n - k) * sizeof(T));  // lanes past n: 0 (below every level)
    total += p;
    for (int j = 0; j < kCutLevels; ++j) {
      const I is_below = p < level[j];
      below[j] += (V)((I)p & is_below);
      above[j] -= ~is_below;
    }
  }
  const auto lane_sum = [](const auto& v) {
    double t = 0;
    for (int64_t l = 0; l < kLanes; ++l) t += static_cast<double>(v[l]);
    return t;
  };
  const double budget = eps / 1024 * 0.99 * lane_sum(total);
  for (int j = 0; j < kCutLevels; ++j)  // the highest level first
    if (1.01 * lane_sum(below[j]) <= budget) {
      int64_t count = 0;
      for (int64_t l = 0; l < kLanes; ++l) count += above[j][l];
      kept += count;
      return level[j];
    }
  int64_t count = 0;
  for (int64_t k = 0; k < n; ++k) count += P[k] >= p_min;
  kept += count;
  return p_min;
}

// Where a row's fast logits may be off by up to e > kDeltaLogitTol: the fast logit from which on
// the points of a block get exact distances (+inf: none need them). Points U left with fast
// logits move the weights by a total variation <= S / (1 - S), S = (e^e - 1) e^2e sum_U q /
// sum_all q, q = exp(L - m) of the fast logits L (each within +-e of the true one; m >= every L
// of the block). Per block: sum_U q <= S_max sum_block q; summed over the blocks this is the
// row's condition. The points are counted in bins of 1/4 nat below m (sum_block q >= the bins'
// lower edges); the threshold is the highest bin edge whose tail keeps S <= kDeltaLogitTol, one
// bin lower for rounding at the edges; never below m - 2e - kCutoff (the rule before this one:
// beyond it every weight is < e^-kCutoff). So refinement goes to the points that carry weight,
// not to every point within reach of the max.
inline double refine_threshold(const double* L, int64_t n, double m, double e) {
  constexpr int kPerNat = 4, kBins = 64 * kPerNat;
  static const std::array<double, kBins + 1> edge = [] {  // edge[j] = exp(-j / kPerNat)
    std::array<double, kBins + 1> a{};
    for (int j = 0; j <= kBins; ++j) a[j] = std::exp(-static_cast<double>(j) / kPerNat);
    return a;
  }();
  // count[kBins]: beyond 64 nats, NaN and -inf logits. Most points of a row lie there (sigma
  // small to moderate), so 8 at a time are first checked for any within 64 nats; and 4 count
  // arrays in turn keep repeated bins from chaining each increment behind the previous one.
  std::array<std::array<int64_t, kBins + 1>, 4> counts{};
  int64_t beyond = 0, k = 0;
  for (; k + 8 <= n; k += 8) {
    Double8 d;
    std::memcpy(&d, L + k, sizeof d);
    d = (m - d) * kPerNat;  // >= 0
    const Int64x8 within = d < kBins;
    int64_t n_within = 0;
    for (int j = 0; j < 8; ++j) n_within -= within[j];
    beyond += 8 - n_within;
    if (n_within == 0) continue;
    for (int j = 0; j < 8; ++j)
      if (within[j]) ++counts[j & 3][static_cast<int>(d[j])];
  }
  for (; k < n; ++k) {
    const double d = (m - L[k]) * kPerNat;
    ++counts[0][d < kBins ? static_cast<int>(d) : kBins];
  }
  std::array<int64_t, kBins + 1> count{};
  for (int j = 0; j <= kBins; ++j) count[j] = counts[0][j] + counts[1][j] + counts[2][j] + counts[3][j];
  count[kBins] += beyond;
  double total = 0;  // <= sum_block q
  for (int j = 0; j < kBins; ++j) total += static_cast<double>(count[j]) * edge[j + 1];
  const double budget = kDeltaLogitTol / (std::expm1(e) * std::exp(2 * e)) * total;
  const double lowest = m - 2 * e - kCutoff;
  double tail = static_cast<double>(count[kBins]) * edge[kBins];  // >= sum over those q
  if (!(tail <= budget)) return lowest;
  for (int j = kBins - 1; j >= 0; --j) {
    tail += static_cast<double>(count[j]) * edge[j];
    if (tail > budget) return std::max(lowest, m - static_cast<double>(j + 2) / kPerNat);
  }
  return std::numeric_limits<double>::infinity();
}

// The few-query route's loops (empirical_impl). Each is a register tile that reads every operand
// once per tile step; the per-element order of the floating-point operations is fixed by the lanes,
// not by the tile, so every ISA (and every tile shape) gives the same bits.
using Float16 = float __attribute__((vector_size(64)));

template <typename V, typename T>
inline V load_vec(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// a line of the next chunk into L2 (prefetcht1; never faults)
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

// Dot products x_r . mu_p of a few rows and a chunk of points, in double (V = Double8: x in
// double, products of float32 operands exact) or float (V = Float16), each dot summed in V's lanes
// in d order, the lanes pairwise, then the tail d past the last full vector: the same bits for
// every tile and d-block shape. The lanes' partial sums of a tile of R rows (x + r D) and P points
// (mu + p D) live in part[r * ldp + p] between d-blocks [d0, d1) (multiples of the lanes), so a
// d-block of the rows and of the chunk's points stays in L1 while every tile reads it. next: the
// P points' successors (the next chunk), fetched into L2 as d goes, or nullptr. (part is a plain
// array of XT, kLanes per vector, read and written with memcpy: no over-aligned allocations.)
template <typename V, typename XT, typename MT>
inline V load_lanes(const MT* p) {
  if constexpr (std::is_same_v<V, Double8>) {
    Double8 v;
    load8(p, v);
    return v;
  } else {
    return load_vec<V>(p);
  }
}

// kSq: also the points' |mu_p|^2 in the same lanes (partials in sq, stride kLanes; double only).
template <int R, int P, bool kSq, typename V, typename XT, typename MT>
inline void dots_block(const XT* x, const MT* mu, int64_t D, int64_t d0, int64_t d1, XT* part, int64_t ldp,
                       XT* sq, const MT* next) {
  constexpr int64_t kLanes = sizeof(V) / sizeof(XT), kLine = 64 / sizeof(MT);
  V acc[R][P], sqa[kSq ? P : 1];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = load_vec<V>(part + (r * ldp + p) * kLanes);
  if constexpr (kSq)
    for (int p = 0; p < P; ++p) sqa[p] = load_vec<V>(sq + p * kLanes);
  for (int64_t d = d0; d < d1; d += kLanes) {
    if (next && d % kLine == 0)
      for (int p = 0; p < P; ++p) prefetch_l2(next + p * D + d);
    V v[P];
    for (int p = 0; p < P; ++p) v[p] = load_lanes<V, XT>(mu + p * D + d);
    if constexpr (kSq)
      for (int p = 0; p < P; ++p) sqa[p] += v[p] * v[p];
    for (int r = 0; r < R; ++r) {
      const V xv = load_vec<V>(x + r * D + d);
      for (int p = 0; p < P; ++p) acc[r][p] += xv * v[p];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) std::memcpy(part + (r * ldp + p) * kLanes, &acc[r][p], sizeof(V));
  if constexpr (kSq)
    for (int p = 0; p < P; ++p) std::memcpy(sq + p * kLanes, &sqa[p], sizeof(V));
}

// the dot product from its lanes' partial sums: pairwise, then the tail d in [dv, D)
template <typename V, typename XT, typename MT>
inline XT dot_finish(const XT* lanes, const XT* x, const MT* mu, int64_t dv, int64_t D) {
  const V a = load_vec<V>(lanes);
  XT s;
  if constexpr (sizeof(V) / sizeof(XT) == 8) {
    s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  } else {
    s = (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))) +
        (((a[8] + a[9]) + (a[10] + a[11])) + ((a[12] + a[13]) + (a[14] + a[15])));
  }
  for (int64_t d = dv; d < D; ++d) s += x[d] * static_cast<XT>(mu[d]);
  return s;
}

// F[i * ldf + k] = x_i . mu_k for the B rows of x (XT: double or float, rows of D) and the gn
// points of mu (MT), as above: rows in tiles of kRows (kRows = B: one tile), points in tiles of
// kPoints (then single points), d in blocks of kBlock elements; part: B * gn partial vectors
// (B * gn * lanes XT).
// The first row tile prefetches next (the next chunk, gn_next points) into L2, and with kSq
// (double) sums the points' squares too: mu_sq[k] = |mu_k|^2 as the dots, error <= (D / 8 + 11) u
// |mu_k|^2 (sq: gn * lanes partials).
template <typename V, int kRows, int kPoints, int64_t kBlock, bool kSq = false, typename XT, typename MT>
void chunk_dots(const XT* x, int64_t B, const MT* mu, int64_t gn, int64_t D, XT* F, int64_t ldf, XT* part,
                const MT* next, int64_t gn_next, XT* sq = nullptr, double* mu_sq = nullptr) {
  constexpr int64_t kLanes = sizeof(V) / sizeof(XT);
  const int64_t dv = D / kLanes * kLanes;
  std::fill(part, part + B * gn * kLanes, XT(0));
  if constexpr (kSq) std::fill(sq, sq + gn * kLanes, XT(0));
  const auto rows = [&](auto r_tag, int64_t i0, int64_t d0, int64_t d1) {
    constexpr int R = decltype(r_tag)::value;
    const MT* nx = i0 == 0 ? next : nullptr;
    const auto tile = [&](auto sq_tag, int64_t k, auto p_tag, const MT* pf) {
      constexpr bool kS = decltype(sq_tag)::value;
      constexpr int Pt = decltype(p_tag)::value;
      dots_block<R, Pt, kS, V>(x + i0 * D, mu + k * D, D, d0, d1, part + (i0 * gn + k) * kLanes, gn,
                               kS ? sq + k * kLanes : nullptr, pf);
    };
    int64_t k = 0;
    for (; k + kPoints <= gn; k += kPoints) {
      const MT* pf = nx && k + kPoints <= gn_next ? nx + k * D : nullptr;
      if (kSq && i0 == 0) tile(std::true_type{}, k, std::integral_constant<int, kPoints>{}, pf);
      else tile(std::false_type{}, k, std::integral_constant<int, kPoints>{}, pf);
    }
    for (; k < gn; ++k) {
      const MT* pf = nx && k < gn_next ? nx + k * D : nullptr;
      if (kSq && i0 == 0) tile(std::true_type{}, k, std::integral_constant<int, 1>{}, pf);
      else tile(std::false_type{}, k, std::integral_constant<int, 1>{}, pf);
    }
  };
  for (int64_t d0 = 0; d0 < dv; d0 += kBlock) {
    const int64_t d1 = std::min(dv, d0 + kBlock);
    for (int64_t i0 = 0; i0 < B; i0 += kRows) {
      switch (std::min<int64_t>(kRows, B - i0)) {  // (a switch over the tile heights up to 4)
        case 1: rows(std::integral_constant<int, 1>{}, i0, d0, d1); break;
        case 2: rows(std::integral_constant<int, std::min(2, kRows)>{}, i0, d0, d1); break;
        case 3: rows(std::integral_constant<int, std::min(3, kRows)>{}, i0, d0, d1); break;
        default: rows(std::integral_constant<int, kRows>{}, i0, d0, d1); break;
      }
    }
  }
  for (int64_t i = 0; i < B; ++i)
    for (int64_t k = 0; k < gn; ++k) F[i * ldf + k] = dot_finish<V>(part + (i * gn + k) * kLanes, x + i * D, mu + k * D, dv, D);
  if constexpr (kSq) {
    static_assert(std::is_same_v<XT, double>, "squares in double");
    for (int64_t k = 0; k < gn; ++k) {
      const V a = load_vec<V>(sq + k * kLanes);
      double s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
      for (int64_t d = dv; d < D; ++d) s += static_cast<double>(mu[k * D + d]) * static_cast<double>(mu[k * D + d]);
      mu_sq[k] = s;
    }
  }
}

// acc_r = acc_r * scale_r + sum_j p[r ldp + ks[j]] mu_ks[j] for R rows acc_r = acc + r D, the
// points ks[0 .. nk) of a chunk (mu + k D), added in that order: per element the operations of a
// rescale then one axpy per point. Columns in tiles of NV vectors, rows and tile in registers, so
// each point's slice is read once for the R rows. Where every scale_r is 1 (the rows' max did not
// move: most chunks) the rescale is left out: a product by 1 is exact, so the bits are the same.
template <int R, int NV, typename T>
inline void backproject_tile(T* acc, int64_t D, const T* scale, const T* p, int64_t ldp, const int32_t* ks,
                             int64_t nk, const T* mu) {
  using V = std::conditional_t<std::is_same_v<T, double>, Double8, Float16>;
  constexpr int64_t kLanes = sizeof(V) / sizeof(T);
  bool rescale = false;
  for (int r = 0; r < R; ++r) rescale = rescale || scale[r] != T(1);
  const auto cols = [&](auto nv_tag, int64_t d0, int64_t d1) {  // d0 .. d1 in tiles of NV' vectors
    constexpr int kNv = decltype(nv_tag)::value;
    constexpr int64_t kW = kNv * kLanes;
    int64_t d = d0;
    for (; d + kW <= d1; d += kW) {
      V a[R][kNv];
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < kNv; ++v) {
          a[r][v] = load_vec<V>(acc + r * D + d + v * kLanes);
          if (rescale) a[r][v] *= scale[r];
        }
      for (int64_t j = 0; j < nk; ++j) {
        const T* m = mu + ks[j] * D + d;
        V mv[kNv];
        for (int v = 0; v < kNv; ++v) mv[v] = load_vec<V>(m + v * kLanes);
        for (int r = 0; r < R; ++r) {
          const T pr = p[r * ldp + ks[j]];
          for (int v = 0; v < kNv; ++v) a[r][v] += pr * mv[v];
        }
      }
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < kNv; ++v) std::memcpy(acc + r * D + d + v * kLanes, &a[r][v], sizeof(V));
    }
    return d;
  };
  int64_t d = cols(std::integral_constant<int, NV>{}, 0, D);
  d = cols(std::integral_constant<int, 1>{}, d, D);
  for (; d < D; ++d)
    for (int r = 0; r < R; ++r) {
      T s = rescale ? acc[r * D + d] * scale[r] : acc[r * D + d];
      for (int64_t j = 0; j < nk; ++j) s += p[r * ldp + ks[j]] * mu[ks[j] * D + d];
      acc[r * D + d] = s;
    }
}

template <typename X>
void empirical_impl(const at::Tensor& x, const at::Tensor& means, const at::Tensor& residual_var_tensor,
                    const at::Tensor& log_weights, const at::Tensor& sigma, bool need_denoised,
                    bool need_weights, at::Tensor& den, at::Tensor& logp, at::Tensor& weights,
                    std::vector<double> given_mu_sq = {}) {
  using T = at::opmath_type<X>;
  const int64_t B = x.size(0), D = x.size(1), K = means.size(0);
  const T* mu = means.data_ptr<T>();
  const T* residual_var = residual_var_tensor.data_ptr<T>();
  const T* logw = log_weights.data_ptr<T>();
  const T* sig = sigma.data_ptr<T>();
  T* logp_p = logp.data_ptr<T>();
  T* w_p = need_weights ? weights.data_ptr<T>() : nullptr;
  X* den_p = need_denoised ? den.data_ptr<X>() : nullptr;

  // equal_residual_var: the log-density's normalisation is one log per row
  double min_residual_var = std::numeric_limits<double>::infinity();
  bool equal_residual_var = true;
  for (int64_t k = 0; k < K; ++k) {
    min_residual_var = std::min(min_residual_var, static_cast<double>(residual_var[k]));
    equal_residual_var = equal_residual_var && residual_var[k] == residual_var[0];
  }
  // |mu_k|^2 per call (a cache keyed by tensor identity went stale through .data / numpy writes;
  // the model owns no r = 0 layout): one pass over the points before the row blocks, or per chunk
  // of the few-query split (which reads each point once); max_mu: the row blocks' error bound
  // (given: from the gather of empirical_without_constant_coordinates, which read the points then)
  const bool mu_sq_given = given_mu_sq.size() == static_cast<size_t>(K);
  std::vector<double> mu_sq_v = mu_sq_given ? std::move(given_mu_sq) : std::vector<double>(K);
  double* mu_sq = mu_sq_v.data();
  double max_mu = 0;
  const bool isotropic_delta = equal_residual_var && residual_var[0] == T(0);  // the empirical mixture: D_k = mu_k
  const double eps = std::numeric_limits<T>::epsilon();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // The back-projection adds p_k mu_k for the weights p >= p_min = exp(-significant) only: all the
  // others together (< K p_min, relative to the row's weight sum l >= ~1) move the denoiser by
  // < eps / 1024 of the largest |mu_k|, far below its rounding in T (float: ~31 nats at K 5000
  // where the weights go down to exp(-kNegligible) = exp(-50); double: unchanged). The sum l
  // keeps them.
  const double significant = std::min(kNegligible, std::log(1024.0 * static_cast<double>(K) / eps));
  const T p_min = static_cast<T>(std::exp(-significant));

  // Per-row constants: sigma^2, the isotropic normalisation, |x|^2.
  struct RowConst {
    double s2, iso_norm, x_sq;
  };
  const auto row_const = [&](int64_t b, const T* xi) {
    const double s = sig[b];
    const double s2 = s * s;
    return RowConst{s2, isotropic_log_norm<double>(static_cast<double>(residual_var[0]) + s2, D), sum_squares(xi, D)};
  };
  // Online-softmax state of one row: max m, sum l, hx = sum p h_perp, the fast max so far, the
  // logits' error estimate, the measured rounding rate of the fast distances (0: not measured);
  // acc (the unnormalised denoiser less hx x) is kept beside it.
  struct RowState {
    double m = -std::numeric_limits<double>::infinity(), l = 0, hx = 0,
           m_fast = -std::numeric_limits<double>::infinity(), err = 0, rate = 0;
  };
  // One row's pass over the points g0 .. g0 + gn - 1 given its dot products Fi (T or double):
  // fast logits into L, exact distances where needed, the state moved to the block's max (acc
  // rescaled), the weights p = exp(L - m) into Pi (their sum into l; kept counts the significant
  // ones), hx; the weights as asked are copied to wrow before the isotropic factor. probe: the
  // state's first block, where the rounding of the fast distances is measured if the bound is
  // loose (into st.rate; the estimate scales with err_mu, the largest |mu_k| the error is for).
  const auto row_pass = [&](const RowConst& rc, RowState& st, const T* xi, const auto* Fi, int64_t g0, int64_t gn,
                            bool probe, double err_mu, double* L, T* acc_i, T* Pi, T* wrow, int64_t& kept) {
    const auto logit_of = [&](int64_t kk, double sq) {
      return equal_residual_var ? logw[kk] + rc.iso_norm - 0.5 * sq / (static_cast<double>(residual_var[0]) + rc.s2)
                                : logw[kk] + component_logpdf<double>(sq, 0, 0, 0, residual_var[kk], rc.s2, D, 0);
    };
    if (equal_residual_var) {  // one vectorizable loop
      const double c = 0.5 / (static_cast<double>(residual_var[0]) + rc.s2), xs = rc.x_sq, base = rc.iso_norm;
      for (int64_t k = 0; k < gn; ++k) {
        const double sq = xs + mu_sq[g0 + k] - 2.0 * static_cast<double>(Fi[k]);
        L[k] = base + static_cast<double>(logw[g0 + k]) - c * (sq > 0 ? sq : 0.0);
      }
    } else {
      for (int64_t k = 0; k < gn; ++k)
        L[k] = logit_of(g0 + k, std::max(0.0, rc.x_sq + mu_sq[g0 + k] - 2.0 * static_cast<double>(Fi[k])));
    }
    // the row's fast max over the block first: refinement and the weights below then work
    // against (nearly) the final max
    double mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t k = 0;
    for (; k + 4 <= gn; k += 4)
      for (int j = 0; j < 4; ++j) mx[j] = std::max(mx[j], L[k + j]);
    for (; k < gn; ++k) mx[0] = std::max(mx[0], L[k]);
    const double best = std::max(std::max(mx[0], mx[1]), std::max(mx[2], mx[3]));
    st.m_fast = std::max(st.m_fast, best);
    // The bound err is worst case; in the noise-dominated regime (large sigma) it overstates the
    // rounding by ~100x. So the first block measures the actual error on the nearest point
    // (aligned with x: its dot product errs the most) and kProbes - 1 others, and the smaller of
    // bound and estimate decides.
    if (probe && st.err > kDeltaLogitTol) {
      const int64_t probes = std::min(gn, kProbes);
      const int64_t best_k = std::find(L, L + gn, best) - L;
      double rate = eps / 4;  // one rounding of the result: the least a GEMM can err
      for (int64_t j = 0; j < probes; ++j) {
        const int64_t kp = j == 0 ? best_k : j * gn / probes;
        const double fast = rc.x_sq + mu_sq[g0 + kp] - 2.0 * static_cast<double>(Fi[kp]);
        const double norms = std::sqrt(rc.x_sq * mu_sq[g0 + kp]);
        if (norms > 0)
          rate = std::max(rate, std::abs(fast - sqdist_exact(xi, mu + (g0 + kp) * D, D)) / (2 * norms));
      }
      st.rate = rate;
      st.err = std::min(st.err, kSafety * rate * std::sqrt(rc.x_sq) * err_mu / (min_residual_var + rc.s2));
    }
    // exact distances of the points whose weight the fast logits' error could move (the block's
    // max logit is among them)
    double block_max = best + st.err;  // unrefined: fast max + its error (p <= e^err)
    if (st.err > kDeltaLogitTol) {
      const double keep = refine_threshold(L, gn, st.m_fast, st.err);
      if (keep <= best) {
        block_max = -INFINITY;
        for (int64_t kk = 0; kk < gn; ++kk)
          if (L[kk] >= keep) {
            L[kk] = logit_of(g0 + kk, sqdist_exact(xi, mu + (g0 + kk) * D, D));
            block_max = std::max(block_max, L[kk]);
          }
      }
    }
    // one softmax reference for the whole block
    const double m_new = std::max(st.m, block_max);
    const T sc = static_cast<T>(merge_scale(st.m, m_new));
    st.m = m_new;
    st.l *= sc;
    st.hx *= sc;
    if (acc_i && sc != T(1))
      for (int64_t d = 0; d < D; ++d) acc_i[d] *= sc;
    st.l += weights_row(L, st.m, gn, Pi, significant, kept);
    if (wrow) std::copy(Pi, Pi + gn, wrow);
    if (!isotropic_delta) {  // D_k = mu_k + h_perp (x - mu_k): P_k = p_k (1 - h_perp) multiplies mu_k
      double hsum = 0;
      for (int64_t kk = 0; kk < gn; ++kk) {
        const double residual_var_k = residual_var[g0 + kk], h_perp = residual_var_k / (residual_var_k + rc.s2);
        hsum += Pi[kk] * h_perp;
        Pi[kk] = static_cast<T>(Pi[kk] * (1.0 - h_perp));
      }
      st.hx += hsum;
    }
  };
  // the error bound of the fast logits from float dot products (|x|^2, |mu|^2 are exact sums in
  // double; only the dot product rounds): kGemmErr eps sqrt(D) |x| |mu| / (residual_var + s^2)
  const auto gemm_err_bound = [&](const RowConst& rc) {
    return kGemmErr * eps * std::sqrt(double(D) * rc.x_sq) * max_mu / (min_residual_var + rc.s2);
  };

  // Few queries: the distance GEMM and the back-projection are memory-bound (each reads every
  // point for a handful of rows), and the rows can not be split over the threads. So the points
  // are: split into parts (contiguous runs of chunks) that the threads take in turn, each part an
  // online-softmax state, merged exactly at the end in part order (the result depends on the
  // number of parts, not on which thread ran which); and read once, in chunks of ~kChunkBytes
  // that stay in L2 for both products while the next chunk is fetched: |mu_k|^2, the dot products
  // (chunk_dots: in double up to kFewRows rows, in float beyond), the row
  // passes, then the chunk's weighted points (backproject_tile).
  const int64_t chunk = std::clamp<int64_t>(kChunkBytes / (D * int64_t(sizeof(T))), 8, 1024);
  const int64_t num_chunks = (K + chunk - 1) / chunk;
  constexpr bool kFloat = std::is_same_v<T, float>;
  const bool f32_dots = kFloat && B > kFewRows;
  if ((B <= kFewRows || (kFloat && B <= kFewRowsF32)) && num_chunks >= 2) {
    const int64_t parts = std::min(num_chunks, threads * kPartsPerThread);
    at::Tensor xbuf = std::is_same_v<X, T> ? at::Tensor() : at::empty({B, D}, options_for<T>());
    const at::Tensor Xb = rows_in_compute_dtype<X, T>(x, xbuf, 0, B).contiguous();
    const T* xb = Xb.data_ptr<T>();
    std::vector<double> xd(f32_dots ? 0 : B * D);  // x in double for the double dots
    std::vector<RowConst> rcs(B);
    std::vector<double> x_sq(B);
    for (int64_t i = 0; i < B; ++i) {
      if (!f32_dots)
        for (int64_t d = 0; d < D; ++d) xd[i * D + d] = static_cast<double>(xb[i * D + d]);
      rcs[i] = row_const(i, xb + i * D);
      x_sq[i] = rcs[i].x_sq;
    }
    // Error bounds of the logits, with the largest |mu| of the chunk. Double dots and |mu|^2
    // (chunk_dots), |x|^2 (sum_squares): (D / 8 + 11) u per term of (|x| + |mu|)^2 (D / 8 lane
    // additions, 3 pairwise, up to 7 of the tail, one product rounding for double operands),
    // halved and over residual_var + s^2 (1 % for the rounding of the products). Float dots (chunk_dots):
    // (D / 16 + 20) u_float |x| |mu| over residual_var + s^2 (1 % for the double sums); where that
    // exceeds kDeltaLogitTol the rounding is measured on the state's first chunk as on the row
    // blocks' first block (row_pass), and the smaller of bound and estimate decides.
    const auto exact_dot_bound = [&](int64_t i, double chunk_max_mu) {
      const double u = std::numeric_limits<double>::epsilon() / 2, r = std::sqrt(rcs[i].x_sq) + chunk_max_mu;
      return 1.01 * 0.5 * (double(D) / 8 + 11) * u * r * r / (min_residual_var + rcs[i].s2);
    };
    const auto f32_dot_err = [&](const RowState& s, int64_t i, double chunk_max_mu) {
      const double u = std::numeric_limits<float>::epsilon() / 2,
                   scale = std::sqrt(rcs[i].x_sq) * chunk_max_mu / (min_residual_var + rcs[i].s2);
      const double bound = 1.01 * (double(D) / 16 + 20) * u * scale;
      return s.rate > 0 ? std::min(bound, kSafety * s.rate * scale) : bound;
    };
    std::vector<std::vector<RowState>> states(parts, std::vector<RowState>(B));
    std::vector<std::vector<T>> accs(parts, std::vector<T>(need_denoised ? B * D : 0, T(0)));
    std::vector<double> m_block(need_weights ? B * num_chunks : 0);  // m after each chunk
    std::atomic<int64_t> next_part{0};
    at::parallel_for(0, std::min(threads, parts), 1, [&](int64_t, int64_t) {
      std::vector<double> F64(f32_dots ? 0 : B * chunk), L(chunk);  // F: [B, chunk] dot products
      std::vector<float> F32(f32_dots ? B * chunk : 0);
      std::vector<double> part64(f32_dots ? 0 : B * chunk * 8), sq64(f32_dots ? 0 : chunk * 8);  // chunk_dots' partial sums
      std::vector<float> part32(f32_dots ? B * chunk * 16 : 0);
      std::vector<T> P(B * chunk), scale(B);
      std::vector<int32_t> ks(chunk);  // the chunk's points with a significant weight in some row
      with_isa([&] {
        for (int64_t part; (part = next_part++) < parts;) {
          std::vector<RowState>& st = states[part];
          T* acc = need_denoised ? accs[part].data() : nullptr;
          const int64_t c0 = part * num_chunks / parts, c1 = (part + 1) * num_chunks / parts;
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t g0 = c * chunk, gn = std::min(chunk, K - g0);
            const T* mu_c = mu + g0 * D;
            const T* next = mu_c + gn * D;  // the part's next chunk (gn_next points) into L2 meanwhile
            const int64_t gn_next = c + 1 < c1 ? std::min(chunk, K - g0 - gn) : 0;
            // F[i chunk + kk] = x_i . mu_kk, and |mu_kk|^2
            if constexpr (kFloat) {
              if (f32_dots) {
                for (int64_t kk = 0; kk < gn; ++kk) mu_sq[g0 + kk] = sum_squares(mu_c + kk * D, D);
                chunk_dots<Float16, 4, 4, kDotBlock>(xb, B, mu_c, gn, D, F32.data(), chunk, part32.data(), next, gn_next);
              }
            }
            if (!f32_dots) {  // all rows in one tile, the squares with them
              const double* xs = xd.data();
              double* sq = sq64.data();
              double* ms = mu_sq + g0;
              double* F = F64.data();
              double* pt = part64.data();
              switch (B) {
                case 1: chunk_dots<Double8, 1, 8, kDotBlock, true>(xs, B, mu_c, gn, D, F, chunk, pt, next, gn_next, sq, ms); break;
                case 2: chunk_dots<Double8, 2, 4, kDotBlock, true>(xs, B, mu_c, gn, D, F, chunk, pt, next, gn_next, sq, ms); break;
                case 3: chunk_dots<Double8, 3, 4, kDotBlock, true>(xs, B, mu_c, gn, D, F, chunk, pt, next, gn_next, sq, ms); break;
                default: chunk_dots<Double8, 4, 4, kDotBlock, true>(xs, B, mu_c, gn, D, F, chunk, pt, next, gn_next, sq, ms); break;
              }
            }
            double chunk_max_sq = 0;
            for (int64_t kk = 0; kk < gn; ++kk) chunk_max_sq = std::max(chunk_max_sq, mu_sq[g0 + kk]);
            const double chunk_max_mu = std::sqrt(chunk_max_sq);
            int64_t kept = 0;
            for (int64_t i = 0; i < B; ++i) {
              RowState& s = st[i];
              const double m_old = s.m;
              T* Pi = P.data() + i * chunk;
              T* wrow = need_weights ? w_p + i * K + g0 : nullptr;
              if (f32_dots) {
                s.err = f32_dot_err(s, i, chunk_max_mu);
                row_pass(rcs[i], s, xb + i * D, F32.data() + i * chunk, g0, gn, s.rate == 0, chunk_max_mu, L.data(),
                         nullptr, Pi, wrow, kept);
              } else {
                s.err = exact_dot_bound(i, chunk_max_mu);
                row_pass(rcs[i], s, xb + i * D, F64.data() + i * chunk, g0, gn, false, chunk_max_mu, L.data(),
                         nullptr, Pi, wrow, kept);
              }
              scale[i] = static_cast<T>(merge_scale(m_old, s.m));  // acc's rescale (row_pass: l, hx)
              if (need_weights) m_block[i * num_chunks + c] = s.m;
            }
            if (!acc) continue;
            // the back-projection adds the significant weights only (p_min): the others are zeroed
            // here (adding 0 p_k mu_k changes nothing), and points with none are skipped
            int64_t nk = 0;
            bool rescale = false;
            for (int64_t i = 0; i < B; ++i) rescale = rescale || scale[i] != T(1);
            for (int64_t kk = 0; kk < gn; ++kk) {
              bool any = false;
              for (int64_t i = 0; i < B; ++i) {
                T& p = P[i * chunk + kk];
                if (p < p_min) p = T(0);
                else any = true;
              }
              if (any) ks[nk++] = static_cast<int32_t>(kk);
            }
            if (nk == 0 && !rescale) continue;
            // rows in tiles of 4 by 4 vectors (16 accumulators: each point's 4 lines feed 16
            // products; at B 16 this measured below the 8-row, 2-vector tiles: noisy, see the docs)
            for (int64_t i0 = 0; i0 < B; i0 += 4) {
              T* a = acc + i0 * D;
              const T* sc = scale.data() + i0;
              const T* pr = P.data() + i0 * chunk;
              switch (std::min<int64_t>(4, B - i0)) {
                case 1: backproject_tile<1, 4>(a, D, sc, pr, chunk, ks.data(), nk, mu_c); break;
                case 2: backproject_tile<2, 4>(a, D, sc, pr, chunk, ks.data(), nk, mu_c); break;
                case 3: backproject_tile<3, 4>(a, D, sc, pr, chunk, ks.data(), nk, mu_c); break;
                default: backproject_tile<4, 4>(a, D, sc, pr, chunk, ks.data(), nk, mu_c); break;
              }
            }
          }
        }
      });
    });
    // merge the parts' states into part 0's (merge_scale: exact up to one rounding per part)
    std::vector<double> m(B), l(B), hx(B);
    T* acc0 = need_denoised ? accs[0].data() : nullptr;
    for (int64_t i = 0; i < B; ++i) {
      double mi = -std::numeric_limits<double>::infinity();
      for (int64_t part = 0; part < parts; ++part) mi = std::max(mi, states[part][i].m);
      m[i] = mi;
      for (int64_t part = 0; part < parts; ++part) {
        const double s = merge_scale(states[part][i].m, mi);
        l[i] += states[part][i].l * s;
        hx[i] += states[part][i].hx * s;
        if (!acc0) continue;
        const T scale = static_cast<T>(s);
        T* a0 = acc0 + i * D;
        if (part == 0) {
          if (scale != T(1))
            for (int64_t d = 0; d < D; ++d) a0[d] *= scale;
        } else {
          const T* a = accs[part].data() + i * D;
          for (int64_t d = 0; d < D; ++d) a0[d] += scale * a[d];
        }
      }
    }
    finish_rows<X, T>(0, B, D, K, chunk, num_chunks, m.data(), l.data(), hx.data(), x_sq.data(),
                      need_weights ? m_block.data() : nullptr, acc0, xb, logp_p, den_p, w_p);
    return;
  }

  if (!mu_sq_given)
    at::parallel_for(0, K, 64, [&](int64_t k0, int64_t k1) {
      with_isa([&] {
        for (int64_t k = k0; k < k1; ++k) mu_sq[k] = sum_squares(mu + k * D, D);
      });
    });
  for (int64_t k = 0; k < K; ++k) max_mu = std::max(max_mu, mu_sq[k]);
  max_mu = std::sqrt(max_mu);

  // Row blocks of up to kTallRows rows (balanced). Each streams every point through the GEMMs,
  // and a GEMM is faster the more rows share each streamed point (measured: one threaded
  // 256-row GEMM ran ~14 % faster than two single-threaded 128-row ones on 2 cores). So while
  // there are fewer blocks than threads, the blocks run one after another, each with threaded
  // GEMMs and its row passes split over the threads; with enough blocks, one block per thread.
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
    std::vector<RowConst> rcs(n);
    std::vector<RowState> st(n);
    std::vector<double> m(n), l(n), hx(n), x_sq(n);
    std::vector<double> m_block(need_weights ? n * num_sb : 0);  // m after each point block
    std::vector<T> p_cut(n, p_min);  // per row, the back-projection's cut of the point block
    const at::Tensor Xb = rows_in_compute_dtype<X, T>(x, xbuf, b0, n);
    const T* xb = Xb.data_ptr<T>();
    rows([&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        rcs[i] = row_const(b0 + i, xb + i * D);
        st[i].err = gemm_err_bound(rcs[i]);
      }
    });

    for (int64_t g0 = 0; g0 < K; g0 += SB) {  // blocks of points
      const int64_t gn = std::min(SB, K - g0);
      const at::Tensor F = gemm_nt(GemmSite::kDistances, Xb, means.narrow(0, g0, gn));  // [n, gn]: x . mu_k
      const T* Sp = F.data_ptr<T>();
      const int64_t lds = F.stride(0);
      T* Pp = F.data_ptr<T>();  // p of row i, point g0 + k will overwrite Sp[i lds + k]
      std::atomic<int64_t> nonzero_p{0};  // significant weights of the block
      rows([&](int64_t i0, int64_t i1) {
        std::vector<double> Lrow(gn);  // one row's logits over the point block
        int64_t kept = 0;
        for (int64_t i = i0; i < i1; ++i) {
          row_pass(rcs[i], st[i], xb + i * D, Sp + i * lds, g0, gn, g0 == 0, max_mu, Lrow.data(),
                   acc_p ? acc_p + i * D : nullptr, Pp + i * lds, need_weights ? w_p + (b0 + i) * K + g0 : nullptr,
                   kept);
          if (need_weights) m_block[i * num_sb + g0 / SB] = st[i].m;
        }
        nonzero_p += kept;
      });
      if (need_denoised && nonzero_p > 0) {
        // Between sparse and dense (a quarter of the weights above p_min), each row's own cut
        // (tail_cut) may leave few enough for the sparse form.
        if (nonzero_p * 4 < n * gn && nonzero_p * kSparseRatio >= n * gn) {
          std::atomic<int64_t> kept_cut{0};
          rows([&](int64_t i0, int64_t i1) {
            int64_t kept = 0;
            for (int64_t i = i0; i < i1; ++i) p_cut[i] = tail_cut(Pp + i * lds, gn, p_min, significant, kept);
            kept_cut += kept;
          });
          nonzero_p = kept_cut.load();
        } else {
          std::fill(p_cut.begin(), p_cut.end(), p_min);
        }
        if (nonzero_p * kSparseRatio < n * gn) {  // few weights: add the p_k mu_k rows
          rows([&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i)
              for (int64_t k = 0; k < gn; ++k) {
                const T p = Pp[i * lds + k];
                if (p < p_cut[i]) continue;
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

    for (int64_t i = 0; i < n; ++i) {
      m[i] = st[i].m;
      l[i] = st[i].l;
      hx[i] = st[i].hx;
      x_sq[i] = rcs[i].x_sq;
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

// Constant coordinates. Where every point has the same value c_d in coordinate d (the blank
// border of MNIST digits: 121 of 784 pixels), (x_d - c_d)^2 adds the same to every distance and
// moves no weight. With one residual variance v for all components the posterior's coordinate is
// c_d + h (x_d - c_d), h = v / (v + s^2), and each such coordinate adds -(x_d - c_d)^2 / (2 (v + s^2))
// - log(2 pi (v + s^2)) / 2 to the log-density. So the row blocks, compute-bound on two GEMMs of
// 2 B K D FLOPs, run on the varying coordinates only (empirical_impl on gathered copies of x and
// the points) and the constant ones are filled in here.
//
// Taken where the FLOPs saved (4 B K per constant coordinate) outweigh the gather's pass over the
// points (~8 K D bytes read and written) at least twice, at ~8 FLOPs per byte moved (the GEMM rate
// over the stream bandwidth of current CPUs: this AMD EPYC ~190 GFLOP/s / ~25 GB/s on 2 cores):
// constant * B >= kCompactRatio * D (MNIST-5k, 784 -> 672 padded: from B 224). The few-query split reads each point
// once already (memory-bound): a gather would only add a pass, so it never takes this.
// The gathered copy of the points lives for the call: beyond kCompactBytes (a large in-memory
// set) the whole coordinates are used instead of holding a second copy.
constexpr int64_t kCompactRatio = 32;
constexpr int64_t kCompactBytes = int64_t(1) << 30;

// vary[d] = 1 where some point differs from the first in coordinate d (NaN differs); returns how
// many do. Generic data varies everywhere within a few points: the first 64 are looked at alone.
template <typename T>
int64_t varying_coordinates(const T* mu, int64_t K, int64_t D, std::vector<int32_t>& vary) {
  vary.assign(D, 0);
  int64_t k = 1;
  const auto count = [&] { return std::count(vary.begin(), vary.end(), 1); };
  for (; k < std::min<int64_t>(K, 64); ++k)
    for (int64_t d = 0; d < D; ++d) vary[d] |= !(mu[k * D + d] == mu[d]);
  if (count() == D || k >= K) return count();
  std::mutex merge;
  at::parallel_for(k, K, 256, [&](int64_t k0, int64_t k1) {
    std::vector<int32_t> v(vary);
    with_isa([&] {
      for (int64_t kk = k0; kk < k1; ++kk) {
        const T* row = mu + kk * D;
        for (int64_t d = 0; d < D; ++d) v[d] |= !(row[d] == mu[d]);
      }
    });
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t d = 0; d < D; ++d) vary[d] |= v[d];
  });
  return count();
}

// The constant coordinates found for the last few sets of points (a hint: every call checks them
// against every point as it gathers, and looks again where one no longer holds), by address: a
// later call on the same points then reads them once.
struct ConstantCoordinates {
  const void* points;
  int64_t K, D;
  at::ScalarType dtype;
  std::vector<int32_t> vary;
};
struct ConstantCoordinatesHints {
  static constexpr size_t kEntries = 8;
  std::mutex mutex;
  std::vector<ConstantCoordinates> entries;  // the newest last

  bool find(const at::Tensor& means, std::vector<int32_t>& vary) {
    std::lock_guard<std::mutex> lock(mutex);
    for (const auto& e : entries)
      if (e.points == means.data_ptr() && e.K == means.size(0) && e.D == means.size(1) && e.dtype == means.scalar_type()) {
        vary = e.vary;
        return true;
      }
    return false;
  }
  void forget(const void* points) {
    std::lock_guard<std::mutex> lock(mutex);
    entries.erase(std::remove_if(entries.begin(), entries.end(), [&](const auto& e) { return e.points == points; }),
                  entries.end());
  }
  void keep(const at::Tensor& means, const std::vector<int32_t>& vary) {
    forget(means.data_ptr());
    std::lock_guard<std::mutex> lock(mutex);
    if (entries.size() == kEntries) entries.erase(entries.begin());
    entries.push_back({means.data_ptr(), means.size(0), means.size(1), means.scalar_type(), vary});
  }
};
ConstantCoordinatesHints constant_hints;

// The posterior on the varying coordinates only, or false where that does not pay (above).
template <typename X>
bool empirical_without_constant_coordinates(const at::Tensor& x, const at::Tensor& means,
                                            const at::Tensor& residual_var_tensor, const at::Tensor& log_weights,
                                            const at::Tensor& sigma, bool need_denoised, bool need_weights,
                                            at::Tensor& den, at::Tensor& logp, at::Tensor& weights) {
  using T = at::opmath_type<X>;
  const int64_t B = x.size(0), D = x.size(1), K = means.size(0);
  const T* rv = residual_var_tensor.data_ptr<T>();
  const bool few_query = B <= (std::is_same_v<T, float> ? kFewRowsF32 : kFewRows);
  if (few_query || K < 2 || B < kCompactRatio || std::any_of(rv, rv + K, [&](T v) { return !(v == rv[0]); }))
    return false;
  const T* mu = means.data_ptr<T>();
  std::vector<int32_t> vary;
  const bool hinted = constant_hints.find(means, vary);
  const int64_t Dv = hinted ? std::count(vary.begin(), vary.end(), 1) : varying_coordinates(mu, K, D, vary);
  if (!hinted) constant_hints.keep(means, vary);
  // the gathered rows are padded with zeros (which add nothing to any product) to whole 64-byte
  // lines: MKL's GEMMs measured ~10 % slower at 663 columns than at 664 or 672 on this host
  const int64_t line = 64 / sizeof(T), Dp = (Dv + line - 1) / line * line;
  if (Dv == 0 || (D - Dp) * B < kCompactRatio * D || K * Dp * int64_t(sizeof(T)) > kCompactBytes) return false;
  // runs of varying coordinates [start, start + len): the gather copies runs, not elements
  std::vector<std::pair<int64_t, int64_t>> runs;
  std::vector<int64_t> fixed;  // the constant coordinates
  for (int64_t d = 0; d < D; ++d) {
    if (!vary[d]) fixed.push_back(d);
    else if (d > 0 && vary[d - 1]) ++runs.back().second;
    else runs.emplace_back(d, 1);
  }
  // row i of src [rows, D] -> dst [rows, Dp]: the runs, then zeros
  const auto gather_row = [&](const auto* src, auto* dst, int64_t i) {
    using V = std::remove_cv_t<std::remove_pointer_t<decltype(dst)>>;
    V* o = dst + i * Dp;
    for (const auto& [d0, n] : runs) o = std::copy(src + i * D + d0, src + i * D + d0 + n, o);
    std::fill(o, dst + (i + 1) * Dp, V(0));
  };
  at::Tensor xv = at::empty({B, Dp}, x.options()), mv = at::empty({K, Dp}, means.options());
  X* xvp = xv.data_ptr<X>();
  at::parallel_for(0, B, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) gather_row(x.data_ptr<X>(), xvp, i);
  });
  // the points, with each one's |mu|^2 and the check that it has the first point's value in every
  // constant coordinate (the hint's, or found above)
  T* mvp = mv.data_ptr<T>();
  std::vector<double> mu_sq(K);
  std::atomic<bool> held{true};
  at::parallel_for(0, K, 64, [&](int64_t k0, int64_t k1) {
    with_isa([&] {
      bool same = true;
      for (int64_t k = k0; k < k1; ++k) {
        gather_row(mu, mvp, k);
        for (const int64_t d : fixed) same = same && mu[k * D + d] == mu[d];
        mu_sq[k] = sum_squares(mvp + k * Dp, Dp);
      }
      if (!same) held = false;
    });
  });
  if (!held) {  // a hinted constant coordinate no longer is: look again (once); if this call's own
                // look was wrong, the points changed during the call: all coordinates then
    constant_hints.forget(mu);
    return hinted && empirical_without_constant_coordinates<X>(x, means, residual_var_tensor, log_weights, sigma,
                                                               need_denoised, need_weights, den, logp, weights);
  }
  at::Tensor den_v = need_denoised ? at::empty({B, Dp}, den.options()) : den;
  empirical_impl<X>(xv, mv, residual_var_tensor, log_weights, sigma, need_denoised, need_weights, den_v, logp, weights,
                    std::move(mu_sq));

  const X* xp = x.data_ptr<X>();
  const T* sig = sigma.data_ptr<T>();
  T* logp_p = logp.data_ptr<T>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const double s = sig[b], v = static_cast<double>(rv[0]) + s * s, h = static_cast<double>(rv[0]) / v;
      double off = 0;  // sum over the constant coordinates of (x_d - c_d)^2
      for (const int64_t d : fixed) {
        const double diff = static_cast<double>(xp[b * D + d]) - static_cast<double>(mu[d]);
        off += diff * diff;
      }
      // x NaN (or infinite in a constant coordinate): the row's outputs are NaN, as on every path
      if (!std::isfinite(off) || std::isnan(logp_p[b])) {
        logp_p[b] = std::numeric_limits<T>::quiet_NaN();
        if (need_denoised) std::fill(den.data_ptr<X>() + b * D, den.data_ptr<X>() + (b + 1) * D, static_cast<X>(NAN));
        if (need_weights) std::fill(weights.data_ptr<T>() + b * K, weights.data_ptr<T>() + (b + 1) * K, T(NAN));
        continue;
      }
      logp_p[b] = static_cast<T>(static_cast<double>(logp_p[b]) - 0.5 * off / v + isotropic_log_norm<double>(v, D - Dp));
      if (!need_denoised) continue;
      const X* dv = den_v.data_ptr<X>() + b * Dp;
      X* o = den.data_ptr<X>() + b * D;
      for (const auto& [d0, n] : runs) {
        std::copy(dv, dv + n, o + d0);
        dv += n;
      }
      for (const int64_t d : fixed) {
        const double c = static_cast<double>(mu[d]);
        o[d] = static_cast<X>(h == 0 ? c : c + h * (static_cast<double>(xp[b * D + d]) - c));
      }
    }
  });
  return true;
}

}  // namespace

void empirical_posterior_cpu(const at::Tensor& x, const at::Tensor& means,
                             const at::Tensor& residual_var, const at::Tensor& log_weights,
                             const at::Tensor& sigma, bool need_denoised, bool need_weights,
                             at::Tensor& den, at::Tensor& logp, at::Tensor& weights) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "empirical_posterior", [&] {
    if (!empirical_without_constant_coordinates<scalar_t>(x, means, residual_var, log_weights, sigma, need_denoised,
                                                          need_weights, den, logp, weights))
      empirical_impl<scalar_t>(x, means, residual_var, log_weights, sigma, need_denoised, need_weights,
                               den, logp, weights);
  });
}

}  // namespace gsa::cpu
