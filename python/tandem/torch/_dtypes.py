"""How the tandem backend reduces each torch dtype, on the CPU (``_ops``) and on CUDA (``_cuda``)
alike: the dtypes reduced as they are (by the name Tandem's native layer reads), those widened to
int32 and narrowed back, and bool reduced as uint8 (SUM and MAX are logical or, MIN and PRODUCT
logical and)."""

from __future__ import annotations

import torch

#: Reduced as they are, by the name Tandem's native layer reads.
NATIVE = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.uint8: "uint8",
}
#: Reduced in a wider type and narrowed back (torch's own integer sums wrap around alike).
WIDENED = {torch.int8: torch.int32, torch.int16: torch.int32}


def bool_op(op: str) -> str:
    """The uint8 operator that reduces bool tensors as ``op`` does; ValueError for AVG."""
    ops = {"sum": "max", "max": "max", "min": "min", "prod": "min"}
    if op not in ops:
        raise ValueError(f"reduce op {op} has no meaning for bool tensors (SUM, MIN, MAX, PRODUCT do)")
    return ops[op]


def cannot_reduce(dtype: torch.dtype) -> TypeError:
    """The error for a dtype the backend does not reduce."""
    return TypeError(
        f"the tandem backend cannot reduce {dtype}; it reduces float16, bfloat16, float32, "
        "float64, int8, int16, int32, int64, uint8 and bool"
    )
