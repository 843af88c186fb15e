// Instruction-set detection (isa.h) and gsa_kernels::_cpu_dispatch_info, which reports what the
// CPU kernels dispatch to on this host: the ISA variant and the GEMM engine per shape class.
#include "isa.h"

#include <torch/library.h>

#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <sstream>

#include "gemm.h"

namespace gsa::cpu {

namespace {
constexpr Isa kIsas[] = {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512};
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kGeneric: break;
  }
  return "generic";
}

bool cpu_supports(Isa isa) {
#ifdef GSA_ISA_X86
  __builtin_cpu_init();  // the checks include the OS saving the wide registers (XCR0)
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (isa == Isa::kAvx2) return avx2;
  if (isa == Isa::kAvx512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
  return isa == Isa::kGeneric;
}

Isa active_isa() {
  static const Isa active = [] {
    const char* env = std::getenv("GSA_KERNELS_ISA");
    const std::string value = env ? env : "";
    if (value.empty() || value == "auto") {
      Isa best = Isa::kGeneric;
      for (Isa isa : kIsas)
        if (cpu_supports(isa)) best = isa;
      return best;
    }
    for (Isa isa : kIsas)
      if (value == isa_name(isa)) {
        TORCH_CHECK(cpu_supports(isa), "GSA_KERNELS_ISA=", value, " but this CPU or build lacks it");
        return isa;
      }
    TORCH_CHECK_VALUE(false, "GSA_KERNELS_ISA must be auto, generic, avx2 or avx512; got '", value, "'");
  }();
  return active;
}

namespace {

std::string cpu_dispatch_info() {
  std::ostringstream out;
  out << "{\"isa\": \"" << isa_name(active_isa()) << "\", \"isa_supported\": [";
  const char* sep = "";
  for (Isa isa : kIsas)
    if (cpu_supports(isa)) {
      out << sep << "\"" << isa_name(isa) << "\"";
      sep = ", ";
    }
  out << "], \"gemm\": " << gemm_choices_json() << "}";
  return out.str();
}

// torch.set_flush_denormal acts on the calling thread only; the benchmarks' eager baselines run
// their matmuls on the intra-op pool too. One chunk per pool thread sets each one's flag.
bool set_flush_denormal_all_threads(bool on) {
  const int64_t threads = at::get_num_threads();
  std::atomic<bool> ok{true};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    if (!at::globalContext().setFlushDenormal(on)) ok = false;
  });
  return at::globalContext().setFlushDenormal(on) && ok;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gsa_kernels, m) {
  m.def("_set_flush_denormal_all_threads(bool on) -> bool", &set_flush_denormal_all_threads);
  // JSON: {"isa": variant in use, "isa_supported": [...], "gemm": [one entry per shape class
  // met so far: site, dtype, threaded, shape, engine, how chosen, timings, calls]}
  m.def("_cpu_dispatch_info() -> str", &cpu_dispatch_info);
}

}  // namespace gsa::cpu
