// Device helpers of the CUDA kernels: 16-bit loads/stores, warp and block reductions, dynamic
// shared memory. Compiled by nvcc, or by g++ after gsa/simt_emu.h (the host SIMT emulation), so
// everything here stays in the subset the emulation supports. No torch headers.
#pragma once
#include <cstdint>

#include "gsa/spectral.h"
#include "params.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define GSA_DEVICE __device__ __forceinline__
// Every kernel keeps its shared memory in one struct placed in dynamic shared memory, so the
// emulation can poison it before each block.
#define GSA_SHARED_STRUCT(Type, name)                                       \
  extern __shared__ __align__(16) unsigned char gsa_dynamic_smem[];        \
  Type& name = *reinterpret_cast<Type*>(gsa_dynamic_smem)
#elif defined(GSA_SIMT_EMULATION)
#define GSA_DEVICE inline
#define GSA_SHARED_STRUCT(Type, name) \
  Type& name = *reinterpret_cast<Type*>(::gsa::emu::dynamic_shared_memory())
#else
#error "kernel sources need nvcc or gsa/simt_emu.h"
#endif

namespace gsa::cuda {

// ---- loads and stores: 16-bit inputs compute in float, float64 in double ----
GSA_DEVICE float to_real(float v) { return v; }
GSA_DEVICE double to_real(double v) { return v; }
GSA_DEVICE float to_real(bf16 v) {  // bfloat16 is the top half of a float32
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__CUDACC__)
GSA_DEVICE float to_real(f16 v) { return __half2float(__ushort_as_half(v.bits)); }
GSA_DEVICE void store(f16* p, float v) { p->bits = __half_as_ushort(__float2half_rn(v)); }
GSA_DEVICE void store(bf16* p, float v) { p->bits = __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
#else  // emulatable twins: IEEE conversions by bit manipulation, round to nearest even
GSA_DEVICE float to_real(f16 v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1Fu, mant = v.bits & 0x3FFu, u;
  if (exp == 0x1Fu) {
    u = sign | 0x7F800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(mant & 0x400u)) { mant <<= 1; --exp; }
    u = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
  }
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
GSA_DEVICE void store(f16* p, float v) {
  uint32_t u;
  memcpy(&u, &v, sizeof u);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  uint16_t h;
  if (a > 0x7F800000u) {
    h = 0x7E00u;  // nan
  } else if (a >= 0x477FF000u) {
    h = 0x7C00u;  // rounds to >= 65520: inf
  } else if (a < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    const int shift = 126 - int(a >> 23);
    if (shift > 24) {
      h = 0;
    } else {
      const uint32_t m = (a & 0x7FFFFFu) | 0x800000u;  // value = m 2^(e - 150) = (m >> shift) 2^-24
      uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
      if (rem > half || (rem == half && (q & 1u))) ++q;
      h = uint16_t(q);
    }
  } else {
    const uint32_t rounded = a + 0xFFFu + ((a >> 13) & 1u);
    h = uint16_t((rounded - 0x38000000u) >> 13);
  }
  p->bits = uint16_t(sign | h);
}
GSA_DEVICE void store(bf16* p, float v) {
  uint32_t u;
  memcpy(&u, &v, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    p->bits = uint16_t((u >> 16) | 0x40u);  // quiet nan
  } else {
    p->bits = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}
#endif
GSA_DEVICE void store(float* p, float v) { *p = v; }
GSA_DEVICE void store(double* p, double v) { *p = v; }

// ---- reductions (every lane of the warp / thread of the block gets the result) ----
template <typename T>
GSA_DEVICE T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
GSA_DEVICE T warp_max(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    T other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// Sums N values over a block of (32, kWarps) threads; scratch: kWarps * N shared values.
template <int N, typename T>
GSA_DEVICE void block_sum(T (&v)[N], T* scratch) {
  const int lane = threadIdx.x, warp = threadIdx.y;
  for (int n = 0; n < N; ++n) {
    v[n] = warp_sum(v[n]);
    if (lane == 0) scratch[warp * N + n] = v[n];
  }
  __syncthreads();
  for (int n = 0; n < N; ++n) {
    v[n] = T(0);
    for (int w = 0; w < kWarps; ++w) v[n] += scratch[w * N + n];
  }
  __syncthreads();  // scratch is free again
}

template <typename T>
GSA_DEVICE T neg_infinity() {
  return -T(INFINITY);
}

}  // namespace gsa::cuda
