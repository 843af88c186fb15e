// Helpers shared by the CPU kernels (csrc/cpu/*.cpp): block sizes, dtype plumbing, and the
// small vectorizable loops around the BLAS calls.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "gemm.h"
#include "isa.h"

namespace gsa::cpu {

// Row-block size for x [B, D] against a basis of r columns. A block of y rows ([rows, D] in the
// compute dtype) should stay near the core (L2, else the shared L3) between the two GEMMs that
// read it, yet be tall enough for the GEMMs (oneDNN runs ~1.5x faster at 128 rows than at 32;
// 128 to 512 rows measured alike for G1 on this machine's 1 MiB L2). When the basis
// itself is far larger than L2 (full PCA), each block streams it from memory twice, so blocks
// grow to one per thread: then the GEMMs are tall enough to be compute-bound.
inline int64_t row_block(int64_t B, int64_t D, int64_t r, int64_t elem_size) {
  constexpr int64_t kL2Budget = 1536 * 1024;  // bytes of the y block: 128 rows at D = 3072
  int64_t rows = std::clamp<int64_t>(kL2Budget / std::max<int64_t>(1, D * elem_size), 16, 256);
  if (D * r * elem_size > 8 * kL2Budget) {
    const int64_t per_thread = (B + at::get_num_threads() - 1) / at::get_num_threads();
    rows = std::max(rows, std::min<int64_t>(per_thread, 256));
  }
  return rows;
}

// a [n, R, C] -> [n, C, R], contiguous, in 8 x 8 tiles, parallel. (A strided copy of the
// transposed view walks one side with a stride of C elements: ~10x slower at D = 3072.)
template <typename T>
at::Tensor transpose_last2(const at::Tensor& a) {
  const int64_t n = a.size(0), R = a.size(1), C = a.size(2);
  at::Tensor out = at::empty({n, C, R}, a.options());
  const T* src = a.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  constexpr int64_t kTile = 8;  // 8 strided lines per tile: power-of-two strides alias in L1 sets
  const int64_t row_tiles = (R + kTile - 1) / kTile;
  at::parallel_for(0, n * row_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / row_tiles, r0 = (t % row_tiles) * kTile, r1 = std::min(R, r0 + kTile);
      const T* s = src + b * R * C;
      T* d = dst + b * R * C;
      for (int64_t c0 = 0; c0 < C; c0 += kTile) {
        const int64_t c1 = std::min(C, c0 + kTile);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = c0; c < c1; ++c) d[c * R + r] = s[r * C + c];
      }
    }
  });
  return out;
}

// U^T with contiguous rows ([r, D]) of a basis U [D, r] (float or double): what gemm_nt wants
// for x U.
inline at::Tensor basis_rows(const at::Tensor& basis) {
  return AT_DISPATCH_FLOATING_TYPES(basis.scalar_type(), "basis_rows", [&] {
    return transpose_last2<scalar_t>(basis.unsqueeze(0)).squeeze(0);
  });
}

// A GEMM-ready layout (basis_rows, mixture panels) is derived from model tensors. The model owns
// it (gsa_kernels/_core/_layouts.py builds it with the layout ops, keeps it beside its tensors while
// their contents are unchanged, and passes it in); without one the kernel builds its own for the
// call (mixture panels) or reads the model tensor as it is (basis_rows: U^T as a view). A given
// layout is checked here for sizes, dtype, device and contiguity; its contents are
// the model's responsibility.
inline at::Tensor layout_or(const std::optional<at::Tensor>& given, const at::Tensor& like,
                            at::IntArrayRef sizes, const char* name, const char* op,
                            const std::function<at::Tensor()>& make) {
  if (!given.has_value()) return make();
  const at::Tensor& t = *given;
  TORCH_CHECK_VALUE(t.sizes() == sizes && t.scalar_type() == like.scalar_type() &&
                        t.device() == like.device() && t.is_contiguous(),
                    op, ": ", name, " must be a contiguous ", like.scalar_type(), " tensor of size ",
                    sizes, " on ", like.device(), ", got ", t.scalar_type(), " ", t.sizes());
  return t;
}

// at::empty for the kernels' outputs; large ones come from output_memory.cpp (huge pages, and a
// small cache of recently freed buffers). The contents are uninitialised, as with at::empty.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

template <typename T>
at::TensorOptions options_for() {
  return at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
}

// dst[i] = src[i] converted (fp16/bf16 <-> float, or a plain copy).
template <typename To, typename From>
inline void convert_row(To* __restrict dst, const From* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<To>(src[i]);
}

}  // namespace gsa::cpu
