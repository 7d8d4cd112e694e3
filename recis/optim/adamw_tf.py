"""``AdamWTF``: TensorFlow-style AdamW for dense parameters (RecIS's ``recis.optim.AdamWTF``),
the dense twin of :class:`~recis.optim.SparseAdamWTF`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["AdamWTF"]


class AdamWTF(torch.optim.Optimizer):
    r"""AdamW with TensorFlow's decoupled decay and epsilon placement, per parameter:

    .. math::
        \theta &\leftarrow \theta (1 - \lambda) \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        \theta &\leftarrow \theta - \mathrm{lr} \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
            \frac{m}{\sqrt{v} + \epsilon}

    The decay is ``1 - weight_decay`` per step, without the learning-rate factor of
    ``torch.optim.AdamW``, and epsilon is added to ``sqrt(v)`` before the bias correction is
    folded into the step size. ``t`` counts the steps in which the parameter had a gradient.
    Parameters without a gradient are skipped. Works with LR schedulers (``lr`` lives in the
    param groups).

    Args:
        params: parameters or param groups. lr (float): Default: 1e-3.
        betas (tuple[float, float]): Default: (0.9, 0.999). eps (float): Default: 1e-8.
        weight_decay (float): decay per step, in [0, 1). Default: 1e-2.
        use_nesterov (bool): not supported (True raises), as in RecIS.
        maximize (bool): ascend the objective. Default: False.

    Example::

        >>> opt = AdamWTF(torch.nn.Linear(4, 1).parameters(), lr=1e-3, weight_decay=1e-4)
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, use_nesterov: bool = False, *,
                 maximize: bool = False):
        if use_nesterov:
            raise ValueError("AdamWTF: use_nesterov=True is not supported")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
            raise ValueError(f"AdamWTF: lr must be a number >= 0, got {lr!r}")
        if not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"AdamWTF: eps must be a number >= 0, got {eps!r}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"AdamWTF: betas must be two numbers in [0, 1), got {betas!r}")
        if not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < 1:
            raise ValueError(f"AdamWTF: weight_decay must be a number in [0, 1), got "
                             f"{weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, use_nesterov=False,
                                      maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWTF does not take sparse gradients; use "
                                       "recis.optim.SparseAdamWTF for embedding tables")
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                p.mul_(1 - group["weight_decay"])
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                alpha = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]),
                           value=-alpha)
        return loss
