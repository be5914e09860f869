"""Our models inside ComfyUI's memory management, and our DiT as a native ComfyUI MODEL.

Every model the loaders return is a `Hosted`: the core object plus a `comfy.model_patcher.ModelPatcher`
over it. Nodes call `ready()` before use, which is `comfy.model_management.load_models_gpu`: the model
is (re)loaded onto the compute device, other models are offloaded when memory is short, `POST /free`
unloads it, and weight patches of native nodes (a LoRA on the MODEL from "Z-Image DiT → MODEL") are
taken off again before our own sampler runs.

The DiT's patcher wraps `ZImageModel`, ComfyUI's Z-Image `BaseModel` whose `diffusion_model` IS the
core `ZImageDiT`. Its attribute names are ComfyUI's single-file keys, so the state-dict keys, ComfyUI's
LoRA key map (`comfy.lora.model_lora_keys_unet`, Lumina2 branch) and weight patches line up with the
native model's. Call convention, from `comfy/ldm/lumina/model.py` (`NextDiT._forward`) and
`comfy/model_sampling.py` (CONST): ComfyUI passes timesteps = σ and expects out = −v, so that
denoised = x − σ·out = x + σ·v.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import types
import weakref
from dataclasses import dataclass
from typing import Any

import comfy.float
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
import torch
from torch import nn

from ..zimage_core import ZImageDiT
from ..zimage_core.lora import normalised_strengths, runtime_patches


@dataclass(frozen=True)
class Hosted:
    """A core model (ZImageDiT, TextEncoder, FluxVAE) and the ModelPatcher that registers it with ComfyUI."""

    core: Any
    patcher: comfy.model_patcher.ModelPatcher
    loras: tuple = ()  # (LoraFile, strength) pairs as the Z-Image LoRA nodes asked for them, in order
    normalise: bool = False  # the patcher applies the stack's normalised strengths (Z-Image LoRA `normalise`)

    def ready(self) -> Any:
        """Load onto the compute device through ComfyUI (offloading others if needed); returns the core object."""
        mm.load_models_gpu([self.patcher])
        return self.core

    @property
    def applied_loras(self) -> list[tuple]:
        """The (LoraFile, strength) pairs this DiT's patcher applies at run time: `loras`, with the strengths
        normalised over the whole stack (Σ|s| ≤ 1) when `normalise`."""
        if not self.normalise:
            return list(self.loras)
        strengths = normalised_strengths([s for _, s in self.loras])
        return [(lora, s) for (lora, _), s in zip(self.loras, strengths, strict=True)]

    @property
    def device(self) -> torch.device:
        return self.patcher.load_device

    def __str__(self) -> str:  # what PreviewAny and error messages show
        params = sum(p.numel() for p in self.patcher.model.parameters()) / 1e6
        return f"{type(self.core).__name__}: {params:.1f}M parameters, {self.patcher.model_size() / 2**20:.0f} MiB"


class ZImageModel(comfy.model_base.Lumina2):
    """ComfyUI's Z-Image model (`supported_models.ZImage`: Flux latents, flow sampling, shift 3) over the core DiT."""

    def __init__(self, dit: ZImageDiT, device: torch.device) -> None:
        config = comfy.supported_models.ZImage({"image_model": "lumina2", "dim": dit.cfg.dim,
                                                "n_layers": dit.cfg.n_layers, "cap_feat_dim": dit.cfg.cap_feat_dim})
        config.set_inference_dtype(dit.dtype, None)
        # BaseModel's own constructor, with the already loaded core DiT as the diffusion model (Lumina2's would
        # build a NextDiT).
        comfy.model_base.BaseModel.__init__(self, config, comfy.model_base.ModelType.FLOW, device=device,
                                            unet_model=lambda **_: dit)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        if c_concat is not None or control is not None:
            raise ValueError("Z-Image DiT → MODEL does not support ControlNet or concat conditioning "
                             "(ComfyUI 0.3.75 has no Z-Image ControlNet)")
        mask = kwargs.get("attention_mask")  # only present when the batch's captions carry padding
        caps = c_crossattn if mask is None else [c[m.bool()] for c, m in zip(c_crossattn, mask, strict=True)]
        sigma = self.model_sampling.timestep(t).float()
        v = self.diffusion_model(self.model_sampling.calculate_input(t, x), 1.0 - sigma, caps)
        return self.model_sampling.calculate_denoised(t, -v.float(), x)


class _Holder(nn.Module):
    """A plain module around a model for ModelPatcher, which sets `.device` (a read-only property on transformers
    models) and bookkeeping attributes on what it manages."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def host_dit(dit: ZImageDiT) -> Hosted:
    dev = next(dit.parameters()).device
    _patchable_fp8(dit)
    patcher = comfy.model_patcher.ModelPatcher(ZImageModel(dit, dev), load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return _released_on_collect(Hosted(dit, patcher))


def with_loras(hosted: Hosted, loras: tuple, normalise: bool = False) -> tuple[Hosted, list]:
    """A clone of a hosted DiT whose patcher applies `loras` (runtime mode) as object patches while it is loaded:
    the shared base DiT is untouched, other clones and our sampler on the base see no LoRA. Returns the clone
    and the per-LoRA reports (at the strengths applied).

    `normalise` scales the whole stack's strengths to Σ|s| ≤ 1. It is sticky: a stack normalised once stays
    normalised in every clone made from it, so a LoRA node added after a normalising one cannot undo it, and a
    chain where only the last node asks is normalised as a whole (the raw strengths are kept in `loras`)."""
    lora_dit = Hosted(hosted.core, hosted.patcher.clone(), tuple(loras), normalise or hosted.normalise)
    patches, reports, _ = runtime_patches(hosted.core, lora_dit.applied_loras)
    for path, value in patches.items():
        lora_dit.patcher.add_object_patch(f"diffusion_model.{path}", value)
    return lora_dit, reports


def host_module(core: Any, module: nn.Module, load_device: torch.device, offload_device: torch.device) -> Hosted:
    """The text encoder (module = its Qwen3 model) or the VAE (module = itself)."""
    holder = _Holder(module)
    holder.device = next(module.parameters()).device
    patcher = comfy.model_patcher.ModelPatcher(holder, load_device=load_device, offload_device=offload_device)
    return _released_on_collect(Hosted(core, patcher))


def _released_on_collect(hosted: Hosted) -> Hosted:
    """When ComfyUI drops the model (POST /free, cache eviction), give the freed heap back to the OS.

    Weights converted at load time (e.g. a bf16 file computed in fp32 on the CPU) live in malloc'd memory; glibc
    keeps freed blocks below its (adaptive) mmap threshold in the heap, so without a trim the server's RSS would
    not go down by the model's size.
    """
    weakref.finalize(hosted.core, _malloc_trim)
    return hosted


def _malloc_trim() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


def _patchable_fp8(dit: ZImageDiT) -> None:
    """Native weight patches (LoRA nodes on the MODEL) see fp8 weights with their per-row scale: ComfyUI's
    `get_key_weight` protocol — `convert_weight` dequantises before the patch, `set_weight` quantises back."""
    for module in dit.modules():
        if getattr(module, "scale_weight", None) is not None:
            module.convert_weight = types.MethodType(_convert_weight, module)
            module.set_weight = types.MethodType(_set_weight, module)


def _convert_weight(self, weight: torch.Tensor, inplace: bool = False, **_) -> torch.Tensor:
    scale = self.scale_weight.to(weight.device, weight.dtype)
    return weight.mul_(scale) if inplace else weight * scale


def _set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed: int | None = None,
                return_weight: bool = False, **_):
    scaled = weight / self.scale_weight.to(weight.device, weight.dtype)
    quantised = comfy.float.stochastic_rounding(scaled, self.weight.dtype, seed=seed or 0)
    if return_weight:
        return quantised
    if inplace_update:
        self.weight.data.copy_(quantised)
    else:
        self.weight = nn.Parameter(quantised, requires_grad=False)
