// Engine choice for the kernels' GEMMs (gemm.h). A shape class is the call site, the dtype,
// whether the call runs threaded (outside at::parallel_for) or single-threaded inside a parallel
// row block, whether w's rows are contiguous (a GEMM-ready layout, or a model tensor read as it is)
// and n, k rounded down to powers of two. On a class's first call, each engine that
// accepts the operands runs on them (the first rows only: about kMeasureFlops of work, at least
// kMeasureRows rows), once to warm up (oneDNN compiles its kernel on first use) and then
// kTimedRuns times, interleaved; the fastest run wins and serves the class for the process.
// The choice is plain data behind a mutex, never held while measuring: nothing to redo after fork.
#include "gemm.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <tuple>
#include <vector>

#include "isa.h"
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace gsa::cpu {
namespace {

constexpr double kMeasureFlops = 1e8;  // ~1 ms at 100 GFLOP/s
constexpr int64_t kMeasureRows = 64;   // fewer rows would time the weight's memory traffic only
constexpr int kTimedRuns = 2;

enum class Engine : int { kOneDnn, kBlas };
constexpr int kNumEngines = 2;
constexpr const char* kEngineNames[kNumEngines] = {"onednn", "blas"};
constexpr const char* kSiteNames[] = {"project", "expand", "mixture_forward", "mixture_backward", "distances"};

const std::optional<c10::OperatorHandle>& onednn_linear() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

// oneDNN: float32, and only fast with contiguous rows of w (callers keep that layout).
bool onednn_accepts(const at::Tensor& a, const at::Tensor& w) {
  return onednn_linear().has_value() && a.scalar_type() == at::kFloat && w.is_contiguous() &&
         a.stride(1) == 1;
}

at::Tensor run(Engine engine, const at::Tensor& a, const at::Tensor& w) {
  if (engine == Engine::kOneDnn) {
    torch::jit::Stack stack{a, w, c10::IValue(), std::string("none"),
                            c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    onednn_linear()->callBoxed(stack);
    return stack[0].toTensor();
  }
  return at::mm(a, w.t());
}

// GSA_KERNELS_GEMM: unset or "auto" (measure), or an engine name (forced wherever it applies).
std::optional<Engine> forced_engine() {
  static const std::optional<Engine> forced = []() -> std::optional<Engine> {
    const char* env = std::getenv("GSA_KERNELS_GEMM");
    const std::string value = env ? env : "";
    if (value.empty() || value == "auto") return std::nullopt;
    for (int e = 0; e < kNumEngines; ++e)
      if (value == kEngineNames[e]) return static_cast<Engine>(e);
    TORCH_CHECK_VALUE(false, "GSA_KERNELS_GEMM must be auto, onednn or blas; got '", value, "'");
  }();
  return forced;
}

struct Choice {
  Engine engine = Engine::kBlas;
  const char* how = "only";  // "only" (one engine accepts the operands), "forced" or "measured"
  int64_t m = 0, n = 0, k = 0;  // the shape it was chosen on (m: the rows timed)
  double ms[kNumEngines] = {NAN, NAN};  // best timed run of each engine
  int64_t calls = 0;
};

double seconds(Engine engine, const at::Tensor& a, const at::Tensor& w) {
  const auto t0 = std::chrono::steady_clock::now();
  run(engine, a, w);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The engines that may serve a @ w^T here: the forced one (blas where oneDNN cannot take the
// operands), else every engine that accepts them.
std::vector<Engine> candidates(const at::Tensor& a, const at::Tensor& w) {
  const bool onednn = onednn_accepts(a, w);
  if (const auto forced = forced_engine())
    return {*forced == Engine::kOneDnn && !onednn ? Engine::kBlas : *forced};
  if (!onednn) return {Engine::kBlas};
  return {Engine::kOneDnn, Engine::kBlas};
}

// Times each candidate engine on the first rows of a (all of them with all_rows); with one
// candidate, `how` says why. time_single: time a lone candidate too (layouts.cpp's cost model).
Choice choose(const at::Tensor& a, const at::Tensor& w, bool time_single, bool all_rows = false) {
  Choice c;
  c.m = a.size(0), c.n = w.size(0), c.k = a.size(1);
  const std::vector<Engine> engines = candidates(a, w);
  c.engine = engines[0];
  c.how = forced_engine() ? "forced" : engines.size() == 1 ? "only" : "measured";
  if (engines.size() == 1 && !time_single) return c;
  if (!all_rows)
    c.m = std::min(c.m, std::max(kMeasureRows, static_cast<int64_t>(kMeasureFlops / (2.0 * c.n * c.k))));
  const at::Tensor rows = a.narrow(0, 0, c.m);
  double best[kNumEngines];
  std::fill_n(best, kNumEngines, std::numeric_limits<double>::infinity());
  for (int run = 0; run <= kTimedRuns; ++run)
    for (Engine e : engines) {
      const double t = seconds(e, rows, w);
      if (run > 0) best[static_cast<int>(e)] = std::min(best[static_cast<int>(e)], t);
    }
  c.engine = static_cast<Engine>(std::min_element(best, best + kNumEngines) - best);
  for (Engine e : engines) c.ms[static_cast<int>(e)] = best[static_cast<int>(e)] * 1e3;
  return c;
}

// site, dtype, threaded, w's rows contiguous (a layout, or U read as is), log2 n, log2 k
using Key = std::tuple<int, int, bool, bool, int, int>;

std::mutex mutex;
std::map<Key, Choice> choices;

}  // namespace

at::Tensor gemm_nt(GemmSite site, const at::Tensor& a, const at::Tensor& w) {
  if (a.numel() == 0 || w.numel() == 0) return at::mm(a, w.t());  // no work to time
  forced_engine();  // a bad GSA_KERNELS_GEMM raises here, outside the lock
  const Key key{static_cast<int>(site), static_cast<int>(a.scalar_type()),
                !at::in_parallel_region() && at::get_num_threads() > 1, w.is_contiguous(),
                floor_log2(w.size(0)), floor_log2(a.size(1))};
  Engine engine;
  {
    std::unique_lock<std::mutex> lock(mutex);
    auto it = choices.find(key);
    if (it == choices.end()) {
      // Measure without the lock: a fork() during the measurement then leaves no held mutex in
      // the child, and other classes are not held up. Concurrent first calls of one class may
      // both measure; the first to finish decides.
      lock.unlock();
      Choice measured = choose(a, w, false);
      lock.lock();
      it = choices.emplace(key, measured).first;  // no-op if another thread got there first
    }
    ++it->second.calls;
    engine = it->second.engine;
  }
  if (engine == Engine::kOneDnn && !onednn_accepts(a, w)) engine = Engine::kBlas;
  return run(engine, a, w);
}

double gemm_best_ms_per_row(const at::Tensor& a, const at::Tensor& w) {
  const Choice c = choose(a, w, true, true);
  return *std::min_element(c.ms, c.ms + kNumEngines, [](double u, double v) {
    return std::isnan(v) || (!std::isnan(u) && u < v);
  }) / static_cast<double>(c.m);
}

double measured_cost(const std::string& key, const std::function<double()>& measure) {
  static std::mutex cost_mutex;
  static std::map<std::string, double> costs;
  {
    std::lock_guard<std::mutex> lock(cost_mutex);
    const auto it = costs.find(key);
    if (it != costs.end()) return it->second;
  }
  const double measured = measure();
  std::lock_guard<std::mutex> lock(cost_mutex);
  return costs.emplace(key, measured).first->second;
}

bool native_f64_gemm() {
#ifdef GSA_ISA_X86
  return active_isa() == Isa::kAvx512 && forced_engine() != Engine::kBlas;
#else
  return false;
#endif
}

void pack_f64_rows(const float* x, int64_t k, const int64_t* rows, int64_t m, double* out) {
  const int64_t mp = round_up(m, kF64Rows);
  for (int64_t t = 0; t < mp / kF64Rows; ++t) {
    double* o = out + t * k * kF64Rows;
    for (int64_t i = 0; i < kF64Rows; ++i) {
      const int64_t j = t * kF64Rows + i;
      if (j >= m) {
        for (int64_t d = 0; d < k; ++d) o[d * kF64Rows + i] = 0.0;
        continue;
      }
      const float* src = x + rows[j] * k;
      for (int64_t d = 0; d < k; ++d) o[d * kF64Rows + i] = src[d];
    }
  }
}

void pack_f64_tiles(const float* w, const float* wt, int64_t ldt, int64_t n, int64_t k, double* out) {
  for (int64_t j0 = 0; j0 < n; j0 += kF64Cols) {
    double* o = out + (j0 / kF64Cols) * k * kF64Cols;
    const int64_t nj = std::min(kF64Cols, n - j0);
    for (int64_t d = 0; d < k; ++d) {
      double* od = o + d * kF64Cols;
      if (wt) {
        const float* src = wt + d * ldt + j0;
        for (int64_t j = 0; j < nj; ++j) od[j] = src[j];
      } else {
        for (int64_t j = 0; j < nj; ++j) od[j] = w[(j0 + j) * k + d];
      }
      for (int64_t j = nj; j < kF64Cols; ++j) od[j] = 0.0;
    }
  }
}

#ifdef GSA_ISA_X86
namespace {
// c [kF64Rows, kF64Cols] (row stride ldc) (+)= a_tile[p][i] b_tile[p][j] over p < kc: 24 zmm
// accumulators, two B loads and 12 broadcasts per step
__attribute__((target("avx512f,fma"))) void f64_tile(const double* a, const double* b, int64_t kc, double* c,
                                                      int64_t ldc, bool accumulate) {
  __m512d lo[kF64Rows], hi[kF64Rows];
#pragma GCC unroll 12
  for (int i = 0; i < kF64Rows; ++i) lo[i] = hi[i] = _mm512_setzero_pd();
  for (int64_t p = 0; p < kc; ++p) {
    const __m512d b0 = _mm512_loadu_pd(b + p * kF64Cols), b1 = _mm512_loadu_pd(b + p * kF64Cols + 8);
    const double* ap = a + p * kF64Rows;
#pragma GCC unroll 12
    for (int i = 0; i < kF64Rows; ++i) {
      const __m512d av = _mm512_set1_pd(ap[i]);
      lo[i] = _mm512_fmadd_pd(av, b0, lo[i]);
      hi[i] = _mm512_fmadd_pd(av, b1, hi[i]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < kF64Rows; ++i) {
    double* ci = c + i * ldc;
    if (accumulate) {
      lo[i] = _mm512_add_pd(lo[i], _mm512_loadu_pd(ci));
      hi[i] = _mm512_add_pd(hi[i], _mm512_loadu_pd(ci + 8));
    }
    _mm512_storeu_pd(ci, lo[i]);
    _mm512_storeu_pd(ci + 8, hi[i]);
  }
}
}  // namespace
#endif

void gemm_f64_packed(const double* a, const double* b, int64_t mp, int64_t np, int64_t k, double* c) {
#ifdef GSA_ISA_X86
  constexpr int64_t kDepth = 128;  // a B slice [kDepth][16] (16 KiB) and an A tile [kDepth][12] (12 KiB): L1
  for (int64_t p0 = 0; p0 < k; p0 += kDepth) {
    const int64_t kc = std::min(kDepth, k - p0);
    for (int64_t jt = 0; jt < np / kF64Cols; ++jt) {
      const double* bt = b + jt * k * kF64Cols + p0 * kF64Cols;
      for (int64_t it = 0; it < mp / kF64Rows; ++it)
        f64_tile(a + it * k * kF64Rows + p0 * kF64Rows, bt, kc, c + it * kF64Rows * np + jt * kF64Cols, np, p0 > 0);
    }
  }
#else
  (void)a, (void)b, (void)mp, (void)np, (void)k, (void)c;
  TORCH_CHECK(false, "gemm_f64_packed: x86-64 only");
#endif
}

DenseChoice dense_choice() {
  const char* env = std::getenv("GSA_KERNELS_DENSE");
  const std::string value = env ? env : "";
  if (value.empty() || value == "auto") return DenseChoice::kAuto;
  if (value == "dense") return DenseChoice::kDense;
  if (value == "sparse") return DenseChoice::kSparse;
  TORCH_CHECK_VALUE(false, "GSA_KERNELS_DENSE must be auto, dense or sparse; got '", value, "'");
}

std::string gemm_choices_json() {
  std::lock_guard<std::mutex> lock(mutex);
  std::ostringstream out;
  out << "[";
  const char* sep = "";
  for (const auto& [key, c] : choices) {
    const auto& [site, dtype, threaded, w_contiguous, log_n, log_k] = key;
    out << sep << "{\"site\": \"" << kSiteNames[site] << "\", \"dtype\": \""
        << (dtype == static_cast<int>(at::kDouble) ? "float64" : "float32") << "\", \"threaded\": "
        << (threaded ? "true" : "false") << ", \"w_contiguous\": "
        << (w_contiguous ? "true" : "false") << ", \"m\": " << c.m << ", \"n\": " << c.n
        << ", \"k\": " << c.k << ", \"engine\": \"" << kEngineNames[static_cast<int>(c.engine)]
        << "\", \"how\": \"" << c.how << "\", \"ms\": {";
    const char* sep2 = "";
    for (int e = 0; e < kNumEngines; ++e)
      if (!std::isnan(c.ms[e])) {
        out << sep2 << "\"" << kEngineNames[e] << "\": " << c.ms[e];
        sep2 = ", ";
      }
    out << "}, \"calls\": " << c.calls << "}";
    sep = ", ";
  }
  out << "]";
  return out.str();
}

}  // namespace gsa::cpu
