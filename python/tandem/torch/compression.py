"""Gradient compression in Horovod's shape: ``compress`` before the allreduce, ``decompress``
after. fp16 and bf16 halve the bytes on the wire; the sum itself is done by Tandem in the wire
dtype."""

from __future__ import annotations

from typing import Any, Protocol, Tuple

import torch


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


class Compression:
    """The compressors, as Horovod names them: ``Compression.none``, ``.fp16``, ``.bf16``."""

    none = NoneCompressor
    fp16 = FP16Compressor
    bf16 = BF16Compressor
