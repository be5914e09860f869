"""The pipeline's user-facing sampling conventions, checked against ComfyUI's own code.

Locks in: image sizes must be multiples of 16 (one clear error); img2img `denoise` uses ComfyUI
KSampler's schedule (the last `steps` σ of an `int(steps/denoise)` schedule, so `steps` = DiT
forwards) and its start x = σ₀·noise + (1 − σ₀)·latent (ComfyUI's CONST noise scaling). Breaks if the
img2img schedule or start drifts from what ComfyUI users get from KSampler with the same settings.
"""

from types import SimpleNamespace

import pytest
import torch

from comfy_host import import_comfy
from zimage_core.pipeline import ImageSize, denoise_sigmas, sample
from zimage_core.sampling import PRESETS, Preset, SamplerConfig


def comfy_ksampler_sigmas(steps: int, denoise: float, shift: float) -> list[float]:
    """σ from ComfyUI's KSampler.set_steps with ModelSamplingAuraFlow(shift) and the `simple` scheduler."""
    import_comfy()
    from comfy import model_sampling, samplers

    ms = model_sampling.ModelSamplingDiscreteFlow()
    ms.set_parameters(shift=shift, multiplier=1.0)  # what ModelSamplingAuraFlow sets
    stub = SimpleNamespace(device="cpu", calculate_sigmas=lambda n: samplers.calculate_sigmas(ms, "simple", n))
    samplers.KSampler.set_steps(stub, steps, denoise)
    return stub.sigmas.tolist()


@pytest.mark.parametrize(("steps", "strength"), [(8, 1.0), (4, 0.5), (5, 0.625), (25, 1.0), (10, 0.4)])
def test_img2img_schedule_is_comfyui_ksampler_denoise(steps, strength):
    """Schedules where ComfyUI's 1000-entry table is exact (steps/strength divides 1000) must agree to 1e-5."""
    ours = denoise_sigmas(SamplerConfig(steps=steps, shift=3.0), strength)
    assert len(ours) == steps + 1
    assert ours == pytest.approx(comfy_ksampler_sigmas(steps, strength, 3.0), abs=1e-5)


def test_img2img_starts_from_comfyui_noise_scaling():
    """The first DiT input is ComfyUI's CONST.noise_scaling(σ₀, noise, latent), and nothing else moves."""
    import_comfy()
    from comfy.model_sampling import CONST

    g = torch.Generator().manual_seed(0)
    noise, latent = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    seen = []

    def dit(x, t, caps):
        seen.append((x.clone(), t.clone()))
        return torch.zeros_like(x)

    cfg = SamplerConfig(steps=4, shift=3.0)
    out = sample(dit, noise, [torch.zeros(3, 8)], cfg, latent=latent, strength=0.5)
    sigma0 = denoise_sigmas(cfg, 0.5)[0]
    torch.testing.assert_close(seen[0][0], CONST().noise_scaling(torch.tensor([sigma0]), noise, latent))
    torch.testing.assert_close(seen[0][1], torch.tensor([1 - sigma0]))
    assert len(seen) == 4
    torch.testing.assert_close(out, seen[0][0])  # a zero velocity leaves x where it started


def test_bad_sizes_and_strengths_are_one_clear_error_each():
    """Sizes not multiple of 16, strength outside (0, 1], strength < 1 without a latent, wrong latent shape."""
    for w, h in ((1000, 1024), (1024, 8), (0, 16)):
        with pytest.raises(ValueError, match="multiple of 16"):
            ImageSize(w, h)
    assert ImageSize(1024, 768).latent_shape(2) == (2, 16, 96, 128)
    cfg = PRESETS[Preset.TURBO]
    for strength in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match="0 < strength"):
            denoise_sigmas(cfg, strength)
    noise = torch.zeros(1, 16, 2, 2)
    with pytest.raises(ValueError, match="needs an input latent"):
        sample(lambda x, t, c: x, noise, [torch.zeros(1, 4)], cfg, strength=0.5)
    with pytest.raises(ValueError, match="does not match the noise"):
        sample(lambda x, t, c: x, noise, [torch.zeros(1, 4)], cfg, latent=torch.zeros(1, 16, 4, 4))
