"""Gradient compression in Horovod's shape: ``compress`` before the allreduce, ``decompress``
after. fp16 and bf16 halve the bytes on the wire; the sum itself is done by Tandem in the wire
dtype. ``Compression.topk(fraction)`` and ``Compression.powersgd(rank)`` keep state per gradient
bucket (the residual of error feedback, PowerSGD's warm start) and run their own allreduce, so
they serve :func:`tandem.torch.DistributedOptimizer` (one instance per optimizer), as do
``Compression.auto()`` (bf16 where the group's links make it pay, else nothing) and
``Compression.setting(name)`` (any of Tandem's settings, summed in float32)."""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Mapping, Optional, Protocol, Sequence, Tuple

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
    """One of Tandem's own settings (top-k or PowerSGD with error feedback, bf16/fp16 summed in
    float32, auto) run by Tandem's ring: each bucket of gradients keeps a native
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
            f"{self.setting} runs its own allreduce per gradient bucket (keeping any residual "
            "across steps): use it through "
            "tandem.torch.DistributedOptimizer(..., compression=...), not a one-off allreduce"
        )

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor

    def reduce(self, pg: Any, flat: torch.Tensor, op: str, key: int,
               parts: Optional[Sequence[Tuple[int, Sequence[int]]]] = None) -> None:
        """Allreduces the contiguous CPU tensor ``flat`` (bucket ``key``) in place with ``op``
        (sum or avg) through this bucket's compressor. ``parts`` lists the bucket's tensors in
        order, as (index among the optimizer's parameters, shape): PowerSGD compresses each
        matrix (2 or more dimensions, seen as its first dimension by the rest, as torch's
        PowerSGD hook does) with its own compressor, keyed by that index, and sums the vectors
        exactly; the other settings take the bucket whole."""
        work = flat if flat.dtype == torch.float32 else flat.float()
        if parts is not None and self.setting.startswith("powersgd"):
            self._reduce_matrices(pg, work, op, parts)
        else:
            pg.allreduce_compressed(torch_view(work), op, self._compressor(key, 0), None)
        if work is not flat:
            flat.copy_(work)

    def _compressor(self, key: int, columns: int) -> Any:
        c = self._state.get(key)
        if c is None:
            c = self._state[key] = _native.Compressor(self.setting, columns)
        return c

    def _reduce_matrices(self, pg: Any, work: torch.Tensor, op: str,
                         parts: Sequence[Tuple[int, Sequence[int]]]) -> None:
        matrices, compressors, vectors, pos = [], [], [], 0
        for index, shape in parts:
            n = math.prod(shape)
            piece = torch_view(work[pos:pos + n])
            if len(shape) >= 2 and n > 0:
                matrices.append(piece)
                compressors.append(self._compressor(index, n // shape[0]))
            elif n > 0:
                vectors.append(piece)
            pos += n
        pg.allreduce_powersgd(matrices, compressors, vectors, op, None)

    def state_dict(self) -> Dict[int, bytes]:
        """Each bucket's residual and warm start, as bytes."""
        return {k: c.state() for k, c in self._state.items()}

    def load_state_dict(self, state: Mapping[Any, bytes]) -> None:
        """Restores what :meth:`state_dict` saved."""
        self._state = {int(k): _native.Compressor.restore(v) for k, v in state.items()}


def shared_states(root: Mapping[Any, bytes], own: Mapping[Any, bytes]) -> Dict[int, bytes]:
    """Each bucket's state as a process should hold it after taking ``root``'s: the root's
    settings and PowerSGD warm start (every process must start from the same ``Q``, or their
    factors do not add up), and this process's own residual from ``own`` (each process's error
    feedback owes its own gradients; a process without one, e.g. a new member, owes nothing)."""
    own_by_key = {int(k): v for k, v in own.items()}
    out: Dict[int, bytes] = {}
    for k, blob in root.items():
        state = json.loads(blob)  # the fields of tandem's Compressor, serialised by serde
        mine = own_by_key.get(int(k))
        state["residual"] = json.loads(mine)["residual"] if mine is not None else []
        out[int(k)] = json.dumps(state).encode()
    return out


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
        """Rank-``rank`` factors of each matrix (each parameter of 2 or more dimensions, as
        torch's PowerSGD hook sees it), with error feedback; vectors are sent exactly."""
        return ReducingCompressor(f"powersgd:{rank}")

    @staticmethod
    def auto() -> ReducingCompressor:
        """What the group measured when it formed: bf16 where its links make it pay, else none
        (see :func:`tandem.auto_compression`)."""
        return ReducingCompressor("auto")

    @staticmethod
    def setting(name: str) -> Any:
        """The compressor for one of Tandem's settings as ``TANDEM_COMPRESSION`` spells it (none,
        fp16, bf16, topk:FRACTION, powersgd:RANK, auto); a bad one is a ValueError naming it."""
        if name == "none":
            return NoneCompressor
        return ReducingCompressor(name)
