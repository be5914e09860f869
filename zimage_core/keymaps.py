"""The one table of foreign Z-Image DiT names, for checkpoints and LoRAs alike (ZIMAGE_SPEC §2c).

Our canonical names are ComfyUI's single-file keys (fused `attention.qkv`). The official/diffusers
layout (also musubi-tuner, AI Toolkit, DiffSynth) splits q/k/v and renames five modules. Entries map
*module paths*; a tensor key is a module path plus a leaf (`weight`, `bias`, `scale_weight`, …).
A split module is one equal row block (`part` of `parts`) of the fused canonical weight:
rows [part·n, (part+1)·n) with n = out_features / parts.

The Flux VAE's table (diffusers AutoencoderKL → BFL `ae.safetensors` names, ZIMAGE_SPEC §4) is at the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class DiTLayout(str, Enum):
    COMFY = "comfy"  # ComfyUI single file: fused attention.qkv, x_embedder, final_layer (our names)
    DIFFUSERS = "diffusers"  # official sharded release, musubi full fine-tunes: to_q/to_k/to_v, all_x_embedder.2-1


@dataclass(frozen=True)
class Target:
    """Where a foreign module lands: canonical module path and its row block."""

    module: str
    part: int = 0
    parts: int = 1


BLOCK_PREFIXES = ("layers", "noise_refiner", "context_refiner")
_BLOCK = re.compile(rf"^((?:{'|'.join(BLOCK_PREFIXES)})\.\d+)\.(.+)$")

# diffusers module path inside a block -> canonical path inside the block, row block.
_DIFFUSERS_BLOCK = {
    "attention.to_q": Target("attention.qkv", 0, 3),
    "attention.to_k": Target("attention.qkv", 1, 3),
    "attention.to_v": Target("attention.qkv", 2, 3),
    "attention.to_out.0": Target("attention.out"),
    "attention.norm_q": Target("attention.q_norm"),
    "attention.norm_k": Target("attention.k_norm"),
}
# diffusers top-level module path -> canonical path.
_DIFFUSERS_TOP = {
    "all_x_embedder.2-1": "x_embedder",
    "all_final_layer.2-1.linear": "final_layer.linear",
    "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
}

# Keys some ComfyUI single files carry that Z-Image never uses (a Lumina-2 leftover, ZIMAGE_SPEC §2b).
UNUSED_COMFY_KEYS = frozenset({"norm_final.weight"})

# Prefixes that wrap the DiT in other containers (ComfyUI all-in-one checkpoints, some trainers).
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
ALL_IN_ONE_PREFIX = DIT_PREFIXES[0]  # beside `text_encoders.` and `vae.` in a ComfyUI all-in-one checkpoint


def split_key(key: str) -> tuple[str, str]:
    """'layers.0.attention.qkv.weight' -> ('layers.0.attention.qkv', 'weight'); 'x_pad_token' -> ('', 'x_pad_token')."""
    module, _, leaf = key.rpartition(".")
    return module, leaf


def join_key(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if module else leaf


def to_canonical(module: str, layout: DiTLayout) -> Target:
    """Canonical target of a module path written in `layout`."""
    if layout is DiTLayout.COMFY:
        return Target(module)
    if m := _BLOCK.match(module):
        block, inner = m.groups()
        t = _DIFFUSERS_BLOCK.get(inner, Target(inner))
        return Target(f"{block}.{t.module}", t.part, t.parts)
    return Target(_DIFFUSERS_TOP.get(module, module))


_DIFFUSERS_BLOCK_INV: dict[str, list[str]] = {}
for _name, _t in _DIFFUSERS_BLOCK.items():
    _DIFFUSERS_BLOCK_INV.setdefault(_t.module, []).append(_name)
_DIFFUSERS_TOP_INV = {v: k for k, v in _DIFFUSERS_TOP.items()}


def from_canonical(module: str, layout: DiTLayout) -> list[tuple[str, Target]]:
    """Module paths in `layout` that make up canonical `module`, each with its row block."""
    if layout is DiTLayout.COMFY:
        return [(module, Target(module))]
    if m := _BLOCK.match(module):
        block, inner = m.groups()
        names = _DIFFUSERS_BLOCK_INV.get(inner, [inner])
        return [(f"{block}.{n}", to_canonical(f"{block}.{n}", layout)) for n in names]
    return [(_DIFFUSERS_TOP_INV.get(module, module), Target(module))]


def find_prefix(keys, prefixes=DIT_PREFIXES) -> str:
    """The container prefix shared by every key ('' if none)."""
    keys = list(keys)
    for p in prefixes:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


# --- Flux VAE (ZIMAGE_SPEC §4) ---------------------------------------------------------------------------
# Our canonical names are BFL's (`ae.safetensors`, ComfyUI's VAE files): `encoder.down.{i}.block.{j}`,
# `mid.attn_1.q` (1×1 convs), `decoder.up.{i}` counted from the full-resolution level.


class VAELayout(str, Enum):
    BFL = "bfl"  # ae.safetensors, ComfyUI (LDM names): our names
    DIFFUSERS = "diffusers"  # AutoencoderKL: vae/diffusion_pytorch_model.safetensors


# Containers of a VAE inside another checkpoint: SD-style (`first_stage_model.`), ComfyUI all-in-one (`vae.`).
VAE_PREFIXES = ("first_stage_model.", "vae.")

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

# diffusers module path -> BFL module path. {side} is encoder|decoder, {i} a level, {j} a resnet; {res} and
# {attn} are renamed by the two tables above; {up} = levels − 1 − i, because diffusers numbers the decoder's
# up blocks from the deepest level and BFL from the full-resolution one; {mid} = i + 1.
VAE_DIFFUSERS_TEMPLATES = (
    ("{side}.conv_in", "{side}.conv_in"),
    ("{side}.conv_out", "{side}.conv_out"),
    ("{side}.conv_norm_out", "{side}.norm_out"),
    ("encoder.down_blocks.{i}.resnets.{j}.{res}", "encoder.down.{i}.block.{j}.{res}"),
    ("encoder.down_blocks.{i}.downsamplers.0.conv", "encoder.down.{i}.downsample.conv"),
    ("decoder.up_blocks.{i}.resnets.{j}.{res}", "decoder.up.{up}.block.{j}.{res}"),
    ("decoder.up_blocks.{i}.upsamplers.0.conv", "decoder.up.{up}.upsample.conv"),
    ("{side}.mid_block.resnets.{i}.{res}", "{side}.mid.block_{mid}.{res}"),
    ("{side}.mid_block.attentions.0.{attn}", "{side}.mid.attn_1.{attn}"),
)
# BFL attention projections are 1×1 convs [C, C, 1, 1]; diffusers stores them as Linear weights [C, C].
VAE_LINEAR_AS_CONV = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")

_VAE_FIELDS = {
    "side": "(?P<side>encoder|decoder)",
    "i": r"(?P<i>\d+)",
    "j": r"(?P<j>\d+)",
    "res": f"(?P<res>{'|'.join(map(re.escape, _VAE_RESNET))})",
    "attn": f"(?P<attn>{'|'.join(map(re.escape, _VAE_ATTENTION))})",
}


def _template_pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, …
    return re.compile("^" + "".join(_VAE_FIELDS[p] if n % 2 else re.escape(p) for n, p in enumerate(parts)) + "$")


_VAE_PATTERNS = [(_template_pattern(src), dst) for src, dst in VAE_DIFFUSERS_TEMPLATES]


def vae_from_diffusers(module: str, levels: int) -> str | None:
    """BFL module path of a diffusers AutoencoderKL module path (None if no template matches).

    `levels` is the number of resolution levels (4 for the Flux VAE), needed to renumber decoder up blocks.
    """
    for pattern, dst in _VAE_PATTERNS:
        if m := pattern.match(module):
            f = m.groupdict()
            i = int(f["i"]) if f.get("i") else 0
            return dst.format(side=f.get("side"), i=f.get("i"), j=f.get("j"), res=_VAE_RESNET.get(f.get("res")),
                              attn=_VAE_ATTENTION.get(f.get("attn")), up=levels - 1 - i, mid=i + 1)
    return None
