"""LARS, as the official linear probe runs it (MAE's ``main_linprobe.py``, which takes MoCo v3's).

For every parameter with more than one dimension (the head's weight)::

    g <- g + weight_decay * p
    g <- g * trust_coefficient * ||p|| / ||g||     (factor 1 when ||p|| or ||g|| is 0)

Parameters with one dimension or none (biases, norms) get neither weight decay nor the scaling.
Then SGD with momentum, without dampening or Nesterov::

    mu <- momentum * mu + g;   p <- p - lr * mu

One addition, for long unattended runs: a step whose gradients hold a non-finite value changes
nothing (weights and momentum stay) and sets ``last_step_skipped``; trainers count those like
DeepSpeed's skipped steps and stop (or rewind) after too many in a row. Each step also leaves the
gradients' global L2 norm (before weight decay and scaling) in ``_global_grad_norm``, a device
tensor: DeepSpeed's engine hands it on as ``get_global_grad_norm()`` (it computes none itself
without clipping), and the step's metrics row carries it in its one collective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class LARS(torch.optim.Optimizer):
    """SGD + momentum with layer-wise adaptive rate scaling of multi-dimensional parameters."""

    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict], lr: float = 0.0,
                 weight_decay: float = 0.0, momentum: float = 0.9, trust_coefficient: float = 0.001) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "trust_coefficient": trust_coefficient}
        super().__init__(params, defaults)
        self.last_step_skipped = False
        self._global_grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads:  # on the device: nothing is read here
            self._global_grad_norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        # one device sync for the whole check; the head has two tensors
        self.last_step_skipped = bool(grads) and not bool(
            torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if self.last_step_skipped:
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = torch.where((p_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * p_norm / u_norm, torch.ones_like(p_norm))
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss
