"""In-place running averages of one module's parameters into another's (eval EMA, CM target
network, PD stage average), with the tensor lists built once rather than walked per step."""

from __future__ import annotations

import torch
from torch import nn


class ParamAverage:
    """average <- rate * average + (1 - rate) * model over parameters; buffers are copied.

    Both modules must keep their tensors (load_state_dict copies in place, so it is safe);
    build a new ParamAverage if either module is replaced.
    """

    def __init__(self, average: nn.Module, model: nn.Module) -> None:
        avg_params, params = list(average.parameters()), list(model.parameters())
        avg_buffers, buffers = list(average.buffers()), list(model.buffers())
        if len(avg_params) != len(params) or len(avg_buffers) != len(buffers):
            raise ValueError("the averaged module and the model differ in structure")
        self.avg_params = avg_params
        self.params = [p.detach() for p in params]
        self.avg_buffers = avg_buffers
        self.buffers = buffers

    @torch.no_grad()
    def update(self, rate: float) -> None:
        """One averaging step at `rate` (0 copies the model, 1 keeps the average)."""
        if self.avg_params:
            torch._foreach_lerp_(self.avg_params, self.params, 1.0 - rate)
        if self.avg_buffers:
            torch._foreach_copy_(self.avg_buffers, self.buffers)
