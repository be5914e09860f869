"""EMA of the LoRA weights: a float32 shadow copy, updated after every optimizer step (`ema_decay` > 0).

    shadow ← decay · shadow + (1 − decay) · θ          (after each step; the shadow starts at the initial θ)

The optimizer trains θ as usual; the EMA never feeds back into training. With EMA on, the trainer saves the
shadow, not θ, as the LoRA file of every checkpoint, shows it in the previews, and hands it back as
`TrainResult.lora` at the end. The resume state holds both (θ and the optimizer to continue, the shadow
under `ema.<name>`), so a resumed run follows the straight one bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

PREFIX = "ema."


class LoraEMA:
    """The float32 shadow of a module's parameters (by name), on their device."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"LoraEMA: decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.params = dict(sorted(module.named_parameters()))
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the current weights (call after `optimizer.step()`)."""
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The module holds the EMA weights inside the block and its own trained weights again after it
        (plain copies of float32 tensors: bit-exact both ways)."""
        with torch.no_grad():
            kept = {k: p.detach().clone() for k, p in self.params.items()}
            self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(kept[k])

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Overwrite the module's weights with the EMA (the end of a run)."""
        for k, p in self.params.items():
            p.copy_(self.shadow[k].to(p.dtype))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {PREFIX + k: s.detach().cpu().contiguous() for k, s in self.shadow.items()}

    def load_state(self, tensors: dict[str, torch.Tensor], where: object = "resume state") -> None:
        """Restore the shadow from `state_tensors()` output (other keys are ignored); names and shapes must match."""
        stored = {k.removeprefix(PREFIX): v for k, v in tensors.items() if k.startswith(PREFIX)}
        if set(stored) != set(self.shadow) or any(stored[k].shape != s.shape for k, s in self.shadow.items()):
            raise ValueError(f"{where}: its EMA weights do not match this run's LoRA (or it has none: a state "
                             "written without ema_decay)")
        with torch.no_grad():
            for k, s in self.shadow.items():
                s.copy_(stored[k])
