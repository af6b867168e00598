"""In-place running averages of one module's parameters into another's (eval EMA, CM target
network, PD stage average), with the tensor lists built once rather than walked per step.

On the CPU, per-tensor kernels cost a few microseconds each however small the tensor: a small
MLP's 30-odd parameters make an average several times slower than one kernel over all of them.
So the parameters of averaged modules are laid end to end in one buffer (flatten_parameters)
and an average of two flat modules is a single lerp_.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def flat_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One 1-D tensor over all of `tensors` when they are contiguous pieces of one storage laid
    end to end in order (as flatten_parameters leaves them), else None."""
    if not tensors:
        return None
    first = tensors[0]
    storage = first.untyped_storage()
    base = storage.data_ptr()
    start = offset = first.storage_offset()
    for t in tensors:
        if (t.dtype != first.dtype or t.device != first.device or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != base or t.storage_offset() != offset):
            return None
        offset += t.numel()
    return first.detach().new_empty(0).set_(storage, start, (offset - start,))


def flatten_parameters(module: nn.Module) -> None:
    """Move the module's parameters into one contiguous buffer, each parameter a view of its
    piece (same values, same Parameter objects). No-op when they already are, or when they
    differ in dtype or device or use another memory layout (channels-last)."""
    params = list(module.parameters())
    if not params or flat_view(params) is not None:
        return
    if (len({(p.dtype, p.device) for p in params}) != 1
            or not all(p.is_contiguous() and p.is_floating_point() for p in params)):
        return
    flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype,
                       device=params[0].device)
    offset = 0
    with torch.no_grad():
        for p in params:
            piece = flat[offset:offset + p.numel()].view_as(p)
            piece.copy_(p)
            p.data = piece
            offset += p.numel()


class ParamAverage:
    """average <- rate * average + (1 - rate) * model over parameters; buffers are copied.

    Holds the Parameter objects themselves, so a module whose tensors are swapped (`.to()`,
    channels-last) is still followed; when both modules are flat (flatten_parameters, applied
    here to both) an update is one kernel.
    """

    def __init__(self, average: nn.Module, model: nn.Module) -> None:
        flatten_parameters(average)
        flatten_parameters(model)
        avg_params, params = list(average.parameters()), list(model.parameters())
        avg_buffers, buffers = list(average.buffers()), list(model.buffers())
        if len(avg_params) != len(params) or len(avg_buffers) != len(buffers):
            raise ValueError("the averaged module and the model differ in structure")
        self.avg_params = avg_params
        self.params = params
        self.avg_buffers = avg_buffers
        self.buffers = buffers
        self._flat: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pointers: list[int] = []  # the parameters' addresses when _flat was made

    def _flat_pair(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat average, flat model) while both stay laid out as when last checked."""
        pointers = [p.data_ptr() for p in self.avg_params] + [p.data_ptr() for p in self.params]
        if pointers != self._pointers:
            self._pointers = pointers
            avg, model = flat_view(self.avg_params), flat_view(self.params)
            same = (avg is not None and model is not None and avg.shape == model.shape
                    and avg.dtype == model.dtype and avg.device == model.device
                    and all(a.shape == p.shape for a, p in zip(self.avg_params, self.params,
                                                                 strict=True)))
            self._flat = (avg, model) if same else None  # type: ignore[assignment]
        return self._flat

    @torch.no_grad()
    def update(self, rate: float) -> None:
        """One averaging step at `rate` (0 copies the model, 1 keeps the average)."""
        if self.avg_params:
            flat = self._flat_pair()
            if flat is not None:
                flat[0].lerp_(flat[1], 1.0 - rate)
            else:
                torch._foreach_lerp_(self.avg_params, self.params, 1.0 - rate)
        if self.avg_buffers:
            torch._foreach_copy_(self.avg_buffers, self.buffers)
