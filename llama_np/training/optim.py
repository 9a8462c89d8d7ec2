"""Optimizers, gradient clipping and a learning-rate schedule, with torch's semantics.

    params = dict(model.named_parameters())
    optimizer = AdamW(params, lr=1e-3)
    for step in range(steps):
        loss, grads = value_and_grad(model, input_ids, labels=input_ids)
        clip_grad_norm(grads, max_norm=1.0)
        optimizer.lr = cosine_with_warmup(step, 1e-3, warmup_steps=10, total_steps=steps)
        optimizer.step(grads)                         # updates the model's weights in place

Parameters and gradients are dicts from a parameter name to an array (``named_parameters`` and
``value_and_grad`` give them so); ``step`` changes the parameter arrays themselves, which are
the arrays the model's next forward pass reads.
"""

from __future__ import annotations

import math

import numpy as np

from llama_np.errors import InputError


def _parameters(params) -> dict[str, np.ndarray]:
    """A dict name -> array from a dict or from (name, array) pairs, each array writable."""
    parameters = dict(params)
    for name, value in parameters.items():
        if not (isinstance(value, np.ndarray) and value.flags.writeable):
            raise InputError(f"parameter {name!r} is not a writable NumPy array; pass model.named_parameters()")
    return parameters


def _check_grads(parameters: dict, grads: dict) -> None:
    for name, value in parameters.items():
        if name not in grads:
            raise InputError(f"step: no gradient for parameter {name!r}")
        if np.shape(grads[name]) != value.shape:
            raise InputError(f"step: the gradient of {name!r} has shape {np.shape(grads[name])}, "
                             f"the parameter {value.shape}")


class SGD:
    """Stochastic gradient descent as ``torch.optim.SGD`` (momentum, L2 weight decay).

        g = grad + weight_decay · θ
        b = momentum · b + g        (b = g at the first step)
        θ = θ − lr · b              (θ − lr · g without momentum)
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = _parameters(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: dict[str, np.ndarray] = {}

    def step(self, grads: dict) -> None:
        """Update every parameter in place from its gradient."""
        _check_grads(self.params, grads)
        for name, theta in self.params.items():
            g = np.asarray(grads[name], dtype=theta.dtype)
            if self.weight_decay:
                g = g + theta.dtype.type(self.weight_decay) * theta
            if self.momentum:
                if name in self.buffers:
                    self.buffers[name] = self.buffers[name] * theta.dtype.type(self.momentum) + g
                else:
                    self.buffers[name] = g.copy()
                g = self.buffers[name]
            theta -= theta.dtype.type(self.lr) * g


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as ``torch.optim.AdamW``.

    At step t, for each parameter θ with gradient g:

        θ = θ · (1 − lr · weight_decay)                 the decay, apart from the gradient
        m = β1 · m + (1 − β1) · g                       first moment
        v = β2 · v + (1 − β2) · g²                      second moment
        θ = θ − (lr / (1 − β1^t)) · m / (sqrt(v) / sqrt(1 − β2^t) + eps)

    in the order torch's single-tensor implementation rounds it. ``lr`` may be changed between
    steps (a schedule); the moments live in ``self.exp_avg`` and ``self.exp_avg_sq``.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        self.params = _parameters(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.exp_avg = {name: np.zeros_like(value) for name, value in self.params.items()}
        self.exp_avg_sq = {name: np.zeros_like(value) for name, value in self.params.items()}
        self.t = 0

    def step(self, grads: dict) -> None:
        """Update every parameter in place from its gradient."""
        _check_grads(self.params, grads)
        self.t += 1
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1 ** self.t
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** self.t)
        step_size = self.lr / bias_correction1
        for name, theta in self.params.items():
            f = theta.dtype.type
            g = np.asarray(grads[name], dtype=theta.dtype)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            theta *= f(1 - self.lr * self.weight_decay)
            m += (g - m) * f(1 - beta1)  # torch's lerp: m + (1 − β1)(g − m)
            v *= f(beta2)
            v += f(1 - beta2) * g * g
            denominator = np.sqrt(v) / f(bias_correction2_sqrt) + f(self.eps)
            theta -= f(step_size) * (m / denominator)


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale every gradient in place so that their global L2 norm is at most ``max_norm``.

        total = sqrt(Σ over all gradients of Σ g²),   g = g · min(1, max_norm / (total + 1e-6))

    as ``torch.nn.utils.clip_grad_norm_``. Returns the norm before clipping.
    """
    total = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    coefficient = min(1.0, max_norm / (total + 1e-6))
    if coefficient < 1.0:
        for g in grads.values():
            g *= g.dtype.type(coefficient)
    return total


def cosine_with_warmup(step: int, peak_lr: float, warmup_steps: int, total_steps: int,
                       min_lr: float = 0.0) -> float:
    """The learning rate at ``step`` (from 0): a linear warmup, then a half cosine down to min_lr.

        step < warmup:  peak_lr · step / warmup
        after:          min_lr + (peak_lr − min_lr) · ½ (1 + cos(π · progress)),
                        progress = (step − warmup) / (total − warmup), at most 1

    With min_lr = 0 this is Transformers' ``get_cosine_schedule_with_warmup`` up to total_steps;
    after it, Transformers' cosine climbs back up, this one stays at min_lr.
    """
    if step < warmup_steps:
        return peak_lr * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
