"""Exponential moving average (EMA) of model weights, with warm-up.

Diffusion models are usually evaluated and sampled with an EMA of their weights
(Ho et al. 2020, Appendix B, decay 0.9999). A fixed decay of 0.9999 needs ~10^4 updates
before the average forgets the random initialisation: evaluated earlier, the "EMA model" is
mostly noise. The warm-up decay min(decay, (1 + n) / (10 + n)) after n updates (as in
TensorFlow's ExponentialMovingAverage with num_updates) makes the average follow the live
weights closely at first and approach ``decay`` as training goes on.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / compiled wrapper, if any."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class EMA:
    """EMA of a model's floating-point parameters; buffers (e.g. norm statistics) are copied."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        model = _unwrap(model)
        self.names = [n for n, p in model.named_parameters()]
        self.shadow = [p.detach().clone().float() for p in model.parameters()]
        self.buffer_names = [n for n, _ in model.named_buffers()]
        self.buffers = [b.detach().clone() for b in model.buffers()]

    def current_decay(self) -> float:
        """Decay used by the next update: min(decay, (1 + n) / (10 + n)) with warm-up."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * live, i.e. a lerp towards the live weights."""
        model = _unwrap(model)
        weight = 1.0 - self.current_decay()
        live = [p.detach().float() for p in model.parameters()]
        # One fused kernel per device instead of one small kernel per tensor.
        torch._foreach_lerp_(self.shadow, live, weight)
        for own, theirs in zip(self.buffers, model.buffers(), strict=True):
            own.copy_(theirs)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into ``model`` (e.g. a separate copy used for sampling)."""
        model = _unwrap(model)
        for p, s in zip(model.parameters(), self.shadow, strict=True):
            p.copy_(s)
        for b, s in zip(model.buffers(), self.buffers, strict=True):
            b.copy_(s)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """Context manager: ``model`` holds the EMA weights inside, its live weights after."""
        inner = _unwrap(model)
        live = [p.detach().clone() for p in inner.parameters()]
        live_buffers = [b.detach().clone() for b in inner.buffers()]
        self.copy_to(inner)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, saved in zip(inner.parameters(), live, strict=True):
                    p.copy_(saved)
                for b, saved in zip(inner.buffers(), live_buffers, strict=True):
                    b.copy_(saved)

    @torch.no_grad()
    def distance(self, model: nn.Module) -> float:
        """Relative L2 distance ||ema - live|| / ||live|| over all parameters (a diagnostic)."""
        model = _unwrap(model)
        diff = sum(
            ((s - p.float()) ** 2).sum()
            for s, p in zip(self.shadow, model.parameters(), strict=True)
        )
        norm = sum((p.float() ** 2).sum() for p in model.parameters())
        return float((diff / norm.clamp(min=1e-30)).sqrt())

    def to(self, device) -> EMA:
        """Move the EMA tensors to ``device``."""
        self.shadow = [s.to(device) for s in self.shadow]
        self.buffers = [b.to(device) for b in self.buffers]
        return self

    def state_dict(self) -> dict:
        """Plain tensors and numbers only, so it loads with ``torch.load(weights_only=True)``."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": dict(zip(self.names, self.shadow, strict=True)),
            "buffers": dict(zip(self.buffer_names, self.buffers, strict=True)),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; the parameter names must match this model's."""
        missing = set(self.names) ^ set(state["shadow"])
        if missing:
            raise ValueError(
                f"EMA state does not match the model; differing parameters: {sorted(missing)[:5]}"
            )
        self.decay, self.warmup = state["decay"], state["warmup"]
        self.num_updates = int(state["num_updates"])
        device = self.shadow[0].device if self.shadow else "cpu"
        self.shadow = [state["shadow"][n].to(device).float() for n in self.names]
        self.buffers = [state["buffers"][n].to(device) for n in self.buffer_names]
