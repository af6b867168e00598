"""Jacobian-vector products of a network, for the continuous-time objectives (sCM, MeanFlow).

`jvp(fn, primals, tangents)` returns fn(*primals) and its directional derivative along
tangents, either by forward-mode automatic differentiation (torch.func.jvp: exact, about the
cost of two forward passes) or by a central finite difference (two more forward passes; for
networks or kernels without forward-mode rules). Both run every pass of fn from the same RNG
state, so dropout draws one mask for all of them.

Under autocast (train.precision bf16 / fp16) both run in float32 with autocast off: forward-mode
AD through autocast gives some tangents another dtype than their primals (group_norm of a bf16
input: a bf16 output with a float32 tangent), which the next convolution refuses; and a finite
difference in 16-bit arithmetic would be mostly rounding. The JVP target is the stop-gradient
side of the objective, so only its cost changes, not what is trained in reduced precision.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch.func import jvp as forward_jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

JVPMode = Literal["forward", "finite_difference"]
JVP_MODES: tuple[str, ...] = ("forward", "finite_difference")

Fn = Callable[..., torch.Tensor]


@contextlib.contextmanager
def attention_with_forward_ad() -> Iterator[None]:
    """Scaled-dot-product attention through its math backend, whose operations all have
    forward-mode rules (the fused kernels have none: flash and memory-efficient on CUDA, flash
    on the CPU)."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.is_floating_point() else x


def _devices(primals: tuple[torch.Tensor, ...]) -> list[torch.device]:
    return sorted({p.device for p in primals if p.device.type == "cuda"}, key=str)


def jvp(fn: Fn, primals: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...],
        mode: JVPMode = "forward", eps: float = 1e-3,
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(*primals), d/dh fn(*(p + h t)) at h = 0). Gradients do not flow through the result:
    call it under torch.no_grad() for a stop-gradient target. `eps` is the finite difference's
    step along the tangent (relative to each tangent's scale)."""
    if len(primals) != len(tangents):
        raise ValueError(f"{len(primals)} primals but {len(tangents)} tangents")
    device = primals[0].device
    if torch.is_autocast_enabled(device.type):
        with torch.autocast(device.type, enabled=False):
            return jvp(fn, tuple(_fp32(p) for p in primals), tuple(_fp32(t) for t in tangents),
                       mode, eps)
    if mode == "forward":
        with attention_with_forward_ad(), warnings.catch_warnings():
            # torch's first forward-mode call loads its JVP decompositions through
            # torch.jit.script, which warns about its own deprecation: not the user's concern
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated",
                                    category=FutureWarning)
            out, tangent = forward_jvp(fn, primals, tangents)[:2]
        return out, tangent
    if mode != "finite_difference":
        raise ValueError(f"unknown JVP mode {mode!r}; valid: {', '.join(JVP_MODES)}")
    devices = _devices(primals)
    with torch.random.fork_rng(devices=devices):
        out = fn(*primals)
    with torch.random.fork_rng(devices=devices):
        plus = fn(*(p + eps * t for p, t in zip(primals, tangents, strict=True)))
    with torch.random.fork_rng(devices=devices):
        minus = fn(*(p - eps * t for p, t in zip(primals, tangents, strict=True)))
    return out, (plus - minus) / (2 * eps)
