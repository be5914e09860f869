"""zimage_core: a plain-PyTorch Z-Image implementation (no ComfyUI import anywhere in this package).

Public API (see README "Python API"):
    load_dit(path, device, dtype, weight_format) -> ZImageDiT    # any layout, streamed, strict
    load_text_encoder(path, device, dtype, weight_format, tokenizer) -> TextEncoder; .encode(prompts)
    load_vae(path, device, dtype=float32) -> FluxVAE; .encode(pixels) / .decode(latents, tile_size)
    generate(dit, text_encoder, vae, prompt, ImageSize(w, h), seed, PRESETS[Preset.TURBO]) -> images
    ZImageDiT(cfg)(x, t, cap_feats) -> v                          # t = 1 − σ, v ≈ x0 − ε
    sample / denoise(dit, noise, cap_feats, SamplerConfig)        # flow-matching Euler (+ CFG, img2img)
    make_sigmas, make_noise, model_velocity, release_mapped_pages, inspect, configs and Enums
"""

from .checkpoint import DiTPlan, QuantFormat, load_dit, plan_dit, release_mapped_pages
from .config import Z_IMAGE_6B, DiTConfig, WeightFormat
from .dit import ZImageDiT
from .inspection import inspect
from .keymaps import DiTLayout
from .pipeline import ImageSize, denoise_sigmas, generate, sample
from .sampling import (
    PRESETS,
    Preset,
    SamplerConfig,
    SamplingInterrupted,
    denoise,
    make_noise,
    make_sigmas,
    model_velocity,
    preset_config,
)
from .text_encoder import QWEN3_4B, TextEncoder, TextEncoderConfig, load_text_encoder, load_tokenizer
from .vae import FLUX_VAE, FluxVAE, VAEConfig, load_vae

__all__ = ["FLUX_VAE", "PRESETS", "QWEN3_4B", "DiTConfig", "DiTLayout", "DiTPlan", "FluxVAE", "ImageSize", "Preset",
           "QuantFormat", "SamplerConfig", "SamplingInterrupted", "TextEncoder", "TextEncoderConfig", "VAEConfig",
           "WeightFormat", "Z_IMAGE_6B", "ZImageDiT", "denoise", "denoise_sigmas", "generate", "inspect", "load_dit",
           "load_text_encoder", "load_tokenizer", "load_vae", "make_noise", "make_sigmas", "model_velocity",
           "plan_dit", "preset_config", "release_mapped_pages", "sample"]
