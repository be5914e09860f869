"""Preview samples during LoRA training: fixed prompts, fixed noise, the settings of the model the LoRA is for.

    previews = Previews(captions=(te.encode(["a photo of zxq"])[0], te.encode(["a photo of a dog"])[0]), every=250)
    result = train_lora(dit, items, cfg, previews=previews, on_preview=lambda step, latents: ...)

Every `every` steps and once at the end of the run (not after an interrupt), each caption is sampled from
`make_noise(seed + i)` (the same noise at every preview, so previews differ only by what the LoRA learnt) and
handed over as latents in model space, exactly what `pipeline.sample` returns (the caller decodes them).

What the previews show is the LoRA on the model it is meant for (ZIMAGE_SPEC §5, §7.3):
- TURBO_ADAPTER: plain Turbo + the LoRA, Turbo's settings (8 steps, no guidance). The training adapter merged
  for training is taken out for the preview by swapping the base's original weight tensors back in and the
  merged ones back afterwards: no arithmetic, so both directions are bit-exact and cost no memory (AI Toolkit
  applies the adapter at −1 instead, which is not exact).
- DE_TURBO: the De-Turbo preset (25 steps, g 2); BASE: the base model's guidance at 25 steps (g 4, shift 6,
  CFG normalisation 1). Guidance needs negative features: `Previews.negative`, else `train_lora`'s empty_caption.
The LoRA runs at multiplier 1 (with EMA on, its EMA weights), under `torch.no_grad`, and the noise comes from
its own generators, so the training path (RNG, weights, optimizer) is untouched: a run with previews trains
the same LoRA, bit for bit, as one without.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..lora import AppliedLoras
from ..pipeline import ImageSize, sample
from ..sampling import PRESETS, Preset, SamplerConfig, make_noise, preset_config
from .config import BaseMode, TrainConfig
from .lora_net import TrainableLora

PREVIEW_STEPS_WITH_CFG = 25  # the "De-Turbo: 25 steps with CFG" (AI Toolkit's De-Turbo sample preset)

OnPreview = Callable[[int, torch.Tensor], None]  # (steps done, latents (n_prompts, 16, h/8, w/8) fp32, DiT's device)


@dataclass(frozen=True)
class Previews:
    captions: tuple[torch.Tensor, ...]  # (L, cap_dim) caption features, one per prompt (encoded before training)
    every: int  # a preview every `every` steps (≥ 1) and one at the end of the run
    width: int = 512
    height: int = 512
    seed: int = 0  # same noise at every preview (one seed per prompt: seed + i)
    sampler: SamplerConfig | None = None  # None → preview_sampler(config.base_mode)
    negative: torch.Tensor | None = None  # CFG negative caption features; None → train_lora's empty_caption

    def __post_init__(self) -> None:
        object.__setattr__(self, "captions", tuple(self.captions))
        if not self.captions:
            raise ValueError("Previews: no captions (give the features of at least one prompt)")
        for i, cap in enumerate((*self.captions, *([] if self.negative is None else [self.negative]))):
            what = "negative" if i == len(self.captions) else f"caption {i}"
            if not torch.is_tensor(cap) or cap.ndim != 2 or cap.shape[0] < 1:
                raise ValueError(f"Previews: {what} must be (L ≥ 1, cap_dim) caption features, got "
                                 f"{list(cap.shape) if torch.is_tensor(cap) else type(cap).__name__}")
            if not torch.isfinite(cap).all():
                raise ValueError(f"Previews: {what} has NaN or Inf values")
        for name in ("every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "every" else 0):
                raise ValueError(f"Previews: {name} must be an integer ≥ {1 if name == 'every' else 0}, got {v!r}")
        try:
            ImageSize(self.width, self.height)
        except ValueError as e:
            raise ValueError(f"Previews: {e}") from None
        if self.sampler is not None and not isinstance(self.sampler, SamplerConfig):
            raise ValueError(f"Previews: sampler must be a SamplerConfig, got {type(self.sampler).__name__}")

    def due(self, step: int, total: int) -> bool:
        """Whether a preview follows step `step` (1-based) of a `total`-step run."""
        return step % self.every == 0 or step == total


def preview_sampler(mode: BaseMode) -> SamplerConfig:
    """The sampling settings of the model a LoRA trained in `mode` is meant for (module docstring)."""
    mode = BaseMode(mode)
    if mode is BaseMode.TURBO_ADAPTER:
        return PRESETS[Preset.TURBO]
    if mode is BaseMode.DE_TURBO:
        return PRESETS[Preset.DE_TURBO]
    return preset_config(Preset.BASE, steps=PREVIEW_STEPS_WITH_CFG)


def check_previews(dit: nn.Module, previews: Previews, config: TrainConfig,
                   empty_caption: torch.Tensor | None) -> tuple[SamplerConfig, torch.Tensor | None]:
    """The sampler and negative features the previews will use, checked against the DiT before step 1."""
    sampler = previews.sampler or preview_sampler(config.base_mode)
    cap_dim = dit.cfg.cap_feat_dim
    if config.base_mode is BaseMode.TURBO_ADAPTER and config.blocks_to_swap:
        raise ValueError("Previews: not available with base_mode TURBO_ADAPTER and blocks_to_swap > 0 (the swapped "
                         "blocks keep the merged training adapter); set blocks_to_swap = 0 or train without previews")
    for i, cap in enumerate(previews.captions):
        if cap.shape[1] != cap_dim:
            raise ValueError(f"Previews: caption {i} has {cap.shape[1]} features per token, this DiT takes {cap_dim} "
                             "(encoded with another text encoder?)")
    negative = None
    if sampler.guidance > 0:
        negative = previews.negative if previews.negative is not None else empty_caption
        if negative is None:
            raise ValueError(f"Previews: the preview sampler uses guidance {sampler.guidance:g} and needs negative "
                             "caption features: set Previews.negative or pass empty_caption to train_lora")
        if negative.ndim != 2 or negative.shape[0] < 1 or negative.shape[1] != cap_dim:
            raise ValueError(f"Previews: the negative caption features must be (L ≥ 1, {cap_dim}), got "
                             f"{list(negative.shape)}")
    return sampler, negative


@dataclass
class PreviewRunner:
    """Renders the previews of one run (`train_lora` builds it after `check_previews`)."""

    dit: nn.Module
    previews: Previews
    sampler: SamplerConfig
    negative: torch.Tensor | None
    applied_adapter: AppliedLoras | None = None  # the merged training adapter (TURBO_ADAPTER), taken out to preview

    @torch.no_grad()
    def render(self, lora: TrainableLora) -> torch.Tensor:
        """(n_prompts, 16, h/8, w/8) float32 latents on the DiT's device, in model space."""
        device = next(self.dit.parameters()).device
        shape = ImageSize(self.previews.width, self.previews.height).latent_shape(1)
        neg = None if self.negative is None else [self.negative.to(device)]
        multiplier, lora.multiplier = lora.multiplier, 1.0
        try:
            with adapter_taken_out(self.dit, self.applied_adapter), _own_rng(device):
                out = [sample(self.dit, make_noise(self.previews.seed + i, shape).to(device), [cap.to(device)],
                              self.sampler, neg) for i, cap in enumerate(self.previews.captions)]
        finally:
            lora.multiplier = multiplier
        return torch.cat(out)


@contextmanager
def adapter_taken_out(dit: nn.Module, applied: AppliedLoras | None) -> Iterator[None]:
    """A merged LoRA taken out of `dit` inside the block and put back after it, by swapping parameter objects:
    the originals `applied` keeps for its `remove()` go in, the merged ones come back (bit-exact, no copy).
    `applied` itself is left as it was, so its `remove()` still restores the base."""
    if applied is None:
        yield
        return
    originals = dict(applied._originals)  # attribute path → the base's own object (AppliedLoras keeps them)
    merged = {path: _get(dit, path) for path in originals}
    _set_all(dit, originals)
    try:
        yield
    finally:
        _set_all(dit, merged)


@contextmanager
def _own_rng(device: torch.device) -> Iterator[None]:
    """Whatever the sampler might draw from the global RNGs is given back (the noise has its own generators)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        yield


def _get(root: nn.Module, path: str) -> object:
    module, _, leaf = path.rpartition(".")
    return getattr(root.get_submodule(module), leaf)


def _set_all(root: nn.Module, values: dict[str, object]) -> None:
    for path, value in values.items():
        module, _, leaf = path.rpartition(".")
        setattr(root.get_submodule(module), leaf, value)

