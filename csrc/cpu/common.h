// Helpers shared by the CPU kernels (csrc/cpu/*.cpp): block sizes, dtype plumbing, and the
// small vectorizable loops around the BLAS calls.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>

namespace gsa::cpu {

// Row-block size for x [B, D] against a basis of r columns. A block of y rows ([rows, D] in the
// compute dtype) should stay in the (2 MiB) L2 cache between the two GEMMs that read it, yet be
// tall enough for the GEMMs (oneDNN runs ~2x faster at 128 rows than at 40). When the basis
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

// a [m, k] @ w^T for w [n, k] with contiguous rows -> [m, n]. float32 goes through oneDNN
// (torch's mkldnn::_linear_pointwise): its AVX-512 kernels run ~2x faster than the MKL sgemm
// behind at::mm on CPUs where MKL takes its AVX2 path (AMD). float64, or a torch without
// oneDNN, uses at::mm. oneDNN is only fast with a contiguous w: callers keep that layout.
inline at::Tensor gemm_nt(const at::Tensor& a, const at::Tensor& w) {
  static const std::optional<c10::OperatorHandle> onednn =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  if (a.scalar_type() == at::kFloat && onednn && w.is_contiguous() && a.stride(1) == 1) {
    torch::jit::Stack stack{a, w, c10::IValue(), std::string("none"),
                            c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    onednn->callBoxed(stack);
    return stack[0].toTensor();
  }
  return at::mm(a, w.t());
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

// transpose_last2 of a model tensor (a basis), cached across calls. A model hands the kernels the
// same basis tensor call after call, and transposing a full-PCA basis costs as much as the GEMMs
// that use it. An entry is keyed by the tensor's identity and version counter (an in-place edit
// misses); it holds a reference to its source, so that identity cannot be reused while cached.
// Inference tensors have no version counter: they are transposed on every call.
// a [R, C] or [n, R, C] -> the transpose of its last two dims, contiguous.
template <typename T>
at::Tensor cached_transpose_last2(const at::Tensor& a) {
  auto transpose = [](const at::Tensor& t) {
    return t.dim() == 2 ? transpose_last2<T>(t.unsqueeze(0)).squeeze(0) : transpose_last2<T>(t);
  };
  if (a.is_inference()) return transpose(a);
  struct Entry {
    at::Tensor src, out;
    uint32_t version = 0;
  };
  static std::mutex mutex;
  static std::array<Entry, 4> cache;
  static size_t next = 0;
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (Entry& e : cache) {
      if (e.src.defined() && e.src.use_count() == 1) e = Entry{};  // only we hold it: release
      if (e.src.defined() && e.src.unsafeGetTensorImpl() == a.unsafeGetTensorImpl() &&
          e.version == a._version() && e.src.data_ptr() == a.data_ptr())
        return e.out;
    }
  }
  at::Tensor out = transpose(a);
  std::lock_guard<std::mutex> lock(mutex);
  cache[next] = Entry{a, out, a._version()};
  next = (next + 1) % cache.size();
  return out;
}

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
