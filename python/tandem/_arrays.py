"""Arrays Tandem's collectives can work on: numpy arrays, and torch tensors seen as numpy arrays.

A contiguous CPU tensor is viewed without a copy (``Tensor.numpy()`` shares its memory; bfloat16 is
seen through ml_dtypes, bool as uint8), so a collective changes the tensor itself. A tensor that
requires grad is read and written through its data, as torch.distributed does. torch is never
imported here: a tensor is recognised by its type's module, so ``import tandem`` works without it.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np


def is_torch_tensor(a: Any) -> bool:
    """Whether ``a`` is a torch tensor (without importing torch)."""
    return type(a).__module__.startswith("torch") and hasattr(a, "data_ptr")


def torch_view(t: Any, what: str = "tensor") -> np.ndarray:
    """A numpy view of the CPU tensor ``t`` sharing its memory.

    Raises ``ValueError`` for a tensor on another device or one that is not contiguous (a copy
    would silently leave the tensor unchanged), ``TypeError`` for a dtype numpy cannot hold.
    """
    import torch

    if t.device.type != "cpu":
        raise ValueError(
            f"{what} is on {t.device}; Tandem's own API takes CPU tensors (use the 'tandem' "
            "torch.distributed backend built with the nccl feature for GPU tensors, or t.cpu())"
        )
    if not t.is_contiguous():
        raise ValueError(
            f"{what} (shape {tuple(t.shape)}) is not contiguous; pass t.contiguous() and copy the result back"
        )
    d = t.detach()
    if d.dtype == torch.bfloat16:
        import ml_dtypes

        bf16: np.ndarray = d.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return bf16
    if d.dtype == torch.bool:
        u8: np.ndarray = d.view(torch.uint8).numpy()
        return u8
    try:
        plain: np.ndarray = d.numpy()
        return plain
    except TypeError as e:
        raise TypeError(f"{what} has dtype {t.dtype}, which Tandem cannot move: {e}") from None


def host_array(a: Any, what: str = "array") -> Tuple[np.ndarray, bool]:
    """``(numpy view, was_torch)`` for a numpy array or a CPU torch tensor; anything else is
    returned as it is for the native layer to name."""
    if is_torch_tensor(a):
        return torch_view(a, what), True
    return a, False


def like_input(result: np.ndarray, was_torch: bool) -> Any:
    """A new result as the caller's kind of array: a torch tensor sharing the numpy array's memory
    when the input was a tensor."""
    if not was_torch:
        return result
    import torch

    if result.dtype.name == "bfloat16":
        return torch.from_numpy(result.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(result)
