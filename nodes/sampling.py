"""Text encode, sampler and VAE nodes. They speak ComfyUI's CONDITIONING, LATENT and IMAGE (see _host.py)."""

from __future__ import annotations

import torch

from ..zimage_core import Preset, sample
from . import _host as host

_MAX_SEED = 0xFFFFFFFFFFFFFFFF  # ComfyUI's KSampler range


class ZImageTextEncode:
    TITLE = "Z-Image Text Encode"
    CATEGORY = host.CATEGORY
    DESCRIPTION = "Encodes a prompt with the Qwen3 text encoder into ComfyUI CONDITIONING for Z-Image."
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (host.ZIMAGE_TEXT_ENCODER, {"tooltip": "From Z-Image Text Encoder Loader."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "The prompt (at most 512 tokens with the chat template; longer is cut "
                                           "with a warning). Works with ConditioningZeroOut and ComfyUI's KSampler."}),
        }}

    def encode(self, text_encoder, text: str):
        return (host.conditioning(text_encoder.ready().encode([text])[0]),)


class ZImageSampler:
    TITLE = "Z-Image Sampler"
    CATEGORY = host.CATEGORY
    DESCRIPTION = "Flow-matching Euler sampler with Z-Image's presets (Turbo: 8 steps, no guidance, shift 3)."
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit": (host.ZIMAGE_DIT, {"tooltip": "From Z-Image DiT Loader."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt, from Z-Image Text Encode (or CLIPTextEncode)."}),
            "latent": ("LATENT", {"tooltip": "EmptySD3LatentImage for text-to-image (width and height multiples "
                                             "of 16), or an encoded image with denoise < 1 for img2img."}),
            "preset": ([p.value for p in Preset], {
                "tooltip": "turbo: 8 steps, guidance 0, shift 3. de-turbo: 25 steps, guidance 2, shift 3. base: "
                           "50 steps, guidance 4, shift 6, CFG normalisation. The widgets below override it."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": _MAX_SEED, "control_after_generate": True,
                             "tooltip": "ComfyUI's noise for this seed: the same image as KSampler's noise."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": 200,
                              "tooltip": "Number of DiT forwards (Turbo: 8). 0 = the preset's."}),
            "guidance": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                   "tooltip": "Guidance g (diffusers' guidance_scale); ComfyUI's cfg = g + 1. 0 = off "
                                              "(Turbo), > 0 needs a negative. −1 = the preset's."}),
            "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1,
                                "tooltip": "Schedule shift (ModelSamplingAuraFlow's shift). 0 = the preset's."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "1 = text-to-image. < 1 = img2img from the input latent, as KSampler."}),
        }, "optional": {
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt, used only when guidance > 0; defaults to "
                                                     "the empty prompt's zeros (ConditioningZeroOut) if left out."}),
        }}

    def sample(self, dit, positive, latent, preset, seed, steps, guidance, shift, denoise, negative=None):
        cfg = host.sampler_config(preset, steps, guidance, shift)
        x = host.sampler_input(latent)
        dit, dev = dit.ready(), dit.device
        cond = [c.to(dev) for c in host.captions(positive, len(x))]
        neg = [c.to(dev) for c in host.captions(negative, len(x))] if negative is not None else None
        if neg is None and cfg.guidance > 0:
            neg = [torch.zeros_like(c) for c in cond]
        out = sample(dit, host.noise(latent, seed).to(dev), cond, cfg, neg, x.to(dev) if denoise < 1 else None,
                     denoise, host.progress(cfg.steps, dev), host.interrupted)
        return ({**latent, "samples": host.model_to_latent(out)},)


class ZImageVAEDecode:
    TITLE = "Z-Image VAE Decode"
    CATEGORY = host.CATEGORY
    DESCRIPTION = "Decodes a Z-Image LATENT (ComfyUI's raw Flux latent) to an IMAGE, in float32."
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (host.ZIMAGE_VAE, {"tooltip": "From Z-Image VAE Loader."}),
            "samples": ("LATENT", {"tooltip": "From Z-Image Sampler, KSampler or VAEEncode (Flux latents)."}),
        }, "optional": {
            "tile_size": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 64,
                                  "tooltip": "0 = whole image. > 0: decode in bands of this many pixels to save "
                                             "memory; the result equals the untiled decode."}),
        }}

    def decode(self, vae, samples, tile_size=0):
        x = host.latent_to_model(samples["samples"])
        vae, dev = vae.ready(), vae.device
        return (host.pixels_to_image(vae.decode(x.to(dev), tile_size=tile_size or None)),)


class ZImageVAEEncode:
    TITLE = "Z-Image VAE Encode"
    CATEGORY = host.CATEGORY
    DESCRIPTION = "Encodes an IMAGE to a Z-Image LATENT (ComfyUI's raw Flux latent) for img2img."
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (host.ZIMAGE_VAE, {"tooltip": "From Z-Image VAE Loader."}),
            "pixels": ("IMAGE", {"tooltip": "Centre-cropped to multiples of 16 (what the sampler needs); scale it "
                                            "first (ImageScale) to the size you want to generate."}),
        }}

    def encode(self, vae, pixels):
        pixels = host.image_to_pixels(pixels)
        vae, dev = vae.ready(), vae.device
        z = vae.encode(pixels.to(dev))
        return ({"samples": host.model_to_latent(z)},)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (ZImageTextEncode, ZImageSampler, ZImageVAEDecode,
                                                     ZImageVAEEncode)}
