// The GEMMs of the CPU kernels, each run by the engine that is fastest on this host for its shape
// class (gemm.cpp). Engines: "onednn" (torch's mkldnn::_linear_pointwise, float32 only) and
// "blas" (at::mm: torch's BLAS, MKL in the x86-64 wheels). Which one wins depends on the CPU:
// oneDNN's sgemm ran ~2x faster than MKL's on an AMD AVX-512 host, MKL's faster on an Intel
// AVX2 one; so each class is timed on first use, and GSA_KERNELS_GEMM=onednn|blas forces one.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <string>

namespace gsa::cpu {

// The shape classes. [m, k] @ w^T with w [n, k]:
enum class GemmSite : int {
  kProject,          // gaussian: x or y [rows, D] against U^T [r, D] -> coefficients [rows, r]
  kExpand,           // gaussian: coefficients [rows, r] against U [D, r] -> [rows, D]
  kMixtureForward,   // mixture: x [rows, D] against a component panel [nk (r + 1), D]
  kMixtureBackward,  // mixture: [P | G] [rows, nk (r + 1)] against a panel [D, nk (r + 1)]
  kDistances,        // empirical mixture: x [rows, D] against a block of points [n, D] -> x . mu
};

// a [m, k] @ w^T for w [n, k] -> [m, n] (a new tensor), in a's dtype. Rows of a and w should be
// contiguous (oneDNN is only fast then; the other engines accept any strides).
at::Tensor gemm_nt(GemmSite site, const at::Tensor& a, const at::Tensor& w);

// floor(log2 v) (-1 for v <= 0): the size classes of the measured choices (gemm.cpp, layouts.cpp)
inline int floor_log2(int64_t v) { return v > 0 ? 63 - __builtin_clzll(static_cast<uint64_t>(v)) : -1; }

// The best time per row of a (ms) of a @ w^T over the engines gemm_nt could use for it, measured
// now on all rows of a (the caller picks how many: a GEMM's cost per row falls with its rows):
// for cost models that weigh a GEMM against other work.
double gemm_best_ms_per_row(const at::Tensor& a, const at::Tensor& w);

// A cost measured once per process and key (seconds of some unit of work, for the cost models
// that choose between a sparse and a dense form of the same work): measure() runs on the key's
// first use, outside any lock; concurrent first uses may both measure, the first to finish wins.
double measured_cost(const std::string& key, const std::function<double()>& measure);

// GSA_KERNELS_DENSE=auto (unset) | dense | sparse: forces the low-rank mixture kernel's sparse or
// dense forms (its refinement, chosen by measured_cost rates; its back-projection, chosen per row
// by the share of nonzero weights in auto), so tests reach both sides on any host. Read on every
// call.
enum class DenseChoice : int { kAuto, kDense, kSparse };
DenseChoice dense_choice();

// C [mp, np] = A B^T in float64 for float32 operands, by an AVX-512 kernel (float64 GEMMs of
// torch's BLAS ran at a quarter of oneDNN's float32 rate on an AMD host): the float64 refinement
// of the mixture kernel, whose operands are float32 (every product exact in double). A and B
// come packed (pack_f64_rows, pack_f64_tiles): mp and np are multiples of kF64Rows and
// kF64Cols, padded with zeros. Single-threaded (callers run it inside their row blocks).
// native_f64_gemm(): whether it runs here (AVX-512 active and GSA_KERNELS_GEMM not blas).
constexpr int64_t kF64Rows = 12, kF64Cols = 16;
bool native_f64_gemm();
inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
// rows rows[j] of x [*, k] (float) -> A [mp / kF64Rows][k][kF64Rows] (double), mp = round_up(rows, kF64Rows)
void pack_f64_rows(const float* x, int64_t k, const int64_t* rows, int64_t m, double* out);
// w [n, k] float rows (or, transposed, wt [k, ldt] with w[j][d] = wt[d * ldt + j]) -> B tiles
// [np / kF64Cols][k][kF64Cols] (double), np = round_up(n, kF64Cols)
void pack_f64_tiles(const float* w, const float* wt, int64_t ldt, int64_t n, int64_t k, double* out);
void gemm_f64_packed(const double* a, const double* b, int64_t mp, int64_t np, int64_t k, double* c);

// The engine chosen for each shape class met so far, with the timings behind it, as JSON.
std::string gemm_choices_json();

}  // namespace gsa::cpu
