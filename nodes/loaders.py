"""Loader nodes: a ComfyUI model-folder choice → the core's strict, streamed loaders."""

from __future__ import annotations

import comfy.model_management as mm
import torch

from ..zimage_core import load_dit, load_text_encoder, load_vae
from . import _host as host
from ._hosting import host_dit, host_module

_OFFICIAL = "Official sharded releases appear as <name>/ from models/diffusers."


class ZImageDiTLoader:
    TITLE = "Z-Image DiT Loader"
    CATEGORY = f"{host.CATEGORY}/loaders"
    DESCRIPTION = "Loads the Z-Image diffusion transformer (Turbo, De-Turbo or Base) with this pack's loader."
    RETURN_TYPES = (host.ZIMAGE_DIT,)
    RETURN_NAMES = ("dit",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit_name": (host.model_choices("diffusion_models", "transformer"), {
                "tooltip": "models/diffusion_models (or unet): e.g. z_image_turbo_bf16.safetensors, a fp8 file or "
                           f"a diffusers-named fine-tune. {_OFFICIAL}"}),
            "weight_dtype": (list(host.WEIGHT_FORMATS), {
                "tooltip": "default: compute in bf16 on CUDA, fp16 on MPS, fp32 on the CPU. fp8_e4m3fn keeps the "
                           "block weights in fp8 (about half the memory, slower, slightly lower quality)."}),
        }}

    def load(self, dit_name: str, weight_dtype: str):
        dev = mm.get_torch_device()
        path = host.model_path("diffusion_models", dit_name)
        return (host_dit(load_dit(path, dev, host.compute_dtype(dev), host.WEIGHT_FORMATS[weight_dtype])),)


class ZImageTextEncoderLoader:
    TITLE = "Z-Image Text Encoder Loader"
    CATEGORY = f"{host.CATEGORY}/loaders"
    DESCRIPTION = "Loads the Qwen3-4B text encoder of Z-Image with this pack's loader."
    RETURN_TYPES = (host.ZIMAGE_TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (host.model_choices("text_encoders", "text_encoder"), {
                "tooltip": "models/text_encoders (or clip): e.g. qwen_3_4b.safetensors, which uses ComfyUI's bundled "
                           f"Qwen tokenizer. {_OFFICIAL} (with their own tokenizer/)"}),
            "weight_dtype": (list(host.WEIGHT_FORMATS), {
                "tooltip": "default: the compute dtype of this device. fp8_e4m3fn keeps the projections in fp8."}),
        }}

    def load(self, text_encoder_name: str, weight_dtype: str):
        dev = mm.text_encoder_device()
        path = host.model_path("text_encoders", text_encoder_name)
        tokenizer = None if text_encoder_name.endswith("/") else host.bundled_tokenizer()
        te = load_text_encoder(path, dev, host.compute_dtype(dev), host.WEIGHT_FORMATS[weight_dtype], tokenizer)
        return (host_module(te, te.model, dev, mm.text_encoder_offload_device()),)


class ZImageVAELoader:
    TITLE = "Z-Image VAE Loader"
    CATEGORY = f"{host.CATEGORY}/loaders"
    DESCRIPTION = "Loads the Flux VAE (ae.safetensors) used by Z-Image, in float32 (no black or NaN images)."
    RETURN_TYPES = (host.ZIMAGE_VAE,)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (host.model_choices("vae", "vae"), {
                "tooltip": f"models/vae: ae.safetensors (the Flux VAE). {_OFFICIAL}"}),
        }}

    def load(self, vae_name: str):
        vae = load_vae(host.model_path("vae", vae_name), mm.vae_device(), torch.float32)
        return (host_module(vae, vae, mm.vae_device(), mm.vae_offload_device()),)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (ZImageDiTLoader, ZImageTextEncoderLoader, ZImageVAELoader)}
