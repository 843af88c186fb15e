// Warp-level tile products for the CUDA kernels: float32 on tensor cores without losing float32
// accuracy (the 3xTF32 split of gsa_kernels/triton/_dot.py: each operand a = hi + lo, both TF32,
// and acc += lo*hi + hi*lo + hi*hi; ~2^-21 relative per product), through mma.sync m16n8k8 .tf32
// on sm_80 and newer. Every other build -- the host SIMT emulation, older archs, the host pass of
// nvcc -- computes the same split products with scalar code: products of TF32 values are exact
// in float32, so the emulated tests check the tensor cores' arithmetic and only the order of the
// float32 sums differs. double tiles are plain scalar products (exact FMA work).
#pragma once
#include "kernel_common.cuh"

namespace gsa::cuda {

// a rounded to TF32 (10 explicit mantissa bits, to nearest, ties away): the bits a tensor core
// reads, the same as _round_tf32 in gsa_kernels/triton/_dot.py.
GSA_DEVICE float round_tf32(float a) {
  uint32_t u;
  memcpy(&u, &a, sizeof u);
  u = (u + 0x1000u) & 0xFFFFE000u;
  memcpy(&a, &u, sizeof u);
  return a;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
GSA_DEVICE void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// c += A B for one 16 x 8 x 8 tile of the warp: A(m, k) (m < 16, k < 8) and B(k, n) (n < 8) are
// read through the functors a and b (shared memory; every lane calls this, warp-uniformly).
// c is this lane's part of C in mma's fragment layout: c[q] = C(g + 8 (q / 2), 2 t + q % 2),
// g = lane / 4, t = lane % 4.
template <typename Acc, typename FA, typename FB>
GSA_DEVICE void mma_16x8x8(Acc (&c)[4], int lane, FA a, FB b) {
  const int g = lane >> 2, t = lane & 3;
  if constexpr (sizeof(Acc) == sizeof(double)) {
    for (int q = 0; q < 4; ++q)
      for (int k = 0; k < 8; ++k) c[q] += a(g + 8 * (q >> 1), k) * b(k, 2 * t + (q & 1));
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // fragments (PTX ISA, mma.m16n8k8 .tf32): a0 (g, t), a1 (g + 8, t), a2 (g, t + 4),
    // a3 (g + 8, t + 4); b0 (t, g), b1 (t + 4, g)
    const float av[4] = {a(g, t), a(g + 8, t), a(g, t + 4), a(g + 8, t + 4)};
    const float bv[2] = {b(t, g), b(t + 4, g)};
    uint32_t a_hi[4], a_lo[4], b_hi[2], b_lo[2];
    for (int i = 0; i < 4; ++i) {
      const float hi = round_tf32(av[i]);
      a_hi[i] = __float_as_uint(hi);
      a_lo[i] = __float_as_uint(round_tf32(av[i] - hi));
    }
    for (int i = 0; i < 2; ++i) {
      const float hi = round_tf32(bv[i]);
      b_hi[i] = __float_as_uint(hi);
      b_lo[i] = __float_as_uint(round_tf32(bv[i] - hi));
    }
    mma_tf32(c, a_lo, b_hi);  // small terms first
    mma_tf32(c, a_hi, b_lo);
    mma_tf32(c, a_hi, b_hi);
#else
    for (int q = 0; q < 4; ++q) {
      const int m = g + 8 * (q >> 1), n = 2 * t + (q & 1);
      float a_hi[8], a_lo[8], b_hi[8], b_lo[8];
      for (int k = 0; k < 8; ++k) {
        a_hi[k] = round_tf32(a(m, k));
        a_lo[k] = round_tf32(a(m, k) - a_hi[k]);
        b_hi[k] = round_tf32(b(k, n));
        b_lo[k] = round_tf32(b(k, n) - b_hi[k]);
      }
      const float* pairs[3][2] = {{a_lo, b_hi}, {a_hi, b_lo}, {a_hi, b_hi}};  // as the three mma
      for (int s = 0; s < 3; ++s) {
        float sum = 0;  // a tensor core adds the 8 (exact) products, then the accumulator
        for (int k = 0; k < 8; ++k) sum += pairs[s][0][k] * pairs[s][1][k];
        c[q] += sum;
      }
    }
#endif
  }
}

}  // namespace gsa::cuda
