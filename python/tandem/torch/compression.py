"""Gradient compression in Horovod's shape: ``compress`` before the allreduce, ``decompress``
after. fp16 and bf16 halve the bytes on the wire; the sum itself is done by Tandem in the wire
dtype. ``Compression.topk(fraction)`` and ``Compression.powersgd(rank)`` keep state per gradient
bucket (the residual of error feedback, PowerSGD's warm start) and run their own allreduce, so
they serve :func:`tandem.torch.DistributedOptimizer` (one instance per optimizer)."""

from __future__ import annotations

from typing import Any, Dict, Protocol, Tuple

import torch

from .. import _native
from .._arrays import torch_view


class Compressor(Protocol):
    """What a compressor offers (any class with these two methods works, as in Horovod): compress a
    tensor for the wire, and restore it afterwards from what ``compress`` returned."""

    def compress(self, tensor: torch.Tensor) -> Tuple[torch.Tensor, Any]: ...

    def decompress(self, tensor: torch.Tensor, ctx: Any) -> torch.Tensor: ...


class NoneCompressor:
    """Sends tensors as they are."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor


class _Cast:
    wire: torch.dtype = torch.float16

    @classmethod
    def compress(cls, tensor: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        if tensor.dtype.is_floating_point and tensor.dtype != cls.wire:
            return tensor.to(cls.wire), tensor.dtype
        return tensor, None

    @classmethod
    def decompress(cls, tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor.to(ctx) if ctx is not None else tensor


class FP16Compressor(_Cast):
    """Floating-point tensors travel as float16."""

    wire = torch.float16


class BF16Compressor(_Cast):
    """Floating-point tensors travel as bfloat16 (float32's range, so no overflow)."""

    wire = torch.bfloat16


class ReducingCompressor:
    """Top-k or PowerSGD with error feedback: each bucket of gradients keeps a native
    :class:`tandem.Compressor` (its residual and warm start) across steps, and is allreduced
    through it (float32 on the way; other float dtypes are widened and narrowed back).
    :meth:`state_dict` and :meth:`load_state_dict` save and restore that state with a checkpoint."""

    reduces = True

    def __init__(self, setting: str) -> None:
        _native.Compressor(setting)  # refuses a bad setting now, naming it
        self.setting = setting
        self._state: Dict[int, Any] = {}

    def compress(self, tensor: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        raise ValueError(
            f"{self.setting} keeps a residual per gradient across steps: use it through "
            "tandem.torch.DistributedOptimizer(..., compression=...), not a one-off allreduce"
        )

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor

    def reduce(self, pg: Any, flat: torch.Tensor, op: str, key: int) -> None:
        """Allreduces the contiguous CPU tensor ``flat`` (bucket ``key``) in place with ``op``
        (sum or avg) through this bucket's compressor."""
        c = self._state.get(key)
        if c is None:
            c = self._state[key] = _native.Compressor(self.setting)
        work = flat if flat.dtype == torch.float32 else flat.float()
        pg.allreduce_compressed(torch_view(work), op, c, None)
        if work is not flat:
            flat.copy_(work)

    def state_dict(self) -> Dict[int, bytes]:
        """Each bucket's residual and warm start, as bytes."""
        return {k: c.state() for k, c in self._state.items()}

    def load_state_dict(self, state: Dict[int, bytes]) -> None:
        """Restores what :meth:`state_dict` saved."""
        self._state = {int(k): _native.Compressor.restore(v) for k, v in state.items()}


class Compression:
    """The compressors, as Horovod names them: ``Compression.none``, ``.fp16``, ``.bf16``; and
    ``Compression.topk(fraction)``, ``Compression.powersgd(rank)`` (error feedback, per bucket)."""

    none = NoneCompressor
    fp16 = FP16Compressor
    bf16 = BF16Compressor

    @staticmethod
    def topk(fraction: float) -> ReducingCompressor:
        """The largest ``fraction`` of each bucket's elements, the rest owed to the next steps."""
        return ReducingCompressor(f"topk:{fraction}")

    @staticmethod
    def powersgd(rank: int) -> ReducingCompressor:
        """Rank-``rank`` factors of each bucket seen as a matrix, with error feedback."""
        return ReducingCompressor(f"powersgd:{rank}")
