"""Reading a Z-Image LoRA file of any trainer's format into per-module adapters (ZIMAGE_SPEC §6)."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from ..keymaps import Target
from ..safetensors_file import read_header
from .adapters import Adapter, AdapterKind, kind_of
from .keys import KOHYA_PREFIXES, parse_key


class LoraFormat(str, Enum):
    """The layout a file is written in (told from its keys; several trainers share one)."""

    MUSUBI = "musubi"  # lora_unet_<kohya name>.lora_down/lora_up + alpha (musubi-tuner native, sd-scripts style)
    PEFT = "peft"  # lora_A/lora_B on official names: AI Toolkit, the ostris adapter, musubi --target other, diffusers
    DIFFSYNTH = "diffsynth"  # lora_A/lora_B `.default`, no prefix (DiffSynth-Studio)
    DIFFUSION_PIPE = "diffusion-pipe"  # lora_A/lora_B on ComfyUI names (fused attention.qkv)
    COMFY = "comfy"  # lora_up/lora_down (+ alpha, diff, diff_b) on ComfyUI names: ComfyUI's trainer, our `comfy` output
    LYCORIS = "lycoris"  # LoHa / LoKr adapters


@dataclass(frozen=True)
class LoraPatch:
    """One module's adapter and where it lands in the DiT (canonical module, row block of a fused weight)."""

    module: str  # the module as the file names it (dotted), for reports
    target: Target
    adapter: Adapter


@dataclass(frozen=True)
class LoraFile:
    name: str
    format: LoraFormat
    patches: tuple[LoraPatch, ...]
    unmatched: tuple[str, ...]  # keys that name no Z-Image DiT module
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # readable but suspicious (e.g. kohya-style adapters without alpha)

    @property
    def ranks(self) -> list[int]:
        return sorted({p.adapter.rank for p in self.patches if p.adapter.rank})

    @property
    def alphas(self) -> list[float]:
        return sorted({p.adapter.alpha for p in self.patches if p.adapter.alpha is not None})


_FOREIGN = [  # (pattern in a key, the model family it belongs to)
    (re.compile(r"double_blocks|single_blocks|img_attn|txt_attn|single_transformer_blocks"), "Flux"),
    (re.compile(r"transformer_blocks\.\d+\.(attn|ff|norm1)\.|joint_blocks"), "Flux/SD3 (diffusers names)"),
    (re.compile(r"down_blocks|up_blocks|input_blocks|output_blocks|lora_te\d?_|text_model"), "SD 1.x/SDXL"),
    (re.compile(r"adaLN_modulation_1|adaLN_modulation\.1|\.attention\.(wq|wk|wv|wo)"), "Lumina-2"),
]


def read_lora(path: str | Path) -> LoraFile:
    """Read and check a LoRA file (safetensors only). Raises one clear error for an empty file, another model
    family's LoRA, or a broken adapter (rank mismatch, NaN/Inf, alpha 0)."""
    from safetensors.torch import load_file

    path = Path(path)
    header = read_header(path)  # refuses pickle and non-safetensors files with a clear message
    if not header.tensors:
        raise ValueError(f"{path}: an empty LoRA file (no tensors)")
    return lora_from_state_dict(load_file(path), path.name, header.metadata)


def lora_from_state_dict(sd: dict[str, torch.Tensor], name: str = "<state dict>",
                         metadata: dict[str, str] | None = None) -> LoraFile:
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    parsed: dict[str, tuple[str, Target]] = {}
    unmatched = []
    for key, tensor in sd.items():
        pk = parse_key(key)
        if pk is None:
            unmatched.append(key)
            continue
        group = f"{pk.group}.diff_b" if pk.role == "diff_b" else pk.group  # a bias change beside a weight's LoRA
        groups[group][pk.role] = tensor
        parsed[group] = (pk.module, pk.target)
    if not groups:
        raise ValueError(f"{name}: {_family(sd)}; no key names a Z-Image DiT module (first keys: {list(sd)[:3]})")
    patches = []
    for group, tensors in groups.items():
        module, target = parsed[group]
        try:
            adapter = Adapter(group, kind_of(set(tensors)), tensors)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        patches.append(LoraPatch(module, target, adapter))
    fmt = _format(list(sd), patches)
    return LoraFile(name, fmt, tuple(patches), tuple(unmatched), dict(metadata or {}), _warnings(sd, patches))


def _warnings(sd, patches: list[LoraPatch]) -> tuple[str, ...]:
    """kohya-style adapters (lora_down/lora_up, hada_*) without alpha: read at scale 1, as ComfyUI and diffusers
    do (ZIMAGE_SPEC §6.2), but kohya/musubi trainers always store alpha (default 1 → scale 1/rank)."""
    kohya = {pk.group for k in sd if k.endswith(("lora_down.weight", "hada_w1_a")) and (pk := parse_key(k))}
    bare = [p.adapter for p in patches if p.adapter.name in kohya and p.adapter.alpha is None]
    if not bare:
        return ()
    ranks = sorted({a.rank for a in bare if a.rank})
    return (f"{len(bare)} of {len(patches)} modules have no alpha key (e.g. {bare[0].name}): read at scale 1 as "
            f"ComfyUI does; kohya/musubi trainers store alpha (default 1 → scale 1/rank), so this LoRA may act up to "
            f"{max(ranks, default=1)}× stronger than trained (rank {ranks})",)


def _family(sd) -> str:
    for pattern, family in _FOREIGN:
        if any(pattern.search(k) for k in sd):
            return f"a {family} LoRA, not a Z-Image one"
    return "not a Z-Image LoRA"


def _format(keys: list[str], patches: list[LoraPatch]) -> LoraFormat:
    if any(p.adapter.kind in (AdapterKind.LOHA, AdapterKind.LOKR) for p in patches):
        return LoraFormat.LYCORIS
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        return LoraFormat.MUSUBI
    comfy_names = any(p.module.endswith(("attention.qkv", "attention.out")) for p in patches)
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        if any(".default." in k for k in keys):
            return LoraFormat.DIFFSYNTH
        return LoraFormat.DIFFUSION_PIPE if comfy_names else LoraFormat.PEFT
    return LoraFormat.COMFY
