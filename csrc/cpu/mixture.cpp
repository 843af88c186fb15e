// CPU kernel of the mixture posterior (docs/architecture.md): component weights, log p and the
// posterior-mean denoiser of a K-component low-rank Gaussian mixture, r > 0 (isotropic components,
// r = 0, and with them the empirical "delta" mixture of a training set: empirical.cpp).
//
// Parallel over row blocks; inside a row block the components stream in blocks with an online
// softmax (running max m, sum l, and the unnormalised denoiser accumulator), so memory is
// [rows, D] + [rows, K (r + 1)] (the forward GEMM's results, ~K r / D times the rows) + [rows, K]
// logits, never B x K x D (nor B x K unless the weights are returned). Per row block, with each component block k0 .. k0 + nk - 1 in
// one cached panel (forward_panels, backward_panels in mixture_blocks.h), two passes:
// pass 1, per component block:
//   F = X [M; Ut]^T    x . mu_k and U_k^T x for every component of the block   (one GEMM, kept)
//                      fast squared distances |x - mu_k|^2 = |x|^2 + |mu_k|^2 - 2 x . mu_k,
//                      projections c_k = U_k^T x - U_k^T mu_k
//   logits             component_logpdf (include/gsa/spectral.h) + log weight; the row's max
// pass 2, per component block:
//   refinement         the expansion loses ~eps sqrt(D) |x| |mu| of |x - mu|^2, and the GEMM's
//                      c_k ~eps sqrt(D) |x| per coefficient, which is huge next to sigma^2 at
//                      small sigma. When that error bound E (in logit units) exceeds kLogitTol,
//                      every component whose fast logit is within 2 E + kCutoff of the row's max
//                      over all K is recomputed in double from y = x - mu_k: |y|^2 (r = 0), or c_k =
//                      U_k^T y and the residual |y - U_k c_k|^2 summed directly (r > 0; the
//                      expansion |y|^2 - |c_k|^2 cancels when y lies near span(U_k)). Skipped
//                      components have weight < exp(-kCutoff) relative to the max, both
//                      exactly and as computed. Rows with many such components (dense
//                      posteriors) instead get all the block's logits from one float64 GEMM
//                      (dense_refinement; the native AVX-512 one of gemm.h where it runs and
//                      measures faster than torch's), by measured costs.
//   exact distances    (pass 0 decides, float32 compute) rows whose error lies in x . mu_k take it
//                      from a float64 GEMM (exact_mean_dots) and bound the float32 c per component
//                      (the bound falls as 1 / s^4); over kLogitTol they recompute c exactly for the
//                      components carrying p_k e_k (exact_coefficients): no float64 GEMM of the
//                      whole panel for a dense posterior at large sigma.
//   accumulate         acc = acc * rescale + [P | G] [M | U]^T with P_k = p_k (1 - h_perp),
//                      G_k = p_k g c_k  (one GEMM; GSA_KERNELS_DENSE=sparse: an axpy per nonzero
//                      entry instead)
#include <torch/library.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "empirical.h"
#include "exact_sums.h"
#include "gemm.h"
#include "gsa/checks.h"
#include "gsa/spectral.h"
#include "mixture_blocks.h"

namespace gsa::cpu {
namespace {

// Exact (double) terms of component_logpdf for a low-rank component: y = x - mu, c = U^T y
// (returned in c, U: [D, r] row-major), and the residual |y - U c|^2 summed directly (0 when
// r == D). y, c: scratch of D and r doubles.
template <typename T>
double lowrank_terms_exact(const T* x, const T* mu, const T* U, const T* lam, double s2, int64_t D,
                           int64_t r, double* y, double* c, double& cc_w) {
  for (int64_t d = 0; d < D; ++d) y[d] = static_cast<double>(x[d]) - static_cast<double>(mu[d]);
  std::fill(c, c + r, 0.0);
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = 0; j < r; ++j) c[j] += static_cast<double>(U[d * r + j]) * y[d];
  cc_w = 0;
  for (int64_t j = 0; j < r; ++j) cc_w += c[j] * c[j] / (static_cast<double>(lam[j]) + s2);
  if (r == D) return 0.0;
  // e_d = y_d - U_d . c: the dot over 8 fixed lanes (a serial chain of r subtractions per d was
  // latency-bound: most of the refinement's time at moderate sigma)
  const int64_t r8 = r - r % 8;
  double residual = 0;
  for (int64_t d = 0; d < D; ++d) {
    const T* Ud = U + d * r;
    Double8 dot = {};
    for (int64_t j = 0; j < r8; j += 8) {
      Double8 u, cj;
      load8(Ud + j, u);
      std::memcpy(&cj, c + j, sizeof cj);
      dot += u * cj;
    }
    double e = y[d] - (((dot[0] + dot[1]) + (dot[2] + dot[3])) + ((dot[4] + dot[5]) + (dot[6] + dot[7])));
    for (int64_t j = r8; j < r; ++j) e -= static_cast<double>(Ud[j]) * c[j];
    residual += e * e;
  }
  return residual;
}

// sum_j a_j b_j over 8 fixed lanes, then the tail
inline double dot_lanes(const double* a, const double* b, int64_t n) {
  const int64_t n8 = n - n % 8;
  Double8 acc = {};
  for (int64_t j = 0; j < n8; j += 8) {
    Double8 u, v;
    std::memcpy(&u, a + j, sizeof u);
    std::memcpy(&v, b + j, sizeof v);
    acc += u * v;
  }
  double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (int64_t j = n8; j < n; ++j) s += a[j] * b[j];
  return s;
}

// c = U^T x - U^T mu in double (U [D, r] row-major, umu = U^T mu in double): the exact-distance
// route's refinement of one component (its x . mu_k is exact already, and c^T (U^T U - I) c comes
// from the Gram matrix: D r multiply-adds, half of lowrank_terms_exact's, and vectorised over r)
template <typename T>
void exact_coefficients(const T* x, const T* U, const double* umu, int64_t D, int64_t r, double* c) {
  std::fill(c, c + r, 0.0);
  for (int64_t d = 0; d < D; ++d) {
    const double xd = x[d];
    const T* Ud = U + d * r;
    for (int64_t j = 0; j < r; ++j) c[j] += static_cast<double>(Ud[j]) * xd;
  }
  for (int64_t j = 0; j < r; ++j) c[j] -= umu[j];
}

// Dense refinement: where a row has many components within reach of its max, recomputing each
// one's logit from the differences (lowrank_terms_exact, O(D r) per component, scalar-bound) costs
// more than one float64 GEMM of the row against the block's forward panel. Its expanded logits
// err by the float32 bound scaled by eps64 / eps32 (~1e-10 logits where float32 errs by 0.02), and
// the one term the expansion drops, c^T (U^T U - I) c (a rounded basis is not exactly
// orthonormal), is added from U^T U computed in double. Which rows take it: measured costs
// (refine_costs), never a constant tuned to one host.
constexpr double kEps64Ratio = 0x1p-29;          // eps(double) / eps(float)
constexpr int64_t kMaxGramEntries = 1 << 24;    // U_k^T U_k for every k: at most 128 MiB
constexpr int64_t kCostRows = 64;               // rows of the GEMMs timed for the cost models
// The exact-distance route refines by weight (p_k e_k) while its largest logit error is at most
// this (the fast weights then good to exp(2 e) ~ 1.2x), else by reach, as the other rows
constexpr double kWeightedErrMax = 0.1;

// per component, in double: U_k^T mu_k [K, r], U_k^T U_k - I [K, r, r] and its Frobenius norm
// [K] (which bounds what a coefficient error moves c^T (U^T U - I) c by)
struct ExactTerms {
  std::vector<double> umu, gram, gram_norm;
};

inline ExactTerms with_gram_norms(ExactTerms e, int64_t K, int64_t r) {
  e.gram_norm.assign(K, 0.0);
  for (int64_t k = 0; k < K; ++k) {
    double s = 0;
    for (int64_t a = 0; a < r * r; ++a) s += e.gram[k * r * r + a] * e.gram[k * r * r + a];
    e.gram_norm[k] = std::sqrt(s);
  }
  return e;
}

template <typename T>
ExactTerms lowrank_exact_terms(const T* mu, const T* basis, int64_t K, int64_t D, int64_t r) {
  ExactTerms e;
  e.umu.assign(K * r, 0.0);
  e.gram.assign(K * r * r, 0.0);
  if constexpr (std::is_same_v<T, float>) {
    if (native_f64_gemm()) {  // [U_k^T; mu_k^T] U_k by the native float64 GEMM, per component
      at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
        const int64_t mp = round_up(r + 1, kF64Rows), np = round_up(r, kF64Cols);
        std::vector<double> a(mp * D), b(np * D), c(mp * np);
        for (int64_t k = k0; k < k1; ++k) {
          const T* U = basis + k * D * r;
          const T* m = mu + k * D;
          for (int64_t t = 0; t < mp / kF64Rows; ++t)
            for (int64_t d = 0; d < D; ++d)
              for (int64_t i = 0; i < kF64Rows; ++i) {
                const int64_t row = t * kF64Rows + i;
                a[(t * D + d) * kF64Rows + i] = row < r ? U[d * r + row] : row == r ? m[d] : 0.0;
              }
          pack_f64_tiles(nullptr, U, r, r, D, b.data());
          gemm_f64_packed(a.data(), b.data(), mp, np, D, c.data());
          for (int64_t i = 0; i < r; ++i) {
            for (int64_t j = 0; j < r; ++j) e.gram[(k * r + i) * r + j] = c[i * np + j] - (i == j ? 1.0 : 0.0);
            e.umu[k * r + i] = c[r * np + i];
          }
        }
      });
      return e;
    }
  }
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    with_isa([&] {
      std::vector<double> u(r);
      for (int64_t k = k0; k < k1; ++k) {
        const T* U = basis + k * D * r;
        const T* m = mu + k * D;
        double* um = e.umu.data() + k * r;
        double* g = e.gram.data() + k * r * r;
        for (int64_t d = 0; d < D; ++d) {
          for (int64_t j = 0; j < r; ++j) u[j] = static_cast<double>(U[d * r + j]);
          const double md = m[d];
          for (int64_t a = 0; a < r; ++a) {
            const double ua = u[a];
            um[a] += ua * md;
            double* ga = g + a * r;
            for (int64_t b = 0; b < r; ++b) ga[b] += ua * u[b];
          }
        }
        for (int64_t a = 0; a < r; ++a) g[a * r + a] -= 1.0;
      }
    });
  });
  return e;
}

// A model's exact terms, kept while the forward panel they were computed with lives unchanged (the
// model's layout cache, gsa_kernels/_core/_layouts.py, builds the panels once per model content and
// never writes them; a panel built per call dies with the call): a sampler's every step after the
// first skips them (D r (r + 1) multiply-adds in double per component).
std::shared_ptr<const ExactTerms> cached_exact_terms(const at::Tensor& fwd, const std::function<ExactTerms()>& make) {
  struct Entry {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    int64_t version;
    std::shared_ptr<const ExactTerms> terms;
  };
  constexpr size_t kEntries = 8;
  static std::mutex lock;
  static std::vector<Entry> entries;
  const c10::StorageImpl* impl = fwd.storage().unsafeGetStorageImpl();
  const int64_t version = fwd._version();
  {
    std::lock_guard<std::mutex> guard(lock);
    std::erase_if(entries, [](const Entry& e) { return e.storage.expired(); });
    for (const Entry& e : entries)
      if (e.version == version && e.storage.lock().get() == impl) return e.terms;
  }
  auto terms = std::make_shared<const ExactTerms>(make());
  std::lock_guard<std::mutex> guard(lock);
  if (entries.size() >= kEntries) entries.erase(entries.begin());
  entries.push_back({fwd.storage().getWeakStorageImpl(), version, terms});
  return terms;
}

// seconds: one component's lowrank_terms_exact, one row of the float64 forward GEMM against a
// block's panel, and the panel's conversion to double; measured once per shape and context, for
// torch's GEMM and (where it runs) the native one (gemm.h): native says which is cheaper
struct RefineCosts {
  double exact, row64, convert;
  bool native = false;
};

template <typename T>
RefineCosts refine_costs(const T* xb, const T* mu, const T* basis, const T* lam, int64_t K, int64_t D, int64_t r,
                         const at::Tensor& fwd_panel) {
  const int64_t nw = fwd_panel.size(0);
  const std::string key = std::to_string(D) + "/" + std::to_string(r) + "/" + std::to_string(floor_log2(nw)) +
                          (at::in_parallel_region() ? "/inner" : "/outer");
  using clock = std::chrono::steady_clock;
  const auto best_of = [](int runs, const auto& f) {
    double best = std::numeric_limits<double>::infinity();
    for (int i = 0; i < runs; ++i) {
      const auto t0 = clock::now();
      f();
      best = std::min(best, std::chrono::duration<double>(clock::now() - t0).count());
    }
    return best;
  };
  RefineCosts c;
  c.exact = measured_cost("mixture_exact_component/" + key, [&] {
    const int64_t n = std::min<int64_t>(K, 4);
    std::vector<double> y(D), cv(r);
    volatile double sink = 0;
    return best_of(3, [&] {
             with_isa([&] {
               for (int64_t k = 0; k < n; ++k) {
                 double cc_w;
                 sink = sink + lowrank_terms_exact(xb, mu + k * D, basis + k * D * r, lam + k * r, 1.0, D, r, y.data(),
                                                   cv.data(), cc_w);
               }
             });
           }) / static_cast<double>(n);
  });
  c.row64 = measured_cost("mixture_dense_row/" + key, [&] {
    const auto opts = options_for<double>();
    return gemm_best_ms_per_row(at::ones({kCostRows, D}, opts), at::ones({nw, D}, opts)) * 1e-3;
  });
  c.convert = measured_cost("mixture_panel_to_double/" + key,
                            [&] { return best_of(2, [&] { (void)fwd_panel.to(at::kDouble); }); });
  if (std::is_same_v<T, float> && native_f64_gemm()) {
    // (the operands only where a cost is measured: this runs per block, and b is the panel's size)
    const int64_t mp = round_up(kCostRows, kF64Rows), np = round_up(nw, kF64Cols);
    const double row = measured_cost("mixture_dense_row_native/" + key, [&] {
      std::vector<double> a(mp * D, 1.0), b(np * D, 1.0), out(mp * np);
      return best_of(2, [&] { gemm_f64_packed(a.data(), b.data(), mp, np, D, out.data()); }) / static_cast<double>(mp);
    });
    const double pack = measured_cost("mixture_panel_pack/" + key, [&] {
      std::vector<double> b(np * D);
      return best_of(2, [&] { pack_f64_tiles(fwd_panel.data_ptr<float>(), nullptr, 0, nw, D, b.data()); });
    });
    if (row * kCostRows + pack < c.row64 * kCostRows + c.convert) c.row64 = row, c.convert = pack, c.native = true;
  }
  return c;
}

// The float64 route's one-time cost per call, lowrank_exact_terms ((r + 1) r D multiply-adds per
// component), in units of the measured float64 GEMM row (D x panel_rows multiply-adds): a small
// model with one row to refine is cheaper refined per component.
inline double exact_terms_cost(const RefineCosts& c, int64_t K, int64_t D, int64_t r, int64_t panel_rows) {
  (void)D;
  return double(K) * double(r + 1) * double(r) / double(std::max<int64_t>(1, panel_rows)) * c.row64;
}

// a += f v over n elements
template <typename T>
inline void axpy(T* __restrict a, T f, const T* __restrict v, int64_t n) {
  for (int64_t d = 0; d < n; ++d) a[d] += f * v[d];
}

// A row block's scratch of dense_refinement: the block's forward panel in double (torch's GEMM),
// or the packed operands and result of the native float64 GEMM (gemm.h)
struct Float64Scratch {
  at::Tensor panel64;
  std::vector<double> a, b, c;
};

// Logits (into logit + i ld_logit) and coefficients c (into Cp + i ldc) of components k0 .. k0 + nk - 1
// for the given rows of the block, from one float64 GEMM of those rows against the block's panel
// (bwd_panel: the same panel transposed, when the caller has it: packs faster).
template <typename T>
void dense_refinement(const T* xb, int64_t D, int64_t r, int64_t k0, int64_t nk, const std::vector<int64_t>& rows,
                      const at::Tensor& fwd_panel, const at::Tensor& bwd_panel, Float64Scratch& scratch,
                      const ExactTerms& ex, const double* x_sq, const double* s2v, const double* mu_sq, const T* lam,
                      const T* residual_var, const T* logw, double* logit, int64_t ld_logit, T* Cp, int64_t ldc,
                      bool native) {
  const int64_t nd = static_cast<int64_t>(rows.size());
  at::Tensor F64;
  const double* f = nullptr;
  int64_t ldf = 0;
  native = native && std::is_same_v<T, float> && native_f64_gemm();
  if constexpr (std::is_same_v<T, float>) {
    if (native) {
      const int64_t nw = fwd_panel.size(0), mp = round_up(nd, kF64Rows), np = round_up(nw, kF64Cols);
      scratch.a.resize(mp * D), scratch.b.resize(np * D), scratch.c.resize(mp * np);
      pack_f64_rows(xb, D, rows.data(), nd, scratch.a.data());
      if (bwd_panel.defined())
        pack_f64_tiles(nullptr, bwd_panel.data_ptr<float>(), nw, nw, D, scratch.b.data());
      else
        pack_f64_tiles(fwd_panel.data_ptr<float>(), nullptr, 0, nw, D, scratch.b.data());
      gemm_f64_packed(scratch.a.data(), scratch.b.data(), mp, np, D, scratch.c.data());
      f = scratch.c.data(), ldf = np;
    }
  }
  if (!native) {
    at::Tensor& panel64 = scratch.panel64;
    if (!panel64.defined() || panel64.numel() < fwd_panel.numel()) panel64 = at::empty({fwd_panel.numel()}, options_for<double>());
    const at::Tensor P64 = panel64.narrow(0, 0, fwd_panel.numel()).view(fwd_panel.sizes()).copy_(fwd_panel);
    at::Tensor X64 = at::empty({nd, D}, options_for<double>());
    double* xp = X64.data_ptr<double>();
    for (int64_t j = 0; j < nd; ++j) convert_row(xp + j * D, xb + rows[j] * D, D);
    F64 = gemm_nt(GemmSite::kMixtureForward, X64, P64);  // [nd, nk (r + 1)]
    f = F64.data_ptr<double>(), ldf = F64.stride(0);
  }
  with_isa([&] {
    std::vector<double> c(r);
    for (int64_t j = 0; j < nd; ++j) {
      const int64_t i = rows[j];
      const double s2 = s2v[i];
      const double* fj = f + j * ldf;
      double* L = logit + i * ld_logit;
      for (int64_t k = 0; k < nk; ++k) {
        const int64_t kk = k0 + k;
        const double* um = ex.umu.data() + kk * r;
        const double* g = ex.gram.data() + kk * r * r;
        const T* lk = lam + kk * r;
        double cc = 0, cc_w = 0;
        for (int64_t a = 0; a < r; ++a) {
          c[a] = fj[nk + k * r + a] - um[a];
          cc += c[a] * c[a];
          cc_w += c[a] * c[a] / (static_cast<double>(lk[a]) + s2);
        }
        double corr = 0;  // c^T (U^T U - I) c, each row's dot over 8 lanes (not one serial chain)
        for (int64_t a = 0; a < r; ++a) corr += c[a] * dot_lanes(g + a * r, c.data(), r);
        const double residual = std::max(0.0, x_sq[i] + mu_sq[kk] - 2.0 * fj[k] - cc + corr);
        L[k] = logw[kk] + component_logpdf_residual<double>(residual, cc_w, log_det_low(lk, r, s2), residual_var[kk], s2, D, r);
        T* ci = Cp + i * ldc + k * r;
        for (int64_t a = 0; a < r; ++a) ci[a] = static_cast<T>(c[a]);
      }
    }
  });
}

// x_i . mu_k in float64 for the n rows of a row block and every component, into out [n, K]: the
// exact-distance route's (below) and pass 0's. 1 / (r + 1) of the forward GEMM's work; by the
// native float64 GEMM where it runs (gemm.h), else torch's.
void exact_mean_dots(const float* xb, int64_t n, int64_t D, const float* mu, int64_t K, Float64Scratch& s,
                     double* out) {
  constexpr int64_t kCols = 8 * kF64Cols;  // components per packed block
  if (native_f64_gemm()) {
    const int64_t mp = round_up(n, kF64Rows);
    std::vector<int64_t> rows(n);
    for (int64_t i = 0; i < n; ++i) rows[i] = i;
    s.a.resize(mp * D);
    pack_f64_rows(xb, D, rows.data(), n, s.a.data());
    for (int64_t k0 = 0; k0 < K; k0 += kCols) {
      const int64_t nk = std::min(kCols, K - k0), np = round_up(nk, kF64Cols);
      s.b.resize(np * D), s.c.resize(mp * np);
      pack_f64_tiles(mu + k0 * D, nullptr, 0, nk, D, s.b.data());
      gemm_f64_packed(s.a.data(), s.b.data(), mp, np, D, s.c.data());
      for (int64_t i = 0; i < n; ++i) std::memcpy(out + i * K + k0, s.c.data() + i * np, nk * sizeof(double));
    }
    return;
  }
  const auto f32 = options_for<float>();
  const at::Tensor X64 = at::from_blob(const_cast<float*>(xb), {n, D}, f32).to(at::kDouble);
  const at::Tensor M64 = at::from_blob(const_cast<float*>(mu), {K, D}, f32).to(at::kDouble);
  const at::Tensor G = gemm_nt(GemmSite::kMixtureForward, X64, M64);
  for (int64_t i = 0; i < n; ++i) std::memcpy(out + i * K, G.data_ptr<double>() + i * G.stride(0), K * sizeof(double));
}

// (forward, backward) panels of means [K, D] and bases [K, D, r], r > 0, in their dtype.
std::tuple<at::Tensor, at::Tensor> mixture_panels(const at::Tensor& means, const at::Tensor& bases) {
  const char* op = "gsa_kernels::mixture_panels (cpu)";
  TORCH_CHECK_VALUE(means.dim() == 2 && bases.dim() == 3 && bases.size(0) == means.size(0) &&
                        bases.size(1) == means.size(1) && bases.size(2) > 0,
                    op, ": means must be [K, D] and bases [K, D, r] with r > 0, got ", means.sizes(),
                    " and ", bases.sizes());
  TORCH_CHECK_TYPE((means.scalar_type() == at::kFloat || means.scalar_type() == at::kDouble) &&
                       bases.scalar_type() == means.scalar_type(),
                   op, ": means and bases must both be float32 or both float64");
  TORCH_CHECK_VALUE(means.device().is_cpu() && bases.device().is_cpu() && means.is_contiguous() &&
                        bases.is_contiguous(),
                    op, ": means and bases must be contiguous CPU tensors");
  const int64_t K = means.size(0), D = means.size(1), r = bases.size(2), KB = component_block(K, r);
  return AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "mixture_panels", [&] {
    at::Tensor fwd = forward_panels<scalar_t>(means, bases, KB);
    at::Tensor bwd = backward_panels<scalar_t>(fwd, K, D, r + 1, KB);
    return std::make_tuple(fwd, bwd);
  });
}

template <typename X>
void mixture_impl(const at::Tensor& x, const at::Tensor& means, const at::Tensor& bases,
                  const at::Tensor& eigvals, const at::Tensor& residual_var_t,
                  const at::Tensor& log_weights, const at::Tensor& sigma, bool need_denoised,
                  bool need_weights, const at::Tensor& fwd, const at::Tensor& bwd,
                  at::Tensor& den, at::Tensor& logp, at::Tensor& weights) {
  using T = at::opmath_type<X>;
  const int64_t B = x.size(0), D = x.size(1), K = means.size(0), r = bases.size(2);
  const T* mu = means.data_ptr<T>();
  const T* basis = bases.data_ptr<T>();
  const T* lam = eigvals.data_ptr<T>();
  const T* residual_var = residual_var_t.data_ptr<T>();
  const T* logw = log_weights.data_ptr<T>();
  const T* sig = sigma.data_ptr<T>();
  T* logp_p = logp.data_ptr<T>();
  T* w_p = need_weights ? weights.data_ptr<T>() : nullptr;
  X* den_p = need_denoised ? den.data_ptr<X>() : nullptr;

  // equal_residual_var: h_perp is one number per row
  const auto [mu_sq, max_mu_sq, min_residual_var, equal_residual_var] = component_norms(mu, residual_var, K, D);
  // the smallest variance any logit term is divided by (less s^2): residual_var or an eigval
  double min_var = min_residual_var;
  for (int64_t e = 0; e < K * r; ++e) min_var = std::min(min_var, static_cast<double>(lam[e]));
  // Component blocks of KB (component_block), W = r + 1 panel rows per component; U_k^T mu_k
  // per call (one more row's worth of the forward GEMM).
  const int64_t KB = component_block(K, r);
  const int64_t num_kb = (K + KB - 1) / KB;
  const int64_t W = r + 1;
  const at::Tensor Umu = at::bmm(means.unsqueeze(1), bases).view({K, r});
  const T* umu = Umu.data_ptr<T>();
  // The fast |x - mu|^2 only enters through (|y|^2 - |c|^2) / (residual_var + s^2); not at all when r = D.
  const bool sq_matters = r < D;
  const double eps = std::numeric_limits<T>::epsilon();
  const double logit_tol = std::is_same_v<T, double> ? kLogitTol64 : kLogitTol;

  const int64_t BB = tall_row_block(B);  // each block streams every component panel twice
  // float64 dense refinement (float32 compute only: float64 logits need none), while the exact
  // terms it needs per component (U^T U - I: r x r) stay small
  const bool dense_refinement_allowed = std::is_same_v<T, float> && K * r * r <= kMaxGramEntries;
  const DenseChoice dense = dense_choice();
  std::once_flag exact_terms_once;
  std::shared_ptr<const ExactTerms> exact_terms_ptr;
  const auto need_exact_terms = [&] {
    std::call_once(exact_terms_once, [&] {
      exact_terms_ptr = cached_exact_terms(fwd, [&] { return with_gram_norms(lowrank_exact_terms<T>(mu, basis, K, D, r), K, r); });
    });
    return exact_terms_ptr.get();
  };
  // The exact-distance route (float32 compute, GSA_KERNELS_DENSE=auto): x . mu_k from a float64
  // GEMM (exact_mean_dots, which pass 0 computes anyway), the coefficients c_k from the float32
  // GEMM less U_k^T mu_k in double, and c^T (U^T U - I) c bounded by the Gram matrix' norm (added
  // exactly where c is refined). What error is left comes from the float32 c, and enters the logit
  // with the weight
  // (lam_j - residual_var) / (2 (lam_j + s^2) (residual_var + s^2)), which falls as 1 / s^4: at
  // large sigma the logits of a dense posterior are exact (bound <= kLogitTol) with no float64
  // GEMM of the whole panel and no per-component refinement. Each row's bound is computed from
  // its own coefficients (pass 1); a row over kLogitTol is refined as any other row. Per
  // component for the route's prediction: sum_j |lam_j - residual_var| and min_j lam_j.
  const bool exact_distances_allowed = dense_refinement_allowed && dense == DenseChoice::kAuto;
  std::vector<double> lam_dev(K, 0.0), lam_min(K, std::numeric_limits<double>::infinity());
  for (int64_t k = 0; k < K && exact_distances_allowed; ++k)
    for (int64_t j = 0; j < r; ++j) {
      lam_dev[k] += std::abs(static_cast<double>(lam[k * r + j]) - static_cast<double>(residual_var[k]));
      lam_min[k] = std::min(lam_min[k], static_cast<double>(lam[k * r + j]));
    }
  constexpr double eps64 = std::numeric_limits<double>::epsilon();
  // The back-projection takes the weights p >= p_min = exp(-significant) only (relative to the
  // row's running max): all the others together (< K p_min of the weight sum l >= ~1) move the
  // denoiser by < eps / 1024 of the largest |D_k|, far below its rounding in T (float: ~28 nats at
  // K 200); the sums l and hx, logp and the weights keep them. As the r = 0 kernel (empirical.cpp).
  const double p_min = std::exp(-std::min(kNegligible, std::log(1024.0 * static_cast<double>(K) / eps)));

  at::parallel_for(0, B, BB, [&](int64_t begin, int64_t end) {
    auto opts = options_for<T>();
    at::Tensor xbuf = std::is_same_v<X, T> ? at::Tensor() : at::empty({BB, D}, opts);
    at::Tensor acc = need_denoised ? at::empty({BB, D}, opts) : at::Tensor();
    // Q = [P | G] per block: P_k = p_k (1 - h_perp) multiplies mu_k, G_k = p_k g c_k multiplies U_k
    at::Tensor Qbuf = at::empty({BB * KB * W}, opts);
    std::vector<double> logit(BB * K), m(BB), l(BB), hx(BB), m_fast(BB), err(BB), s2v(BB), x_sq(BB);
    std::vector<T> rescale(BB);
    std::vector<double> y_exact(D), c_exact(r);
    std::vector<double> m_block(need_weights ? BB * num_kb : 0);
    std::vector<int64_t> refine(BB), dense_rows, rows32, nonzero_row(BB), gemm_rows, z_row(BB);
    std::vector<at::Tensor> F_blocks(num_kb);  // each block's float32 GEMM: [n, nk W]
    std::vector<char> f64_row(BB);  // rows whose logits all come from dense_refinement (pass 0)
    std::vector<char> exact_row(BB);  // rows on the exact-distance route (pass 0)
    std::vector<int64_t> within(BB);  // pass 0's count of components within reach of the max
    std::vector<double> xmu, err_exact(BB), c64(r);  // x . mu_k in float64 [n, K] (pass 0)
    std::vector<double> err_comp;  // the exact-distance rows' bound per component [n, K] (pass 1)
    std::vector<char> refine_comp;  // and which of their components to refine [n, K] (pass 2)
    std::vector<std::pair<double, int64_t>> mass;  // p_k e_k of a row's components
    Float64Scratch f64_scratch;  // dense_refinement's, allocated on first use
    const ExactTerms* ex = nullptr;  // the model's exact terms, once a row needs them

    for (int64_t b0 = begin; b0 < end; b0 += BB) {
      const int64_t n = std::min(BB, end - b0);
      const at::Tensor Xb = rows_in_compute_dtype<X, T>(x, xbuf, b0, n);
      const T* xb = Xb.data_ptr<T>();
      with_isa([&] {
        for (int64_t i = 0; i < n; ++i) {
          const double s = sig[b0 + i];
          s2v[i] = s * s;
          m[i] = m_fast[i] = -std::numeric_limits<double>::infinity();
          l[i] = hx[i] = 0;
          x_sq[i] = sum_squares(xb + i * D, D);
          // error bound of the fast logits (x 2 (var + s^2)): the expanded |y|^2 (when it enters),
          // |c|^2 from coefficients c_j = U_j^T x - U_j^T mu each off by up to dc, plus
          // c^T (U^T U - I) c of a rounded basis (the exact logit sums the residual directly)
          const double gemm = kGemmErr * eps * std::sqrt(double(D));
          const double y_norm = std::sqrt(x_sq[i]) + std::sqrt(max_mu_sq), dc = gemm * y_norm;  // |U_j| = 1
          const double e = (sq_matters ? gemm * (x_sq[i] + max_mu_sq) : 0.0) +  // 2 |x . mu| errs <= this
                           (r * dc * dc + 2 * std::sqrt(double(r)) * y_norm * dc + 2 * r * eps * y_norm * y_norm);
          err[i] = e / (2 * (min_var + s2v[i]));
        }
      });
      at::Tensor accb = need_denoised ? acc.narrow(0, 0, n).zero_() : at::Tensor();

      // Pass 0: rows with dense posteriors get every logit from the float64 GEMM (pass 2), so their
      // float32 GEMM would be wasted. Predict them from x . mu_k alone (1 / (r + 1) of the GEMM):
      // the logits less their in-span terms, counted within reach of the row's max as pass 2 counts
      // the fast logits, against the measured costs. A prediction only: a row predicted wrongly is
      // as exact either way, only slower. (GSA_KERNELS_DENSE=dense: the even rows that need
      // refinement, so that tests reach both routes to the float64 GEMM.)
      std::fill(f64_row.begin(), f64_row.begin() + n, 0);
      std::fill(exact_row.begin(), exact_row.begin() + n, 0);
      // the exact-distance route's bound on its |x - mu_k|^2 term, in logits: x . mu_k by a float64
      // GEMM (kGemmErr eps64 sqrt(D) |x| |mu|, twice) and the double sums around it
      const auto exact_distance_err = [&](int64_t i) {
        return sq_matters ? (kGemmErr * std::sqrt(double(D)) + 4) * eps64 * (x_sq[i] + max_mu_sq) /
                                (2 * (min_residual_var + s2v[i]))
                          : 0.0;
      };
      // an exact-distance row's logit of component kk from its coefficients c (U^T x - U^T mu, each
      // off by <= dc) and x . mu_k in float64, and the logit's error bound e. c^T (U^T U - I) c is
      // added when exact c are given (dc = 0: a refinement), else only bounded (r^2 work per component
      // for a term that a float32 c could not give anyway; it is ~eps |c|^2 for an orthonormal basis)
      const auto exact_route_logit = [&](int64_t i, int64_t kk, const double* c, double xm, double dc, double& e) {
        const double s2 = s2v[i], rv = residual_var[kk], vp = rv + s2;
        const T* lk = lam + kk * r;
        double cc = 0, cc_w = 0, ec = 0;
        for (int64_t j = 0; j < r; ++j) {
          const double lj = lk[j], inv = 1.0 / (lj + s2);
          cc += c[j] * c[j];
          cc_w += c[j] * c[j] * inv;
          ec += std::abs(lj - rv) * inv * (2 * std::abs(c[j]) + dc);
        }
        double corr = 0;  // c^T (U^T U - I) c
        if (dc == 0) {
          const double* g = ex->gram.data() + kk * r * r;
          for (int64_t a = 0; a < r; ++a) corr += c[a] * dot_lanes(g + a * r, c, r);
        }
        // c_j off by <= dc moves the logit by <= sum_j |w_j| (2 |c_j| + dc) dc / 2 (w_j: c_j^2's weight,
        // above); the true c^T (U^T U - I) c is <= |U^T U - I|_F (|c| + sqrt(r) dc)^2
        const double c_max = std::sqrt(cc) + std::sqrt(double(r)) * dc;
        e = exact_distance_err(i) + (dc > 0 ? 0.5 / vp * (dc * ec + ex->gram_norm[kk] * c_max * c_max) : 0.0);
        const double residual = std::max(0.0, x_sq[i] + mu_sq[kk] - 2.0 * xm - cc + corr);
        return logw[kk] + component_logpdf_residual<double>(residual, cc_w, log_det_low(lk, r, s2), rv, s2, D, r);
      };
      bool native = true;  // dense_refinement's GEMM: the native one where it runs, unless measured slower
      if (dense_refinement_allowed && dense != DenseChoice::kSparse) {
        bool any = false;
        for (int64_t i = 0; i < n; ++i) any = any || (err[i] > logit_tol && err[i] * kEps64Ratio <= logit_tol);
        if (any && dense == DenseChoice::kDense) {
          for (int64_t i = 0; i < n; i += 2) f64_row[i] = err[i] > logit_tol && err[i] * kEps64Ratio <= logit_tol;
        } else if (any) {
          const RefineCosts costs = refine_costs(xb, mu, basis, lam, K, D, r, panel(fwd, 0, std::min(KB, K), W, D, false));
          native = costs.native;
          if constexpr (std::is_same_v<T, float>) {
            xmu.resize(BB * K);
            exact_mean_dots(xb, n, D, mu, K, f64_scratch, xmu.data());
          }
          bool any_exact = false;
          with_isa([&] {
            for (int64_t i = 0; i < n; ++i) {
              const double s2 = s2v[i];
              // predicted bound of the exact-distance route: each |c_j| taken as |x - mu_k| / sqrt(D)
              // (an isotropic y's), sum_j |lam_j - rv| / (lam_j + s^2) by its largest term's denominator
              // (a prediction: a row it admits wrongly is refined in pass 2, as exact, only slower)
              const double dc = kGemmErr * eps * std::sqrt(double(D) * x_sq[i]);
              double predicted = exact_distance_err(i);
              for (int64_t k = 0; k < K; ++k) {
                const double sq = x_sq[i] + mu_sq[k] - 2.0 * xmu[i * K + k], vp = residual_var[k] + s2;
                const double c_est = std::sqrt(std::max(0.0, sq) / double(D));
                predicted = std::max(predicted, exact_distance_err(i) + 0.5 * dc / vp * lam_dev[k] / (lam_min[k] + s2) *
                                                                            (2 * c_est + dc));
              }
              // the exact-distance route where its weighted refinement applies: its refinement (exact c,
              // D r multiply-adds) costs half the other route's (lowrank_terms_exact), and x . mu_k in
              // float64 is computed here anyway
              exact_row[i] = exact_distances_allowed && err[i] > logit_tol && predicted <= kWeightedErrMax;
              any_exact = any_exact || exact_row[i];
              if (exact_row[i]) continue;
              // the other rows: their components within reach of the max, as pass 2 counts them for the
              // fast logits (here without the in-span terms)
              double* L = logit.data() + i * K;
              double top = -std::numeric_limits<double>::infinity();
              for (int64_t k = 0; k < K; ++k) {
                const double sq = x_sq[i] + mu_sq[k] - 2.0 * xmu[i * K + k];
                L[k] = logw[k] + component_logpdf<double>(sq, 0.0, 0.0, log_det_low(lam + k * r, r, s2), residual_var[k], s2, D, r);
                top = std::max(top, L[k]);
              }
              within[i] = 0;
              for (int64_t k = 0; k < K; ++k) within[i] += L[k] >= top - 2 * err[i] - kCutoff;
            }
          });
          // the exact terms are needed anyway when some row takes the exact-distance route
          double saved = any_exact ? 0.0 : -exact_terms_cost(costs, K, D, r, W * std::min(KB, K));
          for (int64_t i = 0; i < n; ++i) {
            if (!(err[i] > logit_tol && err[i] * kEps64Ratio <= logit_tol) || exact_row[i]) continue;
            f64_row[i] = within[i] * costs.exact > num_kb * costs.row64;
            if (f64_row[i]) saved += within[i] * costs.exact - num_kb * costs.row64;
          }
          if (saved <= 0) std::fill(f64_row.begin(), f64_row.begin() + n, 0);
        }
      }
      bool any_exact = false;
      for (int64_t i = 0; i < n; ++i) {
        err_exact[i] = exact_distance_err(i);
        any_exact = any_exact || exact_row[i];
      }
      if (any_exact) {
        ex = need_exact_terms();
        err_comp.resize(BB * K), refine_comp.resize(BB * K);
      }
      rows32.clear();
      for (int64_t i = 0; i < n; ++i)
        if (!f64_row[i]) rows32.push_back(i);
      const int64_t n32 = static_cast<int64_t>(rows32.size());
      at::Tensor X32;  // the float32 rows, when some rows are float64 ones
      if (n32 > 0 && n32 < n) {
        X32 = at::empty({n32, D}, options_for<T>());
        for (int64_t j = 0; j < n32; ++j) std::memcpy(X32.data_ptr<T>() + j * D, xb + rows32[j] * D, D * sizeof(T));
      }

      // Pass 1: every block's float32 GEMM and fast logits first, so that the refinement (pass 2)
      // knows each row's largest fast logit over all K components: against a running max, every
      // block before the row's top component was refined wherever its logits sat within reach of
      // that block's own max (at moderate sigma most of them: work for components of weight 0).
      for (int64_t kb = 0; kb < num_kb; ++kb) {
        const int64_t k0 = kb * KB, nk = std::min(KB, K - k0);
        // F = [x . mu_k | U_k^T x] for the block's components: [n, nk W] (the float32 rows' only)
        const at::Tensor pan = panel(fwd, k0, nk, W, D, false);
        if (n32 == n) {
          F_blocks[kb] = gemm_nt(GemmSite::kMixtureForward, Xb, pan);
        } else {
          F_blocks[kb] = at::empty({n, nk * W}, options_for<T>());
          if (n32 > 0) {
            const at::Tensor F32 = gemm_nt(GemmSite::kMixtureForward, X32, pan);
            for (int64_t j = 0; j < n32; ++j)
              std::memcpy(F_blocks[kb].data_ptr<T>() + rows32[j] * nk * W, F32.data_ptr<T>() + j * F32.stride(0),
                          nk * W * sizeof(T));
          }
        }
        const at::Tensor& F = F_blocks[kb];
        const T* Sp = F.data_ptr<T>();
        const int64_t lds = F.stride(0), ldc = lds;
        T* Cp = F.data_ptr<T>() + nk;  // c_k of row i at Cp + i ldc + k r
        with_isa([&] {
          for (int64_t i = 0; i < n; ++i) {
            if (f64_row[i]) continue;
            const double s2 = s2v[i];
            double* L = logit.data() + i * K + k0;
            if (exact_row[i]) {  // the exact-distance route (above), with each component's bound
              const double dc = kGemmErr * eps * std::sqrt(double(D) * x_sq[i]);  // of each c_j (|U_j| = 1)
              const double* xm = xmu.data() + i * K + k0;
              const double* um = ex->umu.data() + k0 * r;
              for (int64_t k = 0; k < nk; ++k) {
                T* c = Cp + i * ldc + k * r;
                for (int64_t j = 0; j < r; ++j) {
                  c64[j] = static_cast<double>(c[j]) - um[k * r + j];
                  c[j] = static_cast<T>(c64[j]);
                }
                double& e = err_comp[i * K + k0 + k];
                L[k] = exact_route_logit(i, k0 + k, c64.data(), xm[k], dc, e);
                err_exact[i] = std::max(err_exact[i], e);
              }
            } else {
            // fast logits
            for (int64_t k = 0; k < nk; ++k) {
              const int64_t kk = k0 + k;
              const double sq = x_sq[i] + mu_sq[kk] - 2.0 * static_cast<double>(Sp[i * lds + k]);
              double cc = 0, cc_w = 0;
              T* c = Cp + i * ldc + k * r;
              const T* lk = lam + kk * r;
              for (int64_t j = 0; j < r; ++j) {
                c[j] -= umu[kk * r + j];
                const double cj = c[j];
                cc += cj * cj;
                cc_w += cj * cj / (static_cast<double>(lk[j]) + s2);
              }
              L[k] = logw[kk] + component_logpdf<double>(sq, cc_w, cc, log_det_low(lk, r, s2), residual_var[kk], s2, D, r);
            }
            }
            double block_fast_max = -std::numeric_limits<double>::infinity();
            for (int64_t k = 0; k < nk; ++k) block_fast_max = std::max(block_fast_max, L[k]);
            m_fast[i] = std::max(m_fast[i], block_fast_max);
          }
        });
      }

      // The exact-distance rows: a row whose bound is over kLogitTol refines (pass 2: exact c) the
      // components that carry its error. Logit errors e_k move the weights by a total variation
      // <= sum_k p_k e_k (first order), so where the fast weights are good to a factor exp(2 max e)
      // (max e <= kWeightedErrMax) the components are refined in order of p_k e_k until what is left
      // is within the tolerance; else every component within reach of the max is, as pass 2 does
      // for the other rows.
      for (int64_t i = 0; i < n; ++i) {
        if (!exact_row[i]) continue;
        err[i] = err_exact[i];
        if (err[i] <= logit_tol) continue;
        const double* L = logit.data() + i * K;
        const double* e = err_comp.data() + i * K;
        char* flag = refine_comp.data() + i * K;
        if (!(err[i] <= kWeightedErrMax)) {
          const double keep = m_fast[i] - 2 * err[i] - kCutoff;
          for (int64_t k = 0; k < K; ++k) flag[k] = L[k] >= keep;
          continue;
        }
        std::fill(flag, flag + K, 0);
        mass.clear();
        double total = 0, left = 0;
        for (int64_t k = 0; k < K; ++k) {
          const double d = L[k] - m_fast[i], p = d > -kNegligible ? std::exp(d) : 0.0;
          total += p;
          if (p * e[k] > 0) mass.emplace_back(p * e[k], k), left += p * e[k];
        }
        // a refined component keeps exact_distance_err(i); the fast weights err by <= exp(2 err)
        const double budget = (logit_tol * std::exp(-2 * err[i]) - exact_distance_err(i)) * total;
        std::sort(mass.begin(), mass.end(), std::greater<>());
        for (size_t t = 0; t < mass.size() && left > budget; ++t) {
          flag[mass[t].second] = 1;
          left -= mass[t].first;
        }
      }

      // Pass 2, per block: refinement, online softmax, back-projection
      for (int64_t kb = 0; kb < num_kb; ++kb) {
        const int64_t k0 = kb * KB, nk = std::min(KB, K - k0);
        const at::Tensor& F = F_blocks[kb];
        const int64_t ldc = F.stride(0);
        T* Cp = F.data_ptr<T>() + nk;  // c_k of row i at Cp + i ldc + k r
        const at::Tensor Q = Qbuf.narrow(0, 0, n * nk * W).view({n, nk * W});
        T* Pp = Q.data_ptr<T>();
        T* Gp = Pp + nk;
        const int64_t ldp = nk * W, ldg = ldp;

        // the components that can matter, to be refined: within 2 err + kCutoff of the row's max
        for (int64_t i = 0; i < n; ++i) {
          refine[i] = 0;
          if (exact_row[i]) {
            if (err[i] > logit_tol)
              for (int64_t k = 0; k < nk; ++k) refine[i] += refine_comp[i * K + k0 + k];
          } else if (err[i] > logit_tol && !f64_row[i]) {
            const double keep = m_fast[i] - 2 * err[i] - kCutoff;
            const double* L = logit.data() + i * K + k0;
            for (int64_t k = 0; k < nk; ++k) refine[i] += L[k] >= keep;
          }
        }
        // Rows with many components to refine get every logit of the block from one float64 GEMM
        // instead (dense_refinement), where the measured costs say it is cheaper.
        dense_rows.clear();
        for (int64_t i = 0; i < n; ++i)
          if (f64_row[i]) dense_rows.push_back(i);
        const size_t predicted = dense_rows.size();
        if (dense_refinement_allowed && dense == DenseChoice::kDense) {
          for (int64_t i = 0; i < n; ++i)
            if (refine[i] > 0 && err[i] * kEps64Ratio <= logit_tol && !exact_row[i]) dense_rows.push_back(i);
        } else if (dense_refinement_allowed && dense == DenseChoice::kAuto) {
          int64_t total = 0;
          for (int64_t i = 0; i < n; ++i) total += exact_row[i] ? 0 : refine[i];
          if (total > 0) {
            const RefineCosts costs = refine_costs(xb, mu, basis, lam, K, D, r, panel(fwd, k0, nk, W, D, false));
            // the predicted rows convert and need the exact terms anyway
            double saved = predicted > 0 ? 0.0 : -costs.convert - exact_terms_cost(costs, K, D, r, W * nk);
            native = costs.native;
            for (int64_t i = 0; i < n; ++i)
              if (!exact_row[i] && refine[i] * costs.exact > costs.row64 && err[i] * kEps64Ratio <= logit_tol) {
                dense_rows.push_back(i);
                saved += refine[i] * costs.exact - costs.row64;
              }
            if (saved <= 0) dense_rows.resize(predicted);
          }
        }
        if (!dense_rows.empty()) {
          ex = need_exact_terms();
          dense_refinement<T>(xb, D, r, k0, nk, dense_rows, panel(fwd, k0, nk, W, D, false),
                              need_denoised ? panel(bwd, k0, nk, W, D, true) : at::Tensor(), f64_scratch, *ex, x_sq.data(),
                              s2v.data(), mu_sq.data(), lam, residual_var, logw, logit.data() + k0, K, Cp, ldc,
                              native);
          for (const int64_t i : dense_rows) refine[i] = 0;
        }

        with_isa([&] {
          for (int64_t i = 0; i < n; ++i) {
            const double s2 = s2v[i];
            double* L = logit.data() + i * K + k0;
            // exact refinement of the components that can matter
            if (refine[i] > 0 && exact_row[i]) {  // exact c (selected after pass 1)
              for (int64_t k = 0; k < nk; ++k) {
                if (!refine_comp[i * K + k0 + k]) continue;
                const int64_t kk = k0 + k;
                exact_coefficients(xb + i * D, basis + kk * D * r, ex->umu.data() + kk * r, D, r, c_exact.data());
                T* c = Cp + i * ldc + k * r;
                for (int64_t j = 0; j < r; ++j) c[j] = static_cast<T>(c_exact[j]);
                double e;
                L[k] = exact_route_logit(i, kk, c_exact.data(), xmu[i * K + kk], 0.0, e);
              }
            } else if (refine[i] > 0) {
              const double keep = m_fast[i] - 2 * err[i] - kCutoff;
              for (int64_t k = 0; k < nk; ++k) {
                if (L[k] < keep) continue;
                const int64_t kk = k0 + k;
                // exact c (kept for the denoiser) and residual
                double cc_w;
                const double residual = lowrank_terms_exact(xb + i * D, mu + kk * D, basis + kk * D * r, lam + kk * r,
                                                            s2, D, r, y_exact.data(), c_exact.data(), cc_w);
                T* c = Cp + i * ldc + k * r;
                for (int64_t j = 0; j < r; ++j) c[j] = static_cast<T>(c_exact[j]);
                L[k] = logw[kk] + component_logpdf_residual<double>(residual, cc_w, log_det_low(lam + kk * r, r, s2),
                                                                    residual_var[kk], s2, D, r);
              }
            }
            // online softmax update
            double m_new = m[i];
            for (int64_t k = 0; k < nk; ++k) m_new = std::max(m_new, L[k]);
            const double scale = merge_scale(m[i], m_new);
            const double h_perp0 = residual_var[0] / (residual_var[0] + s2);
            double lsum = 0, hsum = 0;
            int64_t nonzero = 0;  // the row's components in the block with a significant weight
            for (int64_t k = 0; k < nk; ++k) {
              const int64_t kk = k0 + k;
              const double d = L[k] - m_new;
              const double p = d > -kNegligible ? std::exp(d) : 0.0;
              const double residual_var_k = residual_var[kk];
              const double h_perp = equal_residual_var ? h_perp0 : residual_var_k / (residual_var_k + s2);
              lsum += p;
              hsum += p * h_perp;
              if (need_weights) w_p[(b0 + i) * K + kk] = static_cast<T>(p);
              const double pb = p >= p_min ? p : 0.0;  // in the back-projection
              Pp[i * ldp + k] = static_cast<T>(pb * (1.0 - h_perp));
              nonzero += pb != 0.0;
              if (need_denoised) {  // G = p (lam / (lam + s^2) - h_perp) c
                const T* c = Cp + i * ldc + k * r;
                T* g = Gp + i * ldg + k * r;
                for (int64_t j = 0; j < r; ++j) {
                  const double lj = lam[kk * r + j];
                  g[j] = static_cast<T>(pb * (lj / (lj + s2) - h_perp) * c[j]);
                }
              }
            }
            nonzero_row[i] = nonzero;
            l[i] = l[i] * scale + lsum;
            hx[i] = hx[i] * scale + hsum;
            if (need_weights) m_block[i * num_kb + kb] = m_new;
            rescale[i] = static_cast<T>(scale);
            m[i] = m_new;
          }
        });
        if (!need_denoised) continue;
        // acc = acc * rescale (+ z): z = Q [M | U]^T by one GEMM over the rows with dense
        // posteriors, and for a row with fewer than 1 in kSparseRatio of the block's weights nonzero
        // (small sigma: mostly one component per row), r + 1 axpys per nonzero weight over the
        // forward panel's rows (mu_k, the columns of U_k), as the r = 0 kernel decides
        // (empirical.cpp). (A cost model with the axpy rate timed in cache chose the axpys for
        // dense posteriors, where they ran slower.)
        gemm_rows.clear();
        for (int64_t i = 0; i < n; ++i) {
          const bool sparse_row = dense == DenseChoice::kSparse ||
                                  (dense == DenseChoice::kAuto && nonzero_row[i] * kSparseRatio < nk);
          z_row[i] = nonzero_row[i] > 0 && !sparse_row ? static_cast<int64_t>(gemm_rows.size()) : -1;
          if (z_row[i] >= 0) gemm_rows.push_back(i);
        }
        const int64_t nz = static_cast<int64_t>(gemm_rows.size());
        at::Tensor z;
        if (nz > 0) {
          const at::Tensor bwd_block = panel(bwd, k0, nk, W, D, true);
          if (nz == n) {
            z = gemm_nt(GemmSite::kMixtureBackward, Q, bwd_block);
          } else {
            at::Tensor Qz = at::empty({nz, nk * W}, options_for<T>());
            for (int64_t j = 0; j < nz; ++j)
              std::memcpy(Qz.data_ptr<T>() + j * nk * W, Pp + gemm_rows[j] * ldp, nk * W * sizeof(T));
            z = gemm_nt(GemmSite::kMixtureBackward, Qz, bwd_block);
          }
        }
        const T* Fw = panel(fwd, k0, nk, W, D, false).data_ptr<T>();  // rows mu_k, then U_k^T
        const T* zp = nz > 0 ? z.data_ptr<T>() : nullptr;
        const int64_t ldz = nz > 0 ? z.stride(0) : 0;
        with_isa([&] {
          for (int64_t i = 0; i < n; ++i) {
            T* a = accb.data_ptr<T>() + i * D;
            const T sc = rescale[i];
            if (z_row[i] >= 0) {
              const T* zi = zp + z_row[i] * ldz;
              for (int64_t d = 0; d < D; ++d) a[d] = a[d] * sc + zi[d];
              continue;
            }
            if (sc != T(1))
              for (int64_t d = 0; d < D; ++d) a[d] *= sc;
            if (nonzero_row[i] == 0) continue;
            for (int64_t k = 0; k < nk; ++k) {
              const T pk = Pp[i * ldp + k];
              const T* g = Gp + i * ldg + k * r;
              if (pk != T(0)) axpy(a, pk, Fw + k * D, D);
              for (int64_t j = 0; j < r; ++j)
                if (g[j] != T(0)) axpy(a, g[j], Fw + (nk + k * r + j) * D, D);
            }
          }
        });
      }

      const T* acc_p = need_denoised ? accb.data_ptr<T>() : nullptr;
      with_isa([&] {
        finish_rows<X, T>(b0, n, D, K, KB, num_kb, m.data(), l.data(), hx.data(), x_sq.data(), m_block.data(), acc_p,
                          xb, logp_p, den_p, w_p);
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_posterior_cpu(
    const at::Tensor& x, const at::Tensor& means, const at::Tensor& bases,
    const at::Tensor& eigvals, const at::Tensor& residual_var, const at::Tensor& log_weights,
    const at::Tensor& sigma, bool need_denoised, bool need_weights,
    const std::optional<at::Tensor>& given_forward_panels,
    const std::optional<at::Tensor>& given_backward_panels) {
  const char* op = "gsa_kernels::mixture_posterior (cpu)";
  check_mixture(x, means, bases, eigvals, residual_var, log_weights, sigma, op);
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor");
  const int64_t B = x.size(0), D = x.size(1), K = means.size(0), r = bases.size(2);
  const auto cd = compute_dtype(x);
  at::Tensor den = need_denoised ? at::empty({B, D}, x.options()) : at::empty({0}, x.options());
  at::Tensor logp = at::empty({B}, x.options().dtype(cd));
  at::Tensor weights = at::empty(need_weights ? at::IntArrayRef{B, K} : at::IntArrayRef{0},
                                 x.options().dtype(cd));
  if (B == 0) return {den, logp, weights};
  if (bases.size(2) == 0) {  // isotropic components / the empirical mixture: empirical.cpp
    empirical_posterior_cpu(x, means, residual_var, log_weights, sigma, need_denoised, need_weights,
                            den, logp, weights);
    return {den, logp, weights};
  }
  at::Tensor fwd, bwd;
  {
    const int64_t KB = component_block(K, r), n = K * (r + 1) * D;
    AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "mixture_panels", [&] {
      fwd = layout_or(given_forward_panels, means, {n}, "forward_panels", op,
                      [&] { return forward_panels<scalar_t>(means, bases, KB); });
      if (need_denoised)
        bwd = layout_or(given_backward_panels, means, {n}, "backward_panels", op,
                        [&] { return backward_panels<scalar_t>(fwd, K, D, r + 1, KB); });
    });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mixture_posterior", [&] {
    mixture_impl<scalar_t>(x, means, bases, eigvals, residual_var, log_weights, sigma,
                           need_denoised, need_weights, fwd, bwd, den, logp, weights);
  });
  return {den, logp, weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(gsa_kernels, CPU, m) {
  m.impl("mixture_posterior", &mixture_posterior_cpu);
  m.impl("mixture_panels", &mixture_panels);
}

}  // namespace gsa::cpu
