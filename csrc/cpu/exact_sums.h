// Exact squared distances and norms for the CPU kernels (mixture.cpp, empirical.cpp), summed in
// double. Call them inside with_isa (isa.h) so that the lanes run on the widest vectors.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace gsa::cpu {

// Sums of squares in double over 8 fixed lanes, with GCC / Clang vector extensions: one AVX-512
// register, two AVX2 or four SSE2 / NEON ones, and the same bits on every ISA (the lanes fix the
// order of the additions).
using Double8 = double __attribute__((vector_size(64)));

// v = p[0 .. 8) in double (by reference: a 64-byte vector by value has no one ABI)
template <typename T>
inline void load8(const T* p, Double8& v) {
  if constexpr (std::is_same_v<T, double>) {
    std::memcpy(&v, p, sizeof v);
  } else {
    using Float8 = float __attribute__((vector_size(32)));
    Float8 f;
    std::memcpy(&f, p, sizeof f);
    v = __builtin_convertvector(f, Double8);
  }
}

// sum_d (a_d - b_d)^2 (kDiff) or sum_d a_d^2, in double; a float32 difference is exact in double.
template <bool kDiff, typename T>
inline double lane_sum_squares(const T* a, const T* b, int64_t D) {
  const auto term = [&](int64_t d) {
    Double8 t, u;
    load8(a + d, t);
    if constexpr (kDiff) {
      load8(b + d, u);
      t -= u;
    }
    return t * t;
  };
  // four accumulators: one would chain every addition behind the previous one (latency-bound)
  Double8 acc[4] = {};
  int64_t d = 0;
  for (; d + 32 <= D; d += 32)
    for (int j = 0; j < 4; ++j) acc[j] += term(d + 8 * j);
  for (; d + 8 <= D; d += 8) acc[0] += term(d);
  const Double8 all = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  double s = ((all[0] + all[1]) + (all[2] + all[3])) + ((all[4] + all[5]) + (all[6] + all[7]));
  for (; d < D; ++d) {
    const double t = kDiff ? static_cast<double>(a[d]) - static_cast<double>(b[d]) : static_cast<double>(a[d]);
    s += t * t;
  }
  return s;
}

template <typename T>
double sqdist_exact(const T* a, const T* b, int64_t D) {
  return lane_sum_squares<true>(a, b, D);
}

template <typename T>
double sum_squares(const T* v, int64_t D) {
  return lane_sum_squares<false>(v, v, D);
}

}  // namespace gsa::cpu
