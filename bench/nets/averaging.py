"""In-place running averages of one module's parameters into another's (eval EMA, CM target
network, PD stage average): one multi-tensor lerp over all parameters (torch.optim.swa_utils'
EMA update), the tensor lists made once."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class ParamAverage:
    """average <- rate * average + (1 - rate) * model over parameters; buffers are copied.

    Holds the Parameter objects themselves, so a module whose tensors are swapped (`.to()`,
    channels-last) is still followed.
    """

    def __init__(self, average: nn.Module, model: nn.Module) -> None:
        avg_params, params = list(average.parameters()), list(model.parameters())
        avg_buffers, buffers = list(average.buffers()), list(model.buffers())
        if (len(avg_params) != len(params) or len(avg_buffers) != len(buffers)
                or any(a.shape != p.shape for a, p in zip(avg_params, params, strict=True))):
            raise ValueError("the averaged module and the model differ in structure")
        self.average_params, self.model_params = avg_params, params
        self.buffers = list(zip(avg_buffers, buffers, strict=True))

    @torch.no_grad()
    def update(self, rate: float) -> None:
        """One averaging step at `rate` (0 copies the model, 1 keeps the average): lerp with
        weight 1 - rate, the same bits as one lerp_ per parameter in one call (a multi-tensor
        kernel on the GPU instead of a launch per parameter)."""
        if self.average_params:
            get_ema_multi_avg_fn(rate)(self.average_params, self.model_params, None)
        for average_buffer, buffer in self.buffers:
            average_buffer.copy_(buffer)
