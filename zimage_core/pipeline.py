"""Text-to-image (and latent-to-image) with the three models: encode → denoise → decode.

Equal to diffusers 0.42.1 `ZImagePipeline` for the same initial noise (the test holds it to 1e-4),
and to ComfyUI's conventions where the two differ in what the user controls:
- the seed: noise for seed s is ComfyUI's, `make_noise(s, (B, 16, H/8, W/8))`, drawn on the CPU in
  float32, so a seed gives the same image on every device and in ComfyUI's own sampler;
- img2img: `denoise` d < 1 runs the last `steps` σ of a `int(steps/d)`-step schedule (ComfyUI's
  KSampler) from x = σ₀·noise + (1 − σ₀)·latent, so `steps` is always the number of DiT forwards.

Memory: each model is needed in one stage. After its stage, its file-mapped weights leave this
process's resident memory (`release_mapped_pages`; CPU, weights kept in their stored dtype, Linux)
while staying in the OS page cache, so peak memory is one model plus its stage's activations, not
the sum of the three. The models stay loaded: their pages come back from the page cache on next use
(about 0.02 s per GB).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .checkpoint import release_mapped_pages
from .sampling import SamplerConfig, denoise, make_noise, make_sigmas

LATENT_CHANNELS = 16
PIXELS_PER_LATENT = 8
SIZE_MULTIPLE = 16  # 8× VAE, then 2×2 patches in the DiT


@dataclass(frozen=True)
class ImageSize:
    width: int
    height: int

    def __post_init__(self) -> None:
        for name, v in (("width", self.width), ("height", self.height)):
            if v < SIZE_MULTIPLE or v % SIZE_MULTIPLE:
                raise ValueError(f"{name} {v}: Z-Image needs a positive multiple of {SIZE_MULTIPLE} pixels "
                                 f"(e.g. {max(SIZE_MULTIPLE, round(v / SIZE_MULTIPLE) * SIZE_MULTIPLE)})")

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, LATENT_CHANNELS, self.height // PIXELS_PER_LATENT, self.width // PIXELS_PER_LATENT)


def denoise_sigmas(cfg: SamplerConfig, strength: float = 1.0) -> list[float]:
    """The σ schedule for `cfg.steps` forwards; with strength < 1, the tail of a longer one (ComfyUI's KSampler)."""
    if not 0 < strength <= 1:
        raise ValueError(f"denoise strength {strength}: expected 0 < strength ≤ 1")
    if strength > 0.9999:
        return make_sigmas(cfg.steps, cfg.shift)
    return make_sigmas(int(cfg.steps / strength), cfg.shift)[-(cfg.steps + 1):]


def sample(dit: Callable, noise: torch.Tensor, cond: Sequence[torch.Tensor], cfg: SamplerConfig,
           neg: Sequence[torch.Tensor] | None = None, latent: torch.Tensor | None = None, strength: float = 1.0,
           on_step: Callable[[int, int, torch.Tensor], None] | None = None,
           should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Denoise from `noise` (B, 16, h, w); with `latent` (clean, model space) start part-way (img2img).

    Returns the float32 latent in model space (what `FluxVAE.decode` takes).
    """
    sigmas = denoise_sigmas(cfg, strength)
    x = noise.float()
    if latent is not None:
        if latent.shape != noise.shape:
            raise ValueError(f"input latent shape {list(latent.shape)} does not match the noise {list(noise.shape)}")
        x = sigmas[0] * x + (1 - sigmas[0]) * latent.to(x)
    elif strength < 1:
        raise ValueError("denoise strength < 1 needs an input latent to start from")
    return denoise(dit, x, cond, cfg, neg, sigmas=sigmas, on_step=on_step, should_stop=should_stop)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """Decoded pixels in [−1, 1] → an image in [0, 1] (diffusers' and ComfyUI's post-processing), float32."""
    return (pixels.float() / 2 + 0.5).clamp_(0, 1)


def repeat_each(items: Sequence, times: int) -> list:
    """[a, b] × 2 → [a, a, b, b]: diffusers' `num_images_per_prompt` order."""
    return [item for item in items for _ in range(times)]


@torch.inference_mode()
def generate(dit, text_encoder, vae, prompt: str | Sequence[str], size: ImageSize, seed: int, cfg: SamplerConfig,
             negative: str | Sequence[str] = "", images_per_prompt: int = 1, latent: torch.Tensor | None = None,
             strength: float = 1.0, tile_size: int | None = None,
             on_step: Callable[[int, int, torch.Tensor], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) float32 in [0, 1]; B = len(prompts) · images_per_prompt.

    The negative prompt is encoded only when guidance is on (g > 0). The initial noise is
    `make_noise(seed, …)` for the whole batch, moved to the DiT's device.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or images_per_prompt < 1:
        raise ValueError(f"need at least one prompt and images_per_prompt ≥ 1 (got {len(prompts)}, "
                         f"{images_per_prompt})")
    cond = repeat_each(text_encoder.encode(prompts), images_per_prompt)
    neg = None
    if cfg.guidance > 0:
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        neg = repeat_each(text_encoder.encode(negatives), images_per_prompt)
    release_mapped_pages(text_encoder.model)
    device = next(dit.parameters()).device
    noise = make_noise(seed, size.latent_shape(len(cond))).to(device)
    if latent is not None:
        latent = latent.to(device)
    x0 = sample(dit, noise, [c.to(device) for c in cond], cfg, None if neg is None else [c.to(device) for c in neg],
                latent, strength, on_step, should_stop)
    release_mapped_pages(dit)  # decoding needs the memory; the pages come back from the page cache
    pixels = vae.decode(x0.to(next(vae.parameters()).device), tile_size=tile_size)
    release_mapped_pages(vae)
    return to_unit_range(pixels)
