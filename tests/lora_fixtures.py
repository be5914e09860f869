"""Tiny Z-Image LoRA files in the exact key layouts real trainers write, with the dense ΔW each one stands for.

Every writer follows the per-tool rules of ZIMAGE_SPEC §6 (key pattern, alpha convention, default targets, q/k/v
fusion); the dense deltas are computed here from those rules alone, never from `zimage_core`, so a wrong key table
or scale convention in the loader cannot agree with itself. Deltas are keyed by the canonical (ComfyUI single-file)
weight names, e.g. `layers.0.attention.qkv.weight`, and have that tensor's full shape (zeros in untouched rows).

Scale rules used (all at strength 1; `merged(base, s)` applies `W + s·ΔW`):
- kohya/musubi `lora_down/lora_up` + `.alpha`: ΔW = alpha/r · up @ down (r = down.shape[0]); no `.alpha` key → 1.
- PEFT `lora_A/lora_B` without alpha (AI Toolkit, diffusers, DiffSynth, diffusion-pipe): ΔW = B @ A.
- LoHa: ΔW = (w1_a @ w1_b) * (w2_a @ w2_b) · alpha/r with r = w1_b.shape[0].
- LoKr: ΔW = kron(w1, w2) · alpha/r where r = w2_b.shape[0] when w2 is stored as w2_a @ w2_b; a full w2 (and full
  w1) means scale 1 whatever alpha says (ComfyUI `weight_adapter/lokr.py`, diffusers `_bake_lokr_alpha_`).
- DoRA (`.dora_scale` [out, 1], ComfyUI's name): W' = m · (W + ΔW) / ‖W + ΔW‖_row (the DoRA paper / PEFT / LyCORIS
  rule), and at strength s: W + s·(W' − W) (ComfyUI's interpolation). ComfyUI 0.3.75 instead divides by ‖W‖_row
  for this output-axis layout (`weight_adapter/base.py weight_decompose`); `merged(..., dora_norm="base")` gives that.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from safetensors.torch import save_file

from zimage_fixtures import TINY


class Fmt(str, Enum):
    MUSUBI = "musubi"  # lora_unet_layers_0_attention_to_q.lora_down/.lora_up/.alpha; alpha default 1 → 1/r
    MUSUBI_OTHER = "musubi-other"  # convert_lora.py --target other: diffusion_model.….to_q.lora_A/B, √(α/r) baked
    MUSUBI_COMFY = "musubi-comfy"  # convert_z_image_lora_to_comfy: fused attention_qkv (block-diag up, α×3), out
    AI_TOOLKIT = "ai-toolkit"  # diffusion_model.layers.0.attention.to_q.lora_A/B, no alpha; + adaLN; no refiners
    PEFT_TRANSFORMER = "peft-transformer"  # transformer.layers.0.attention.to_q.lora_A/B (save_lora_weights)
    PEFT_BASE_MODEL = "peft-base-model"  # base_model.model.layers.0.attention.to_q.lora_A/B (raw PEFT)
    DIFFSYNTH = "diffsynth"  # layers.0.attention.to_q.lora_A.default.weight, all blocks incl. refiners
    DIFFUSION_PIPE = "diffusion-pipe"  # diffusion_model.layers.0.attention.qkv.lora_A/B (full B [3·dim, r])
    COMFY_TRAINER = "comfy-trainer"  # diffusion_model.….qkv.lora_up/lora_down/alpha(=1), .diff (1-D), .diff_b
    OSTRIS_ADAPTER = "ostris-adapter"  # training adapter: AI Toolkit layout, no alpha
    LOHA = "loha"  # lora_unet_layers_0_attention_to_q.hada_w1_a/… + .alpha (kohya names, musubi targets)
    LOKR = "lokr"  # diffusion_model.layers.0.attention.to_q.lokr_w1 + lokr_w2_a/b (attn) or lokr_w2 (ffn) + alpha
    DORA = "dora"  # AI Toolkit lora_A/B + `.dora_scale` [out, 1]


# ---------------------------------------------------------------------------------------------- canonical model


def split_qkv_rows(dim: int) -> dict[str, slice]:
    """Rows of the fused `attention.qkv.weight` [3·dim, dim] that hold q, k, v."""
    return {"q": slice(0, dim), "k": slice(dim, 2 * dim), "v": slice(2 * dim, 3 * dim)}


def ffn_hidden(dim: int) -> int:
    return int(dim / 3 * 8)


def _blocks(cfg: dict) -> list[tuple[str, bool]]:
    """(block prefix, has adaLN) for every transformer block."""
    return ([(f"layers.{i}", True) for i in range(cfg["n_layers"])]
            + [(f"noise_refiner.{j}", True) for j in range(cfg["n_refiner_layers"])]
            + [(f"context_refiner.{j}", False) for j in range(cfg["n_refiner_layers"])])


def canonical_shapes(cfg: dict = TINY) -> dict[str, tuple[int, ...]]:
    """Every tensor of the ComfyUI single-file DiT (without the optional Lumina-2 leftover `norm_final.weight`)."""
    dim, hid, head = cfg["dim"], ffn_hidden(cfg["dim"]), cfg["dim"] // cfg["n_heads"]
    adaln, t_mid, patch = min(dim, 256), 1024, 2 * 2 * 16
    out = {"x_pad_token": (1, dim), "cap_pad_token": (1, dim),
           "x_embedder.weight": (dim, patch), "x_embedder.bias": (dim,),
           "final_layer.linear.weight": (patch, dim), "final_layer.linear.bias": (patch,),
           "final_layer.adaLN_modulation.1.weight": (dim, adaln), "final_layer.adaLN_modulation.1.bias": (dim,),
           "t_embedder.mlp.0.weight": (t_mid, 256), "t_embedder.mlp.0.bias": (t_mid,),
           "t_embedder.mlp.2.weight": (adaln, t_mid), "t_embedder.mlp.2.bias": (adaln,),
           "cap_embedder.0.weight": (cfg["cap_feat_dim"],),
           "cap_embedder.1.weight": (dim, cfg["cap_feat_dim"]), "cap_embedder.1.bias": (dim,)}
    for p, has_adaln in _blocks(cfg):
        out |= {f"{p}.attention.qkv.weight": (3 * dim, dim), f"{p}.attention.out.weight": (dim, dim),
                f"{p}.attention.q_norm.weight": (head,), f"{p}.attention.k_norm.weight": (head,),
                f"{p}.feed_forward.w1.weight": (hid, dim), f"{p}.feed_forward.w2.weight": (dim, hid),
                f"{p}.feed_forward.w3.weight": (hid, dim)}
        out |= {f"{p}.{n}.weight": (dim,) for n in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2")}
        if has_adaln:
            out |= {f"{p}.adaLN_modulation.0.weight": (4 * dim, adaln), f"{p}.adaLN_modulation.0.bias": (4 * dim,)}
    return out


@dataclass(frozen=True)
class Target:
    """One adapted module: `name` as the tool spells the module path (dots), and where it lands canonically."""

    name: str  # e.g. "layers.0.attention.to_q" (diffusers names) or "layers.0.attention.qkv" (ComfyUI names)
    canonical: str  # canonical weight key
    rows: slice | None = None  # row block of `canonical` (q/k/v of the fused qkv), None = all rows


def _diffusers_targets(cfg: dict, blocks: list[tuple[str, bool]], modules: tuple[str, ...]) -> list[Target]:
    rows = split_qkv_rows(cfg["dim"])
    out = []
    for p, has_adaln in blocks:
        for m in modules:
            if m in ("to_q", "to_k", "to_v"):
                out.append(Target(f"{p}.attention.{m}", f"{p}.attention.qkv.weight", rows[m[-1]]))
            elif m == "to_out.0":
                out.append(Target(f"{p}.attention.to_out.0", f"{p}.attention.out.weight"))
            elif m in ("w1", "w2", "w3"):
                out.append(Target(f"{p}.feed_forward.{m}", f"{p}.feed_forward.{m}.weight"))
            elif m == "adaLN_modulation.0" and has_adaln:
                out.append(Target(f"{p}.adaLN_modulation.0", f"{p}.adaLN_modulation.0.weight"))
    return out


def _comfy_targets(cfg: dict, blocks: list[tuple[str, bool]], modules: tuple[str, ...]) -> list[Target]:
    out = []
    for p, has_adaln in blocks:
        for m in modules:
            if m == "adaLN_modulation.0" and not has_adaln:
                continue
            name = f"{p}.{'attention.' if m in ('qkv', 'out') else 'feed_forward.' if m[0] == 'w' else ''}{m}"
            out.append(Target(name, name + ".weight"))
    return out


ATTN_FFN = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
GLOBAL_LINEARS = ("x_embedder", "final_layer.linear", "final_layer.adaLN_modulation.1", "cap_embedder.1",
                  "t_embedder.mlp.0", "t_embedder.mlp.2")


def targets(fmt: Fmt, cfg: dict = TINY) -> list[Target]:
    """The modules each tool adapts by default (ZIMAGE_SPEC §6.1 table)."""
    main = [b for b in _blocks(cfg) if b[0].startswith("layers.")]
    if fmt in (Fmt.MUSUBI, Fmt.MUSUBI_OTHER, Fmt.LOHA):  # musubi: main layers, no *_modulation / *_refiner
        return _diffusers_targets(cfg, main, ATTN_FFN)
    if fmt is Fmt.MUSUBI_COMFY:
        return _comfy_targets(cfg, main, ("qkv", "out", "w1", "w2", "w3"))
    if fmt in (Fmt.AI_TOOLKIT, Fmt.OSTRIS_ADAPTER, Fmt.LOKR, Fmt.DORA):  # "layers" only, adaLN included
        return _diffusers_targets(cfg, main, (*ATTN_FFN, "adaLN_modulation.0"))
    if fmt in (Fmt.PEFT_TRANSFORMER, Fmt.PEFT_BASE_MODEL):  # diffusers training scripts: attention projections
        return _diffusers_targets(cfg, _blocks(cfg), ("to_q", "to_k", "to_v", "to_out.0"))
    if fmt is Fmt.DIFFSYNTH:  # PEFT suffix match over all 34 (here 6) blocks
        return _diffusers_targets(cfg, _blocks(cfg), ATTN_FFN)
    if fmt is Fmt.DIFFUSION_PIPE:
        return _comfy_targets(cfg, _blocks(cfg), ("qkv", "out", "w1", "w2", "w3", "adaLN_modulation.0"))
    if fmt is Fmt.COMFY_TRAINER:  # every Linear of the whole model
        blocks = _comfy_targets(cfg, _blocks(cfg), ("qkv", "out", "w1", "w2", "w3", "adaLN_modulation.0"))
        return blocks + [Target(n, n + ".weight") for n in GLOBAL_LINEARS]
    raise ValueError(fmt)


# ------------------------------------------------------------------------------------------------------ writing


@dataclass
class WrittenLora:
    path: Path
    keys: list[str]  # every key written
    deltas: dict[str, torch.Tensor] = field(repr=False)  # canonical key → dense fp32 ΔW, full shape, strength 1
    dora: bool = False  # True: `deltas` holds only the low-rank ΔW; use `merged` (the DoRA rule)
    magnitudes: dict[str, list[tuple[slice, torch.Tensor]]] = field(default_factory=dict)  # DoRA: key → [(rows, m)]
    alpha: float | None = None  # the alpha value written (None: no alpha key)
    rank: int = 0

    def merged(self, base: dict[str, torch.Tensor], strength: float = 1.0,
               dora_norm: str = "adapted") -> dict[str, torch.Tensor]:
        """`base` (canonical state dict) with this LoRA applied at `strength`; untouched tensors pass through."""
        out = dict(base)
        for key, delta in self.deltas.items():
            w = base[key].float()
            if self.dora and key in self.magnitudes:
                w = w.clone()
                for rows, m in self.magnitudes[key]:
                    w[rows] = dora_merge(w[rows], delta[rows], m, strength, dora_norm)
                out[key] = w.to(base[key].dtype)
            else:
                out[key] = (w + strength * delta).to(base[key].dtype)
        return out


def dora_merge(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float = 1.0,
               norm: str = "adapted") -> torch.Tensor:
    """DoRA with a per-output-row magnitude [out, 1]: W + s·(m·(W+ΔW)/(‖·‖_row + eps) − W).

    norm="adapted" divides by the row norms of W + ΔW (DoRA paper, PEFT, LyCORIS); norm="base" by those of W
    (ComfyUI 0.3.75's output-axis branch)."""
    adapted = w + delta
    ref = adapted if norm == "adapted" else w
    row_norm = ref.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
    return w + strength * (adapted * (magnitude.float() / row_norm) - w)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g)


def _target_std(out_rows: int, in_features: int) -> float:
    return 0.1 / math.sqrt(in_features)  # ~0.1 of a weight ~ N(0, 1/in)


def _lora_pair(g, out_f: int, in_f: int, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) with scale·up@down of std ≈ 0.1/√in."""
    down = _randn(g, rank, in_f) / math.sqrt(in_f)
    up = _randn(g, out_f, rank) * (0.1 / math.sqrt(rank) / scale)
    return up, down


def _empty_deltas(ts: list[Target], shapes: dict) -> dict[str, torch.Tensor]:
    return {t.canonical: torch.zeros(shapes[t.canonical]) for t in ts}


def _add(deltas: dict, t: Target, d: torch.Tensor) -> None:
    rows = t.rows if t.rows is not None else slice(None)
    deltas[t.canonical][rows] += d


def _store(sd: dict, dtype) -> dict:
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.float()


def write_lora(fmt: Fmt, path: Path, *, rank: int = 4, alpha: float | None = None, seed: int = 0,
               cfg: dict = TINY, dtype: torch.dtype = torch.float32) -> WrittenLora:
    """Write a tiny LoRA of `fmt` for the DiT of `cfg` to `path`; return its keys and dense deltas.

    `alpha`: the alpha written for formats that store one (musubi default 1, LoHa 1, LoKr 2, ComfyUI trainer 1,
    musubi's `--target other` bakes it in). Formats without an alpha key ignore it (scale 1). Deltas are computed
    from the tensors as stored (after the cast to `dtype`), in fp32."""
    fmt = Fmt(fmt)
    path = Path(path)
    g = torch.Generator().manual_seed(seed)
    shapes = canonical_shapes(cfg)
    ts = targets(fmt, cfg)
    deltas = _empty_deltas(ts, shapes)
    sd: dict[str, torch.Tensor] = {}
    written_alpha = None

    def shape_of(t: Target) -> tuple[int, int]:
        rows = shapes[t.canonical][0] if t.rows is None else t.rows.stop - t.rows.start
        return rows, shapes[t.canonical][1]

    if fmt in (Fmt.MUSUBI, Fmt.LOHA, Fmt.MUSUBI_COMFY):
        written_alpha = 1.0 if alpha is None else float(alpha)
    if fmt is Fmt.COMFY_TRAINER:
        written_alpha = 1.0 if alpha is None else float(alpha)
    if fmt is Fmt.LOKR:
        written_alpha = 2.0 if alpha is None else float(alpha)

    if fmt in (Fmt.MUSUBI, Fmt.MUSUBI_OTHER, Fmt.AI_TOOLKIT, Fmt.OSTRIS_ADAPTER, Fmt.PEFT_TRANSFORMER,
               Fmt.PEFT_BASE_MODEL, Fmt.DIFFSYNTH, Fmt.DIFFUSION_PIPE, Fmt.COMFY_TRAINER, Fmt.DORA):
        for t in ts:
            out_f, in_f = shape_of(t)
            if fmt is Fmt.MUSUBI:
                scale = written_alpha / rank
                up, down = _lora_pair(g, out_f, in_f, rank, scale if scale else 1.0)
                base = "lora_unet_" + t.name.replace(".", "_")
                sd |= _store({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up}, dtype)
                sd[f"{base}.alpha"] = torch.tensor(written_alpha, dtype=dtype)
                _add(deltas, t, scale * _f(sd[f"{base}.lora_up.weight"]) @ _f(sd[f"{base}.lora_down.weight"]))
            elif fmt is Fmt.COMFY_TRAINER:
                scale = written_alpha / rank
                up, down = _lora_pair(g, out_f, in_f, rank, scale if scale else 1.0)
                base = "diffusion_model." + t.name
                sd |= _store({f"{base}.lora_up.weight": up, f"{base}.lora_down.weight": down}, dtype)
                sd[f"{base}.alpha"] = torch.tensor(written_alpha, dtype=dtype)
                _add(deltas, t, scale * _f(sd[f"{base}.lora_up.weight"]) @ _f(sd[f"{base}.lora_down.weight"]))
            else:
                if fmt is Fmt.MUSUBI_OTHER:  # musubi's alpha (default 1) baked in: each factor × √(α/r)
                    root = math.sqrt((1.0 if alpha is None else float(alpha)) / rank)
                    up, down = _lora_pair(g, out_f, in_f, rank, root * root or 1.0)
                    up, down = up * root, down * root
                else:
                    up, down = _lora_pair(g, out_f, in_f, rank, 1.0)
                prefix = {Fmt.MUSUBI_OTHER: "diffusion_model.", Fmt.AI_TOOLKIT: "diffusion_model.",
                          Fmt.OSTRIS_ADAPTER: "diffusion_model.", Fmt.DORA: "diffusion_model.",
                          Fmt.DIFFUSION_PIPE: "diffusion_model.", Fmt.PEFT_TRANSFORMER: "transformer.",
                          Fmt.PEFT_BASE_MODEL: "base_model.model.", Fmt.DIFFSYNTH: ""}[fmt]
                mid = ".default" if fmt is Fmt.DIFFSYNTH else ""
                base = prefix + t.name
                a_key, b_key = f"{base}.lora_A{mid}.weight", f"{base}.lora_B{mid}.weight"
                sd |= _store({a_key: down, b_key: up}, dtype)
                _add(deltas, t, _f(sd[b_key]) @ _f(sd[a_key]))
                if fmt is Fmt.DORA:
                    sd[f"{base}.dora_scale"] = (1 + 0.1 * _randn(g, out_f, 1)).to(dtype)
        if fmt is Fmt.COMFY_TRAINER:  # full diffs for 1-D weights (norms) and every bias
            for key, shape in shapes.items():
                if len(shape) != 1:
                    continue
                name, suffix = key.rsplit(".", 1)
                diff = 0.05 * _randn(g, *shape)
                file_key = f"diffusion_model.{name}.{'diff' if suffix == 'weight' else 'diff_b'}"
                sd[file_key] = diff.to(dtype)
                deltas[key] = _f(sd[file_key])

    elif fmt is Fmt.MUSUBI_COMFY:
        # musubi's lora_unet_ LoRA on to_q/to_k/to_v fused: down = cat(d_q, d_k, d_v) [3r, in], up block-diagonal
        # [3·dim, 3r], alpha × 3 (so alpha/rank is unchanged); to_out_0 → attention_out; FFN as is.
        dim = cfg["dim"]
        rows = split_qkv_rows(dim)
        scale = written_alpha / rank
        for t in ts:
            base = "lora_unet_" + t.name.replace(".", "_")
            if t.name.endswith(".qkv"):
                pairs = [_lora_pair(g, dim, dim, rank, scale) for _ in "qkv"]
                pairs = [(u.to(dtype), d.to(dtype)) for u, d in pairs]
                up = torch.zeros(3 * dim, 3 * rank, dtype=dtype)
                for i, (u, _) in enumerate(pairs):
                    up[i * dim:(i + 1) * dim, i * rank:(i + 1) * rank] = u
                sd[f"{base}.lora_down.weight"] = torch.cat([d for _, d in pairs]).contiguous()
                sd[f"{base}.lora_up.weight"] = up
                sd[f"{base}.alpha"] = torch.tensor(written_alpha * 3, dtype=dtype)
                for (u, d), r in zip(pairs, rows.values(), strict=True):  # ΔW from the unfused q/k/v factors
                    deltas[t.canonical][r] += scale * _f(u) @ _f(d)
            else:
                out_f, in_f = shape_of(t)
                up, down = _lora_pair(g, out_f, in_f, rank, scale)
                sd |= _store({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up}, dtype)
                sd[f"{base}.alpha"] = torch.tensor(written_alpha, dtype=dtype)
                _add(deltas, t, scale * _f(sd[f"{base}.lora_up.weight"]) @ _f(sd[f"{base}.lora_down.weight"]))

    elif fmt is Fmt.LOHA:
        scale = written_alpha / rank
        for t in ts:
            out_f, in_f = shape_of(t)
            base = "lora_unet_" + t.name.replace(".", "_")
            w1a, w1b = _randn(g, out_f, rank), _randn(g, rank, in_f)
            w2a, w2b = _randn(g, out_f, rank), _randn(g, rank, in_f)
            # each product has std √r; the Hadamard product r; aim for 0.1/√in after the alpha/r scale
            k = math.sqrt(_target_std(out_f, in_f) / (rank * (scale if scale else 1.0)))
            sd |= _store({f"{base}.hada_w1_a": w1a * k, f"{base}.hada_w1_b": w1b,
                          f"{base}.hada_w2_a": w2a * k, f"{base}.hada_w2_b": w2b}, dtype)
            sd[f"{base}.alpha"] = torch.tensor(written_alpha, dtype=dtype)
            d = (_f(sd[f"{base}.hada_w1_a"]) @ _f(sd[f"{base}.hada_w1_b"])) * (
                _f(sd[f"{base}.hada_w2_a"]) @ _f(sd[f"{base}.hada_w2_b"]))
            _add(deltas, t, scale * d)

    elif fmt is Fmt.LOKR:
        # AI Toolkit naming; w1 full [o1, i1]; attention: w2 low rank (w2_a [o2, r] @ w2_b [r, i2]) → scale α/r;
        # FFN and adaLN: w2 full → scale 1 although an alpha key is present (LyCORIS writes alpha for every module).
        for t in ts:
            out_f, in_f = shape_of(t)
            o1, i1 = _small_factor(out_f), _small_factor(in_f)
            o2, i2 = out_f // o1, in_f // i1
            base = "diffusion_model." + t.name
            w1 = _randn(g, o1, i1)
            if ".attention." in t.name:
                scale = written_alpha / rank
                w2a = _randn(g, o2, rank)
                w2b = _randn(g, rank, i2) * (_target_std(out_f, in_f) / (rank**0.5 * (scale or 1.0)))
                sd |= _store({f"{base}.lokr_w1": w1, f"{base}.lokr_w2_a": w2a, f"{base}.lokr_w2_b": w2b}, dtype)
                w2 = _f(sd[f"{base}.lokr_w2_a"]) @ _f(sd[f"{base}.lokr_w2_b"])
            else:
                scale = 1.0
                sd |= _store({f"{base}.lokr_w1": w1, f"{base}.lokr_w2": _randn(g, o2, i2) * _target_std(out_f, in_f)},
                             dtype)
                w2 = _f(sd[f"{base}.lokr_w2"])
            sd[f"{base}.alpha"] = torch.tensor(written_alpha, dtype=dtype)
            _add(deltas, t, scale * torch.kron(_f(sd[f"{base}.lokr_w1"]), w2))
    else:
        raise ValueError(fmt)

    save_file(sd, path)
    written = WrittenLora(path, sorted(sd), deltas, alpha=written_alpha, rank=rank)
    if fmt is Fmt.DORA:
        written.dora = True
        for t in ts:
            m = sd[f"diffusion_model.{t.name}.dora_scale"]
            written.magnitudes.setdefault(t.canonical, []).append((t.rows if t.rows is not None else slice(None), m))
    return written


def _small_factor(n: int) -> int:
    """The Kronecker split used for LoKr's small w1: 4 if it divides n, else 2, else 1."""
    return 4 if n % 4 == 0 else 2 if n % 2 == 0 else 1


# -------------------------------------------------------------------------------------- other model families


def _write_pairs(path: Path, modules: dict[str, tuple[int, int]], a: str, b: str, rank: int = 2,
                 alpha: bool = False) -> Path:
    g = torch.Generator().manual_seed(7)
    sd = {}
    for name, (out_f, in_f) in modules.items():
        sd[f"{name}.{a}"] = 0.01 * _randn(g, rank, in_f)
        sd[f"{name}.{b}"] = 0.01 * _randn(g, out_f, rank)
        if alpha:
            sd[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(sd, path)
    return Path(path)


def write_flux_kohya(path: Path) -> Path:
    """Flux.1 LoRA, kohya names (hidden 3072, fused img qkv 9216)."""
    return _write_pairs(path, {"lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072),
                               "lora_unet_double_blocks_0_img_attn_proj": (3072, 3072),
                               "lora_unet_single_blocks_0_linear1": (21504, 3072)},
                        "lora_down.weight", "lora_up.weight", alpha=True)


def write_flux_diffusers(path: Path) -> Path:
    """Flux.1 LoRA, diffusers names."""
    return _write_pairs(path, {f"transformer.transformer_blocks.0.attn.to_{p}": (3072, 3072) for p in "qkv"}
                        | {"transformer.single_transformer_blocks.0.proj_out": (3072, 15360)},
                        "lora_A.weight", "lora_B.weight")


def write_sdxl(path: Path) -> Path:
    """SDXL LoRA, kohya names (UNet + both text encoders)."""
    return _write_pairs(path, {"lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320),
                               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (640, 640),
                               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
                               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280)},
                        "lora_down.weight", "lora_up.weight", alpha=True)


def write_lumina2(path: Path) -> Path:
    """Lumina-2 LoRA: the same module names as Z-Image's ComfyUI names, but Lumina-2 shapes (dim 2304, 24 heads of
    96, 8 KV heads → qkv out 2304 + 2·8·96 = 3840; FFN 6144): in_features 2304 fits no Z-Image config."""
    mods = {}
    for i in range(2):
        mods |= {f"diffusion_model.layers.{i}.attention.qkv": (3840, 2304),
                 f"diffusion_model.layers.{i}.attention.out": (2304, 2304),
                 f"diffusion_model.layers.{i}.feed_forward.w1": (6144, 2304)}
    return _write_pairs(path, mods, "lora_A.weight", "lora_B.weight")


FOREIGN_LORAS: dict[str, Callable[[Path], Path]] = {
    "flux-kohya": write_flux_kohya,
    "flux-diffusers": write_flux_diffusers,
    "sdxl": write_sdxl,
    "lumina2": write_lumina2,
}


# ------------------------------------------------------------------------------------------------- bad inputs


def write_empty(path: Path) -> Path:
    """A valid safetensors file with no tensors."""
    save_file({}, path)
    return Path(path)


def write_not_safetensors(path: Path) -> Path:
    """Bytes that are not safetensors (a header length far past the end of the file, then text)."""
    Path(path).write_bytes(struct.pack("<Q", 10**9) + b"this is not a safetensors file\n")
    return Path(path)


def write_rank_mismatch(path: Path) -> Path:
    """AI Toolkit layout where one module's lora_A has rank 4 and its lora_B rank 3."""
    written = write_lora(Fmt.AI_TOOLKIT, path)
    from safetensors.torch import load_file

    sd = load_file(path)
    key = "diffusion_model.layers.0.attention.to_q.lora_B.weight"
    sd[key] = sd[key][:, :3].contiguous()
    save_file(sd, path)
    return written.path


def write_nan(path: Path) -> Path:
    """AI Toolkit layout with one NaN in one lora_A."""
    write_lora(Fmt.AI_TOOLKIT, path)
    from safetensors.torch import load_file

    sd = load_file(path)
    sd["diffusion_model.layers.1.feed_forward.w2.lora_A.weight"][0, 0] = float("nan")
    save_file(sd, path)
    return Path(path)


def write_alpha_zero(path: Path) -> WrittenLora:
    """musubi layout with every alpha = 0: by the alpha/r rule (ComfyUI) the LoRA is a no-op; `deltas` are zero."""
    return write_lora(Fmt.MUSUBI, path, alpha=0.0)


def write_musubi_without_alpha(path: Path) -> WrittenLora:
    """musubi layout with the `.alpha` keys left out (musubi itself always writes them). Expected behaviour, as
    ComfyUI (`load_lora`: alpha None → scale 1) and diffusers (`get_alpha_scales` → 1, 1) read it: scale 1, so
    ΔW = up @ down; the returned `deltas` say exactly that."""
    from safetensors.torch import load_file

    written = write_lora(Fmt.MUSUBI, path, alpha=4.0, rank=4)  # alpha = rank: the musubi deltas already use scale 1
    sd = {k: v for k, v in load_file(path).items() if not k.endswith(".alpha")}
    save_file(sd, path)
    return WrittenLora(Path(path), sorted(sd), written.deltas, alpha=None, rank=4)


BAD_LORAS: dict[str, Callable[[Path], Path | WrittenLora]] = {
    "empty": write_empty,
    "not-safetensors": write_not_safetensors,
    "rank-mismatch": write_rank_mismatch,
    "nan": write_nan,
    "alpha-zero": write_alpha_zero,
    "musubi-no-alpha": write_musubi_without_alpha,
}
