"""Float32 dots on tensor cores without losing float32 accuracy: the 3xTF32 split, written out.

A tensor core multiplies TF32 operands (10 explicit mantissa bits) exactly and accumulates in
float32. Splitting each float32 operand into a TF32 "hi" part and the TF32 rounding of the rest,
a = a_hi + a_lo, and summing a_hi b_hi + a_hi b_lo + a_lo b_hi (small terms first) leaves out only
a_lo b_lo and the rounding of a_lo, b_lo: about 2^-21 relative per product against float32's
2^-24, at three tensor-core dots instead of float32 FMA (H100/H200: ~495 dense TF32 TFLOP/s, so
~165 effective, against ~67 for float32 FMA).

The split is explicit rather than `input_precision="tf32x3"` so that the Triton interpreter,
which ignores input_precision and multiplies in float32, computes exactly the products the GPU
computes: the conformance suite verifies the tensor-core arithmetic on CPU.
"""
import triton
import triton.language as tl


@triton.jit
def _round_tf32(a):
    """a rounded to nearest (ties away) at 10 mantissa bits: what a tensor core reads as TF32."""
    bits = a.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b. PRECISION: "split3" (3xTF32, float32 operands), else tl.dot's input_precision."""
    if PRECISION == "split3":
        a_hi = _round_tf32(a)
        b_hi = _round_tf32(b)
        a_lo = _round_tf32(a - a_hi)
        b_lo = _round_tf32(b - b_hi)
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc
