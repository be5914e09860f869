"""Tiny random-weight Flux-type VAEs in the real layouts, written by the tests.

The reference is diffusers' `AutoencoderKL` configured like the Flux VAE (16 latent channels, no
quant convs, GroupNorm(32)) at width 32 instead of 128, with every parameter random. The BFL /
ComfyUI layout (`ae.safetensors`) is derived from it by the ZIMAGE_SPEC §4 mapping, written out here
by walking the architecture, independently of `zimage_core.keymaps`, so that a wrong table in the
core cannot agree with itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

CH = 32  # the smallest width GroupNorm(32) allows; levels of 32, 64, 128, 128 channels
CH_MULT = (1, 2, 4, 4)
SCALE, SHIFT = 0.3611, 0.1159  # the Flux latent normalisation


def diffusers_vae(seed: int = 0, latent_channels: int = 16, quant_conv: bool = False, ch: int = CH):
    """A diffusers AutoencoderKL shaped like the Flux VAE (or, with 4 channels and quant convs, like SD/SDXL's);
    `ch=128` is the real width (83.8M parameters), which ComfyUI's own VAELoader requires."""
    from diffusers import AutoencoderKL

    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(CH_MULT),
                          up_block_types=("UpDecoderBlock2D",) * len(CH_MULT),
                          block_out_channels=tuple(ch * m for m in CH_MULT), layers_per_block=2,
                          latent_channels=latent_channels, norm_num_groups=32, scaling_factor=SCALE,
                          shift_factor=SHIFT, use_quant_conv=quant_conv, use_post_quant_conv=quant_conv).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # GroupNorm scales
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model


def _resnet(bfl: str, dif: str, shortcut: bool) -> dict[str, str]:
    names = ["norm1", "conv1", "norm2", "conv2"]
    out = {f"{bfl}.{n}": f"{dif}.{n}" for n in names}
    if shortcut:
        out[f"{bfl}.nin_shortcut"] = f"{dif}.conv_shortcut"
    return out


def _mid(side: str) -> dict[str, str]:
    out = {**_resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", False),
           **_resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", False)}
    for bfl, dif in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        out[f"{side}.mid.attn_1.{bfl}"] = f"{side}.mid_block.attentions.0.{dif}"
    return out


def bfl_modules(ch_mult=CH_MULT, res_blocks: int = 2) -> dict[str, str]:
    """BFL module path -> diffusers module path, for every module of the VAE (ZIMAGE_SPEC §4)."""
    n = len(ch_mult)
    out = {f"{s}.{m}": f"{s}.{m}" for s in ("encoder", "decoder") for m in ("conv_in", "conv_out")}
    out.update({"encoder.norm_out": "encoder.conv_norm_out", "decoder.norm_out": "decoder.conv_norm_out"})
    out.update(_mid("encoder") | _mid("decoder"))
    for i in range(n):
        for j in range(res_blocks):
            out.update(_resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                               j == 0 and i > 0 and ch_mult[i] != ch_mult[i - 1]))
        if i < n - 1:
            out[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        up = n - 1 - i  # diffusers' up block i is BFL's level n − 1 − i
        for j in range(res_blocks + 1):
            out.update(_resnet(f"decoder.up.{up}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}",
                               j == 0 and up < n - 1 and ch_mult[up] != ch_mult[up + 1]))
        if up > 0:
            out[f"decoder.up.{up}.upsample.conv"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
    return out


def bfl_state_dict(sd: dict[str, torch.Tensor], ch_mult=CH_MULT) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> `ae.safetensors` names and shapes (attention Linears as 1×1 convs)."""
    out = {}
    for bfl, dif in bfl_modules(ch_mult).items():
        for leaf in ("weight", "bias"):
            t = sd[f"{dif}.{leaf}"]
            if ".attn_1." in bfl and not bfl.endswith(".norm") and leaf == "weight":
                t = t[:, :, None, None]
            out[f"{bfl}.{leaf}"] = t.contiguous()
    missed = set(sd) - {f"{d}.{leaf}" for d in bfl_modules(ch_mult).values() for leaf in ("weight", "bias")}
    assert not missed, f"the fixture's BFL mapping misses {sorted(missed)[:5]}"
    return out


def write_bfl(sd: dict[str, torch.Tensor], path: Path, prefix: str = "") -> Path:
    save_file({prefix + k: v for k, v in bfl_state_dict(sd).items()}, path)
    return path


def write_diffusers(model, root: Path) -> Path:
    """A diffusers model root: root/vae/ with config.json + diffusion_pytorch_model.safetensors (save_pretrained)."""
    model.save_pretrained(root / "vae", safe_serialization=True)
    return root / "vae"


def reference_decode(model, latents: torch.Tensor) -> torch.Tensor:
    """What the diffusers Z-Image pipeline does with model-space latents (before its [0, 1] post-processing)."""
    with torch.no_grad():
        return model.decode(latents / SCALE + SHIFT).sample


def reference_encode(model, pixels: torch.Tensor) -> torch.Tensor:
    """The posterior mode, in model space (the diffusers ControlNet pipeline's `sample_mode="argmax"`)."""
    with torch.no_grad():
        return (model.encode(pixels).latent_dist.mode() - SHIFT) * SCALE
