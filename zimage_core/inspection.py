"""Describe a checkpoint from its safetensors headers: the logic of `python -m zimage_core inspect PATH`.

`inspect(path)` tells what a file or folder is and how the loaders will read it: a Z-Image DiT in any
layout `checkpoint.plan_dit` accepts, a Qwen3 text encoder, a Flux VAE, a LoRA in any ZIMAGE_SPEC §6
key style, a diffusers model root or a ComfyUI all-in-one checkpoint. Foreign models (Flux, SDXL,
Lumina-2) and unknown tensor files are reported with their kind, not refused. Only headers are read,
plus tiny metadata tensors (ComfyUI `comfy_quant` JSON blobs, LoRA `alpha` scalars); pickle files are
never opened. Unreadable input raises the loaders' own errors (ValueError / FileNotFoundError naming
the file and the problem), because it goes through the same `sources.open_source` and `plan_dit`.

Report: `path`, `kind` (a `probe.ModelKind` value; or "model_folder" for a diffusers root and
"checkpoint" for a ComfyUI all-in-one file, each with one report per part in `components`), `layout`,
`files`, `dtypes` (torch dtype name → tensor count), `parameters` (elements; fp8 scales and markers
and LoRA alphas excluded), `config` (inferred from shapes: `DiTConfig.to_dict()`, HF Qwen3 fields,
VAE channels, or the LoRA's adapter description) and `metadata` (safetensors `__metadata__`, values
clipped). DiTs and text encoders add `quant` and `prefix`.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path

from .checkpoint import plan_dit
from .config import Shapes, shape_dim
from .lora.keys import KOHYA_PREFIXES, ParsedKey, parse_key
from .probe import ModelKind, classify
from .safetensors_file import PICKLE_SUFFIXES, Header, TensorInfo, read_tensor
from .sources import Source, open_source
from .vae_config import vae_config, vae_layout

COMPONENT_FOLDERS = ("transformer", "text_encoder", "vae")  # diffusers model root, in report order
_QUANT_LEAVES = {"scaled_fp8", "scale_weight", "weight_scale", "weight_scale_2", "scale_input", "input_scale",
                 "comfy_quant"}
_METADATA_CHARS = 200


def inspect(path: str | Path) -> dict:
    """A JSON-ready description of the checkpoint at `path` (file, shard, index, folder or model root)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if _is_model_root(path):
            return _model_folder(path)
        _refuse_pickle_only(path)
    return describe(open_source(path))


def describe(src: Source) -> dict:
    """The report for an opened (header-validated) checkpoint."""
    if parts := _checkpoint_parts(src):
        return _checkpoint(src, parts)
    tensors = src.tensors()
    kind = classify(tensors)
    details = _DESCRIBERS[kind](src) if kind in _DESCRIBERS else {}
    report = {
        "path": str(src.path),
        "kind": kind.value,
        "layout": details.pop("layout", None),
        **{k: details.pop(k) for k in ("quant", "prefix") if k in details},
        "files": [str(f) for f in src.files],
        "dtypes": _dtypes(tensors),
        "parameters": sum(info.numel for k, (_, info) in tensors.items() if _is_parameter(k, kind)),
        "config": details.pop("config", None),
        **details,
    }
    if kind is ModelKind.UNKNOWN:
        report["sample_keys"] = sorted(tensors)[:10]
    report["metadata"] = {k: _clip(v) for k, v in sorted(src.metadata.items())}
    return report


# --- model roots -------------------------------------------------------------------------------------


def _is_model_root(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or any((folder / c).is_dir() for c in COMPONENT_FOLDERS)


def _model_folder(root: Path) -> dict:
    subs = [d for d in root.iterdir() if d.is_dir() and _weight_files(d)]
    subs.sort(key=lambda d: (COMPONENT_FOLDERS.index(d.name) if d.name in COMPONENT_FOLDERS else 99, d.name))
    if not subs:
        raise ValueError(f"{root}: a model folder, but none of its subfolders holds .safetensors weights")
    report = {"path": str(root), "kind": "model_folder"}
    try:
        report["pipeline"] = json.loads((root / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # model_index.json is informative only; the weights are what gets loaded
    report["components"] = {d.name: inspect(d) for d in subs}
    return report


def _weight_files(folder: Path) -> list[Path]:
    return [f for f in folder.iterdir() if f.name.endswith(".safetensors") or f.suffix.lower() in PICKLE_SUFFIXES]


def _refuse_pickle_only(folder: Path) -> None:
    files = _weight_files(folder)
    if files and not any(f.name.endswith(".safetensors") for f in files):
        raise ValueError(f"{folder}: holds only pickle checkpoints {sorted(f.name for f in files)}; only "
                         ".safetensors files are read, pickle files are never opened")


# --- ComfyUI all-in-one checkpoints ---------------------------------------------------------------------

# part -> container prefixes (ComfyUI's CheckpointLoaderSimple layout: supported_models + sd.py)
_CONTAINERS = {
    "diffusion_model": ("model.diffusion_model.",),
    "text_encoder": ("text_encoders.", "cond_stage_model.", "conditioner."),
    "vae": ("first_stage_model.", "vae."),
}


def _checkpoint_parts(src: Source) -> dict[str, Source]:
    """Each part of a file holding two or more containers, as its own Source ({} for a one-model file).

    VAE keys lose their container prefix (VAE names are told apart bare); DiT and text-encoder readers
    handle their prefixes themselves. A top-level `scaled_fp8` marker belongs to the diffusion model.
    """
    names: dict[str, dict[str, str]] = defaultdict(dict)  # part -> stored key -> key the part's reader sees
    for key in src.tensors():
        part, prefix = _container(key)
        if part is not None:
            names[part][key] = key.removeprefix(prefix) if part == "vae" else key
    if len(names) < 2:
        return {}

    def part_source(keys: dict[str, str]) -> Source:
        headers = [Header(h.path, {keys[k]: i for k, i in h.tensors.items() if k in keys}, h.metadata)
                   for h in src.headers]
        return Source(src.path, tuple(h for h in headers if h.tensors))

    return {part: part_source(names[part]) for part in _CONTAINERS if part in names}


def _container(key: str) -> tuple[str | None, str]:
    if key == "scaled_fp8":
        return "diffusion_model", ""
    for part, prefixes in _CONTAINERS.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                return part, prefix
    return None, ""


def _checkpoint(src: Source, parts: dict[str, Source]) -> dict:
    tensors = src.tensors()
    # The file's metadata is reported once, at the top.
    components = {part: {k: v for k, v in describe(sub).items() if k != "metadata"} for part, sub in parts.items()}
    return {
        "path": str(src.path),
        "kind": "checkpoint",
        "files": [str(f) for f in src.files],
        "dtypes": _dtypes(tensors),
        "parameters": sum(c.get("parameters", 0) for c in components.values()),
        "components": components,
        "other_keys": len(tensors) - sum(len(sub.tensors()) for sub in parts.values()),
        "metadata": {k: _clip(v) for k, v in sorted(src.metadata.items())},
    }


# --- per kind ----------------------------------------------------------------------------------------


def _dit(src: Source) -> dict:
    plan = plan_dit(src)
    return {
        "layout": plan.layout.value,
        "quant": plan.quant.value,
        "prefix": plan.prefix,
        "config": plan.config.to_dict(),
        "ignored_keys": sorted(k for k in plan.ignored if _leaf(k) not in _QUANT_LEAVES),
    }


_TE_CHECKPOINT = re.compile(r"^text_encoders\.\w+\.transformer\.")  # ComfyUI all-in-one checkpoint


def _text_encoder(src: Source) -> dict:
    tensors = src.tensors()
    container = next((m.group(0) for k in tensors if (m := _TE_CHECKPOINT.match(k))), "")
    prefix = container + "model." if any(k.startswith(container + "model.layers.") for k in tensors) else container
    layout = "comfy_checkpoint" if container else "hf" if prefix else "hf_no_prefix"
    shapes = {k.removeprefix(prefix): info.shape for k, (_, info) in tensors.items() if k.startswith(prefix)}
    config = text_encoder_config(shapes)
    config["lm_head"] = f"{container}lm_head.weight" in tensors
    return {"layout": layout, "quant": _quant(tensors), "prefix": prefix, "config": config}


def text_encoder_config(shapes: Shapes) -> dict:
    """HF config fields of a Qwen3 decoder, from shapes under bare names (`layers.0.self_attn.q_proj.weight`).

    Head counts come from the per-head q_norm/k_norm width (Qwen3 stores head_dim nowhere else); a
    decoder without them (not Qwen3) gets None there.
    """
    attn = "layers.0.self_attn."
    head_dim = shape_dim(shapes, attn + "q_norm.weight", 0)
    q_rows, kv_rows = shape_dim(shapes, attn + "q_proj.weight", 0), shape_dim(shapes, attn + "k_proj.weight", 0)
    return {
        "hidden_size": shape_dim(shapes, "embed_tokens.weight", 1) or shape_dim(shapes, attn + "q_proj.weight", 1),
        "num_hidden_layers": _count_blocks(shapes, "layers"),
        "num_attention_heads": q_rows // head_dim if q_rows and head_dim else None,
        "num_key_value_heads": kv_rows // head_dim if kv_rows and head_dim else None,
        "head_dim": head_dim,
        "intermediate_size": shape_dim(shapes, "layers.0.mlp.gate_proj.weight", 0),
        "vocab_size": shape_dim(shapes, "embed_tokens.weight", 0),
    }


def _vae(src: Source) -> dict:
    tensors = src.tensors()
    shapes = {k: info.shape for k, (_, info) in tensors.items()}
    return {"layout": vae_layout(shapes).value, "quant": _quant(tensors), "config": vae_config(shapes)}


# --- LoRA ------------------------------------------------------------------------------------------
# Keys are parsed by the LoRA package's one parser (`lora.keys.parse_key`), on names only: no tensor is read.

_RANK_LEAVES = {"lora_A.weight", "lora_A.default.weight", "lora_down.weight", "lora.down.weight", "hada_w1_b",
                "lokr_w1_b", "lokr_w2_b"}  # (rank, in_features, ...) factors
_TARGETS = (  # on the canonical module name; first match wins
    ("refiners", re.compile(r"^(noise|context)_refiner\.\d+\.")),
    ("norms", re.compile(r"^layers\.\d+\.(attention|ffn)_norm")),
    ("attention", re.compile(r"^layers\.\d+\.attention\.")),
    ("feed_forward", re.compile(r"^layers\.\d+\.feed_forward\.")),
    ("adaLN", re.compile(r"^layers\.\d+\.adaLN_modulation")),
    ("embedders", re.compile(r"^(x|cap|t)_embedder")),
    ("final_layer", re.compile(r"^final_layer")),
)


def _lora(src: Source) -> dict:
    tensors = src.tensors()
    modules: dict[str, dict[str, TensorInfo]] = defaultdict(dict)  # key group (module as written) -> leaf -> info
    parsed: dict[str, ParsedKey] = {}
    unrecognised = 0
    for key, (_, info) in tensors.items():
        if pk := parse_key(key):
            modules[pk.group][key[len(pk.group) + 1:]] = info
            parsed[pk.group] = pk
        else:
            unrecognised += 1
    adapted = {name: leaves for name, leaves in modules.items() if any(map(_algorithm, leaves))}
    prefixes = sorted({parsed[name].prefix for name in adapted})
    written = [parsed[name].module for name in adapted]  # dotted, in the file's own naming
    canonical = [parsed[name].target.module for name in adapted]
    alphas = [k for k in tensors if k.endswith(".alpha")]
    config = {
        "algorithm": "+".join(sorted({a for leaves in adapted.values() for a in map(_algorithm, leaves) if a})),
        "naming": "kohya" if any(p in KOHYA_PREFIXES for p in prefixes) else "dotted",
        "prefix": prefixes[0] if len(prefixes) == 1 else prefixes,
        "peft_default": any(".default." in leaf for leaves in adapted.values() for leaf in leaves),
        "attention": _attention_style(written),
        "ranks": sorted({int(info.shape[0]) for leaves in adapted.values() for leaf, info in leaves.items()
                         if leaf in _RANK_LEAVES}),
        "alpha": bool(alphas),
        "alphas": sorted(set(_scalars(src, alphas))),
        "modules": len(adapted),
        "layers": len({m.group(1) for c in canonical if (m := re.match(r"^layers\.(\d+)\.", c))}),
        "targets": dict(sorted(Counter(target_group(c) for c in canonical).items())),
        "diff": sum(k.endswith(".diff") for k in tensors),
        "diff_b": sum(k.endswith(".diff_b") for k in tensors),
        "unrecognised_keys": unrecognised,
    }
    return {"layout": _lora_layout(config, adapted), "config": config}


def _algorithm(leaf: str) -> str | None:
    if leaf.startswith(("lora_", "lora.")):
        return "lora"
    return {"hada_": "loha", "lokr_": "lokr"}.get(leaf[:5])


def _lora_layout(config: dict, adapted: Mapping[str, Mapping[str, TensorInfo]]) -> str:
    """kohya (`lora_unet_…` + lora_up/lora_down), peft (lora_A/lora_B), comfy (dotted lora_up/lora_down),
    lora_dot (`.lora.up`/`.lora.down`), loha, lokr; several joined with '+'."""
    if config["algorithm"] != "lora":
        return config["algorithm"] or "none"
    if config["naming"] == "kohya":
        return "kohya"
    styles = {"peft" if leaf.startswith(("lora_A", "lora_B")) else "lora_dot" if leaf.startswith("lora.") else "comfy"
              for leaves in adapted.values() for leaf in leaves if _algorithm(leaf)}
    return "+".join(sorted(styles))


def _attention_style(modules: list[str]) -> str:
    fused = any(m.endswith(".attention.qkv") for m in modules)
    split = any(re.search(r"\.attention\.to_[qkv]$", m) for m in modules)
    return "+".join(name for name, found in (("fused_qkv", fused), ("split_qkv", split)) if found) or "none"


def target_group(canonical: str) -> str:
    """The report group of a canonical DiT module: refiners, norms, attention, feed_forward, adaLN, embedders,
    final_layer or other (also `lora inspect`'s coverage groups, with the refiners told apart)."""
    return next((name for name, pattern in _TARGETS if pattern.match(canonical)), "other")


def _scalars(src: Source, keys: list[str]) -> list[float]:
    """Values of one-element tensors (LoRA alphas): a few bytes each, read file by file."""
    tensors = src.tensors()
    by_file: dict[Path, list[TensorInfo]] = defaultdict(list)
    for k in keys:
        header, info = tensors[k]
        if info.numel == 1:
            by_file[header.path].append(info)
    values = []
    for path, infos in by_file.items():
        with open(path, "rb") as f:
            values += [read_tensor(f, info).float().item() for info in sorted(infos, key=lambda i: i.start)]
    return values


# --- helpers -----------------------------------------------------------------------------------------

_DESCRIBERS: dict[ModelKind, Callable[[Source], dict]] = {
    ModelKind.ZIMAGE_DIT: _dit, ModelKind.TEXT_ENCODER: _text_encoder, ModelKind.VAE: _vae, ModelKind.LORA: _lora}


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


def _is_parameter(key: str, kind: ModelKind) -> bool:
    leaf = _leaf(key)
    return leaf not in _QUANT_LEAVES and not (kind is ModelKind.LORA and leaf == "alpha")


def _quant(tensors: Mapping) -> str:
    leaves = {_leaf(k) for k in tensors}
    return "scaled_fp8" if "scaled_fp8" in leaves else "comfy_quant" if "comfy_quant" in leaves else "none"


def _dtypes(tensors: Mapping[str, tuple[Header, TensorInfo]]) -> dict[str, int]:
    """torch dtype name (without `torch.`) -> number of tensors."""
    return dict(sorted(Counter(str(info.dtype).removeprefix("torch.") for _, info in tensors.values()).items()))



def _count_blocks(shapes: Shapes, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return len({m.group(1) for k in shapes if (m := pattern.match(k))})


def _clip(value: str) -> str:
    return value if len(value) <= _METADATA_CHARS else value[:_METADATA_CHARS] + f"… ({len(value)} chars)"
