// Runtime choice of the instruction set for the CPU kernels' element-wise loops. The library is
// compiled for the baseline of its target (x86-64, aarch64) so that one build runs on every CPU
// of that architecture; on x86-64 the hot loops are compiled twice more, for AVX2 + FMA and for
// AVX-512, and with_isa() runs the variant this CPU supports (GSA_KERNELS_ISA=generic|avx2|avx512
// forces one). The build disables FMA contraction (-ffp-contract=off, setup.py) and no loop
// reassociates, so every variant computes the same bits: only the speed differs.
#pragma once

#include <string>

namespace gsa::cpu {

enum class Isa : int { kGeneric, kAvx2, kAvx512 };

Isa active_isa();  // the variant in use (isa.cpp); raises for a bad or unsupported GSA_KERNELS_ISA
const char* isa_name(Isa isa);
bool cpu_supports(Isa isa);

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GSA_ISA_X86 1
// flatten: everything f calls is inlined into these bodies and so compiled for their target
// (only f's body: no out-of-line function of ours or of a header gets an ISA-specific copy).
template <typename F>
__attribute__((target("avx2,fma,f16c"), flatten)) void run_avx2(const F& f) {
  f();
}
template <typename F>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"), flatten))
void run_avx512(const F& f) {
  f();
}
#endif

template <typename F>
__attribute__((flatten)) void run_generic(const F& f) {
  f();
}

// f() (a loop over raw pointers: no at::parallel_for or tensor calls inside) compiled for the
// active instruction set. The sanitizer build (scripts/sanitize.sh) compiles the generic variant
// only: the others are the same source for another target (tests/test_isa_dispatch.py checks they
// give the same bits), and three flattened copies of every loop under ASan + UBSan took most of
// its build time.
template <typename F>
void with_isa(const F& f) {
#if defined(GSA_ISA_X86) && !defined(GSA_KERNELS_SANITIZE)
  switch (active_isa()) {
    case Isa::kAvx512: return run_avx512(f);
    case Isa::kAvx2: return run_avx2(f);
    case Isa::kGeneric: break;
  }
#endif
  run_generic(f);
}

}  // namespace gsa::cpu
