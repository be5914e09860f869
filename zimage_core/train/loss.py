"""The flow-matching training loss (ZIMAGE_SPEC §7.1) and AI Toolkit's differential guidance (§7.4).

The convention is `sampling`'s, used through its helpers only: x_σ = `noised(x0, ε, σ)`, the DiT is called
through `model_velocity` (which turns σ into model time t = 1 − σ and returns dx/dσ = −v), and the target for
the raw output v is `velocity_target(x0, ε)` = x0 − ε (musubi's and diffusion-pipe's raw-output form).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..sampling import Captions, model_velocity, noised, velocity_target


def predicted_velocity(dit: Callable, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                       caps: Captions) -> torch.Tensor:
    """The raw DiT output v at x_σ for each item (σ (B,)): what `velocity_target` is compared with."""
    return -model_velocity(dit, noised(x0, noise, sigmas), sigmas, caps)


def flow_matching_loss(dit: Callable, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                       caps: Captions, weights: torch.Tensor | None = None) -> torch.Tensor:
    """mean over the batch of w_i · MSE(v_pred_i, x0_i − ε_i), float32 scalar; w = 1 when `weights` is None.

    The weights multiply (they are not renormalised over the batch), so mean-1 weights such as
    `loss_weights(σ, WEIGHTED)` keep the loss scale and still weigh a batch of one.
    """
    if sigmas.shape != (x0.shape[0],) or noise.shape != x0.shape:
        raise ValueError(f"flow_matching_loss: need x0 and noise of one shape and σ (B,), got x0 {list(x0.shape)}, "
                         f"noise {list(noise.shape)}, σ {list(sigmas.shape)}")
    if weights is not None and weights.shape != sigmas.shape:
        raise ValueError(f"flow_matching_loss: weights {list(weights.shape)} for σ {list(sigmas.shape)}")
    pred = predicted_velocity(dit, x0, noise, sigmas, caps).float()
    per_item = (pred - velocity_target(x0, noise).float()).square().flatten(1).mean(1)
    if weights is not None:
        per_item = per_item * weights.to(per_item.device, torch.float32)
    return per_item.mean()


def differential_guidance_target(pred: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    """AI Toolkit's differential guidance: the target pushed past the prediction, pred + s·(target − pred),
    detached (no gradient flows through it). MSE against it has the plain gradient times s."""
    with torch.no_grad():
        return (pred + scale * (target - pred)).detach()
