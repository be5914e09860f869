"""Converting a read LoRA (`LoraFile`, any trainer's format) into the layout another tool loads (ZIMAGE_SPEC §6.2/§6.3).

Targets and their rules:
- `comfy` (ComfyUI 0.3.75's native loader, zero unmatched keys): `diffusion_model.<canonical module>.lora_up.weight`
  / `.lora_down.weight` / `.alpha`. Plain LoRAs on q/k/v fuse exactly into `attention.qkv`: when every present part
  has the same down and scale, `up = cat(up_q, up_k, up_v)` (rank kept); otherwise `down = cat(d_q, d_k, d_v)`
  [Σr, in] and `up` block-diagonal [3·dim, Σr], alpha = scale·Σr (×3 for three parts of one rank: scale unchanged);
  parts with different scales get their scale folded into their up block (alpha = Σr then). Missing parts are
  zero rows. LoHa / LoKr / DoRA / diff / diff_b stay as ComfyUI reads them: LyCORIS leaves on the canonical name for
  a whole module, on `diffusion_model.<diffusers name>` (which ComfyUI maps to a row slice of qkv) for a part.
- `diffusers` (diffusers 0.42.1 `load_lora_adapter(prefix="transformer")`, PEFT): `transformer.<diffusers
  name>.lora_A.weight` / `.lora_B.weight`, no alpha: alpha/r is folded into lora_B. A fused qkv LoRA splits
  exactly: every part keeps the whole down, its up is the part's row block (up columns that are zero in a block
  are dropped with their down rows, so a previously fused block-diagonal LoRA gets its own rank back). LoHa /
  LoKr become LoRAs by SVD of ΔW (rank `lokr_rank`, else the smallest rank keeping 99.99% of the energy); the
  relative Frobenius error of each is in `notes` and `svd_errors`.
- `musubi` (musubi-tuner / kohya): `lora_unet_<diffusers name with . → _>.lora_down.weight` / `.lora_up.weight` /
  `.alpha` (float32 scalar; alpha = rank where the source had none). Fused qkv splits as for diffusers, alpha
  scaled with the kept rank (alpha·r_part/R: scale unchanged). LoHa / LoKr keep their LyCORIS leaves when they
  cover one kohya module; one on a whole fused qkv becomes a LoRA by SVD.
- Full deltas (diff, diff_b) and DoRA magnitudes exist only in ComfyUI's format: converting them elsewhere raises.

Rank and alpha are kept where the format stores them (comfy, musubi). The source file's metadata is kept (less
`lora_adapter_metadata`, a PEFT config that would no longer match) and extended with `zimage_*` keys (and
`ss_network_dim` / `ss_network_alpha` for musubi). Every output reads back with `read_lora` to the same ΔW.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from ..keymaps import DiTLayout, Target, from_canonical
from ..safetensors_file import save_atomic
from .adapters import Adapter, AdapterKind
from .read import LoraFile, LoraPatch


class TargetFormat(str, Enum):
    COMFY = "comfy"
    DIFFUSERS = "diffusers"
    MUSUBI = "musubi"


@dataclass
class ConvertedLora:
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)  # lossy steps, e.g. LoKr→LoRA SVD relative error per module
    svd_errors: dict[str, float] = field(default_factory=dict)  # module → relative Frobenius error of its SVD


ENERGY = 0.9999  # share of ΔW's squared singular values an SVD conversion keeps when no rank is given

_LEAVES = {  # adapter kind → role → key leaf (as written after `<module>.`)
    AdapterKind.LORA: {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight"},
    AdapterKind.LOHA: {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b",
                       "t1": "hada_t1", "t2": "hada_t2"},
    AdapterKind.LOKR: {"w1": "lokr_w1", "w1_a": "lokr_w1_a", "w1_b": "lokr_w1_b", "w2": "lokr_w2",
                       "w2_a": "lokr_w2_a", "w2_b": "lokr_w2_b", "t2": "lokr_t2"},
    AdapterKind.DIFF: {"diff": "diff"},
    AdapterKind.DIFF_BIAS: {"diff_b": "diff_b"},
}
_COMMON_LEAVES = {"alpha": "alpha", "dora_scale": "dora_scale"}


@dataclass(frozen=True)
class _Low:
    """A plain LoRA on the rows `rows` of a canonical weight: ΔW[rows] = scale · up @ down."""

    name: str  # the source adapter's name, for messages
    rows: slice
    up: torch.Tensor  # [rows, r]
    down: torch.Tensor  # [r, in]
    alpha: float | None  # None: scale 1

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None else 1.0


# ------------------------------------------------------------------------------------------------- public API


def convert_lora(lora: LoraFile, to: TargetFormat | str, *, lokr_rank: int | None = None) -> ConvertedLora:
    """`lora` in the layout of `to` (see the module docstring). Raises naming the module for what `to` cannot hold."""
    try:
        to = TargetFormat(to)
    except ValueError:
        raise ValueError(f"{lora.name}: unknown LoRA target format {to!r}; one of "
                         f"{[t.value for t in TargetFormat]}") from None
    if lokr_rank is not None and lokr_rank < 1:
        raise ValueError(f"lokr_rank must be a positive rank, got {lokr_rank}")
    out = ConvertedLora({}, {})
    writer = {TargetFormat.COMFY: _comfy_module, TargetFormat.DIFFUSERS: _split_module,
              TargetFormat.MUSUBI: _split_module}[to]
    for module, patches in _by_module(lora.patches).items():
        for key, tensor in writer(module, patches, to, lokr_rank, out).items():
            if key in out.state_dict:
                raise ValueError(f"{lora.name}: two adapters on {module} would both write {key}")
            out.state_dict[key] = tensor
    out.state_dict = {k: v.detach().contiguous().clone() for k, v in out.state_dict.items()}  # no shared storage
    out.metadata = _metadata(lora, to, out.state_dict)
    return out


def save_lora(converted: ConvertedLora, path: str | os.PathLike) -> None:
    """Write `converted` as safetensors at `path`, atomically (a temporary file in the same folder, then
    os.replace): a failed save leaves no partial file and the old file, if any, untouched."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRAs are saved as .safetensors only")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the folder {path.parent} does not exist")
    save_atomic(path, converted.state_dict, converted.metadata)


# ------------------------------------------------------------------------------------------------- per module


def _by_module(patches: tuple[LoraPatch, ...]) -> dict[str, list[LoraPatch]]:
    groups: dict[str, list[LoraPatch]] = defaultdict(list)
    for p in patches:
        groups[p.target.module].append(p)
    return groups


def _rows(target: Target, adapter: Adapter) -> tuple[slice, int]:
    """The canonical rows an adapter changes, and the canonical weight's row count."""
    n = adapter.out_features
    return slice(target.part * n, (target.part + 1) * n), n * target.parts


def _is_plain_lora(adapter: Adapter) -> bool:
    return adapter.kind is AdapterKind.LORA and "dora_scale" not in adapter.tensors


def _low(patch: LoraPatch) -> _Low:
    t = patch.adapter.tensors
    down = t["down"].flatten(1)
    if "mid" in t:
        down = (t["mid"].flatten(1).float() @ down.float()).to(down.dtype)
    return _Low(patch.adapter.name, _rows(patch.target, patch.adapter)[0], t["up"].flatten(1), down,
                patch.adapter.alpha)


def _alpha_tensor(alpha: float) -> torch.Tensor:
    return torch.tensor(float(alpha), dtype=torch.float32)


def _leaves(prefix: str, adapter: Adapter) -> dict[str, torch.Tensor]:
    """An adapter's tensors under `prefix` with the leaf names ComfyUI / LyCORIS / kohya use."""
    names = _LEAVES[adapter.kind] | _COMMON_LEAVES
    out = {f"{prefix}.{names[role]}": t for role, t in adapter.tensors.items()}
    if "alpha" in adapter.tensors:
        out[f"{prefix}.alpha"] = _alpha_tensor(adapter.alpha)
    return out


# ---------------------------------------------------------------------------------------------------- comfy


def _comfy_module(module: str, patches: list[LoraPatch], to: TargetFormat, lokr_rank: int | None,
                  out: ConvertedLora) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    lows = [_low(p) for p in patches if _is_plain_lora(p.adapter)]
    if lows:
        rows = _rows(patches[0].target, patches[0].adapter)[1]
        sd |= _comfy_lora(f"diffusion_model.{module}", _fuse(lows, rows))
    for p in patches:
        if not _is_plain_lora(p.adapter):
            sd |= _leaves(f"diffusion_model.{_comfy_name(p)}", p.adapter)
    return sd


def _comfy_name(patch: LoraPatch) -> str:
    """The name ComfyUI maps to this patch's rows: canonical for a whole module, diffusers for a q/k/v part."""
    if patch.target.parts == 1:
        return patch.target.module
    for name, target in from_canonical(patch.target.module, DiTLayout.DIFFUSERS):
        if target == patch.target:
            return name
    raise ValueError(f"{patch.adapter.name}: no module name for part {patch.target.part} of {patch.target.module}")


def _comfy_lora(prefix: str, low: _Low) -> dict[str, torch.Tensor]:
    sd = {f"{prefix}.lora_up.weight": low.up, f"{prefix}.lora_down.weight": low.down}
    if low.alpha is not None:
        sd[f"{prefix}.alpha"] = _alpha_tensor(low.alpha)
    return sd


def _fuse(lows: list[_Low], rows: int) -> _Low:
    """One LoRA on all `rows` with the same ΔW as the row-block LoRAs `lows` (see the module docstring)."""
    if len(lows) == 1 and lows[0].rows == slice(0, rows):
        return lows[0]
    _check_disjoint(lows)
    first = lows[0]
    same_scale = all(lo.scale == first.scale and (lo.alpha is None) == (first.alpha is None) for lo in lows)
    if same_scale and all(lo.down.shape == first.down.shape and torch.equal(lo.down, first.down) for lo in lows):
        up = first.up.new_zeros(rows, first.rank)
        for lo in lows:
            up[lo.rows] = lo.up
        return _Low(first.name, slice(0, rows), up, first.down, first.alpha)
    total = sum(lo.rank for lo in lows)
    dtype = first.up.dtype
    up = torch.zeros(rows, total, dtype=dtype)
    col = 0
    for lo in lows:
        up[lo.rows, col:col + lo.rank] = lo.up if same_scale else (lo.up.float() * lo.scale).to(dtype)
        col += lo.rank
    down = torch.cat([lo.down.to(first.down.dtype) for lo in lows])
    if not same_scale:
        alpha = float(total)
    else:
        alpha = None if first.alpha is None else first.alpha * total / first.rank
    return _Low(first.name, slice(0, rows), up, down, alpha)


def _check_disjoint(lows: list[_Low]) -> None:
    taken: list[slice] = []
    for lo in lows:
        if any(lo.rows.start < s.stop and s.start < lo.rows.stop for s in taken):
            raise ValueError(f"{lo.name}: overlaps another LoRA on the same rows of one module; cannot fuse")
        taken.append(lo.rows)


# ------------------------------------------------------------------------------------------ diffusers, musubi


def _split_module(module: str, patches: list[LoraPatch], to: TargetFormat, lokr_rank: int | None,
                  out: ConvertedLora) -> dict[str, torch.Tensor]:
    names = from_canonical(module, DiTLayout.DIFFUSERS)
    sd: dict[str, torch.Tensor] = {}
    for p in patches:
        _refuse_comfy_only(p, to)
        row_slice, rows = _rows(p.target, p.adapter)
        if _is_plain_lora(p.adapter):
            low = _low(p)
        elif to is TargetFormat.MUSUBI and (name := _single_name(names, row_slice, rows)) is not None:
            sd |= _leaves(_musubi_prefix(name), p.adapter)
            continue
        else:
            low = _svd(p, row_slice, lokr_rank, out)
        for name, part_rows in _parts(names, rows):
            piece = _slice(low, part_rows)
            if piece is not None:
                sd |= _write_split(name, piece, to)
    return sd


def _refuse_comfy_only(patch: LoraPatch, to: TargetFormat) -> None:
    a = patch.adapter
    if a.kind in (AdapterKind.DIFF, AdapterKind.DIFF_BIAS):
        raise ValueError(f"{a.name}: a full {a.kind.value} delta has no {to.value} form (only ComfyUI's format "
                         "stores whole-weight and bias deltas); convert to comfy")
    if "dora_scale" in a.tensors:
        raise ValueError(f"{a.name}: DoRA magnitudes have no {to.value} form here (diffusers 0.42.1 drops "
                         "dora_scale, kohya LoRAs have none); convert to comfy")


def _parts(names: list[tuple[str, Target]], rows: int) -> list[tuple[str, slice]]:
    return [(name, slice(t.part * rows // t.parts, (t.part + 1) * rows // t.parts)) for name, t in names]


def _single_name(names: list[tuple[str, Target]], row_slice: slice, rows: int) -> str | None:
    return next((name for name, part in _parts(names, rows) if part == row_slice), None)


def _slice(low: _Low, part: slice) -> _Low | None:
    """The LoRA restricted to canonical rows `part` (None if it changes none of them); zero up columns dropped."""
    if low.rows == part:
        return low
    if part.stop <= low.rows.start or low.rows.stop <= part.start:
        return None
    if part.start < low.rows.start or low.rows.stop < part.stop:
        raise ValueError(f"{low.name}: covers rows {low.rows.start}:{low.rows.stop}, which straddle a module "
                         f"boundary at {part.start}:{part.stop}")
    up = low.up[part.start - low.rows.start:part.stop - low.rows.start]
    keep = up.ne(0).any(dim=0)
    if not keep.any():
        return None
    if keep.all():
        return _Low(low.name, part, up, low.down, low.alpha)
    rank = int(keep.sum())
    alpha = None if low.alpha is None else low.alpha * rank / low.rank
    return _Low(low.name, part, up[:, keep], low.down[keep], alpha)


def _write_split(name: str, low: _Low, to: TargetFormat) -> dict[str, torch.Tensor]:
    if to is TargetFormat.DIFFUSERS:
        up = low.up if low.scale == 1 else (low.up.float() * low.scale).to(low.up.dtype)
        return {f"transformer.{name}.lora_A.weight": low.down, f"transformer.{name}.lora_B.weight": up}
    prefix = _musubi_prefix(name)
    alpha = low.alpha if low.alpha is not None else float(low.rank)
    return {f"{prefix}.lora_down.weight": low.down, f"{prefix}.lora_up.weight": low.up,
            f"{prefix}.alpha": _alpha_tensor(alpha)}


def _musubi_prefix(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def _svd(patch: LoraPatch, rows: slice, lokr_rank: int | None, out: ConvertedLora) -> _Low:
    """A LoRA (scale 1) for a LoHa/LoKr adapter's ΔW by truncated SVD; the relative error goes to `out`."""
    a = patch.adapter
    delta = a.delta(torch.float64)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    energy = s.square()
    total = float(energy.sum())
    if lokr_rank is not None:
        k = min(lokr_rank, s.numel())
    else:
        k = int((energy.cumsum(0) < ENERGY * total).sum()) + 1 if total > 0 else 1
        k = min(k, s.numel())
    err = (float(energy[k:].sum()) / total) ** 0.5 if total > 0 else 0.0
    root = s[:k].sqrt()
    dtype = next(iter(a.tensors.values())).dtype
    up, down = (u[:, :k] * root).to(dtype), (root[:, None] * vh[:k]).to(dtype)
    out.svd_errors[a.name] = err
    out.notes.append(f"{a.name}: {a.kind.value} → LoRA rank {k} of {min(delta.shape)} by SVD, relative "
                     f"Frobenius error {err:.2e}")
    return _Low(a.name, rows, up, down, None)


# --------------------------------------------------------------------------------------------------- metadata


_RANK_LEAVES = ("lora_down.weight", "lora_A.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b")  # rows = the rank


def _metadata(lora: LoraFile, to: TargetFormat, sd: dict[str, torch.Tensor]) -> dict[str, str]:
    meta = {k: v for k, v in lora.metadata.items() if k != "lora_adapter_metadata"}
    ranks = sorted({v.shape[0] for k, v in sd.items() if k.endswith(_RANK_LEAVES)})
    alphas = sorted({float(v) for k, v in sd.items() if k.endswith(".alpha")})
    meta |= {"zimage_source_format": lora.format.value, "zimage_converted_to": to.value,
             "zimage_rank": ",".join(map(str, ranks)) or "full (LoKr factors)",
             "zimage_alpha": ",".join(f"{a:g}" for a in alphas) if alphas else "none (scale 1, alpha/r folded)"}
    if to is TargetFormat.MUSUBI and ranks:
        meta["ss_network_dim"] = str(max(ranks))
        meta["ss_network_alpha"] = f"{max(alphas):g}" if alphas else str(max(ranks))
    return meta
