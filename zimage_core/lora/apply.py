"""Applying LoRAs to a loaded ZImageDiT: several at once, each with its own strength, in two modes.

- `ApplyMode.RUNTIME`: base weights are not touched. Each targeted Linear gets a `delta(x, outs)` that adds
  Σ strength·(x·downᵀ)·(scale·up)ᵀ (two small matmuls per plain LoRA; a dense ΔW for LoHa/LoKr/DoRA); fp8 base
  weights work as they are, and strengths change without re-applying (`set_strength`). A `diff` on a norm or
  a `diff_b` on a bias is small: it swaps in a new tensor (the original object is kept for `remove`).
- `ApplyMode.MERGED`: W ← W + Σ strength·ΔW, computed in float32 and stored in the weight's dtype (fp8 weights are
  dequantised and re-quantised with their own scale). The original tensors are kept, so `remove` restores the
  base bit for bit in every dtype (for a weight read from a file mapping the original costs no memory).

Everything is checked before anything changes: a LoRA whose modules do not fit this DiT's shapes (another
model's LoRA, e.g. Lumina-2 dims) raises naming the key and both shapes, and nothing is applied.
Keys naming no DiT module, and modules this DiT does not have, are reported (never dropped silently).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from ..dit import Linear, ZImageDiT
from .adapters import AdapterKind
from .read import LoraFile, LoraPatch


class ApplyMode(str, Enum):
    RUNTIME = "runtime"
    MERGED = "merged"


@dataclass
class LoraReport:
    name: str
    strength: float
    matched: list[str] = field(default_factory=list)  # canonical parameters changed
    unmatched: list[str] = field(default_factory=list)  # keys or modules that changed nothing, with the reason
    warnings: list[str] = field(default_factory=list)  # the file's `LoraFile.warnings`

    def text(self) -> str:
        lines = [f"{self.name} (strength {self.strength:g}): {len(self.matched)} modules matched, "
                 f"{len(self.unmatched)} keys unmatched"]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  unmatched: {u}" for u in self.unmatched]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Placed:
    lora: int  # index in the applied list (its strength)
    param: str  # canonical parameter name, e.g. 'layers.0.attention.qkv.weight'
    rows: slice
    patch: LoraPatch


_Term = tuple[int, slice, torch.Tensor, "torch.Tensor | None"]  # (LoRA index, rows, down or dense ΔW, up·scale)
# one output block's share of a term: (LoRA index, block, columns in the block, columns of h, matrix ᵀ)
_Piece = tuple[int, int, slice, slice, torch.Tensor]


class _RuntimeDelta:
    """Linear.delta for the LoRAs on one module: adds strength · (x·downᵀ)·upᵀ (or x·ΔWᵀ) into the output rows
    of each term, in place (`Linear.forward`: one output; `forward_parts`: its column blocks, e.g. q, k, v).

    The plain LoRAs' downs are stacked into one (Σr, in) matrix, so x is read by one GEMM; each up then adds
    straight into its columns of the output with `addmm_` (the strength as its alpha), so no ΔW-sized temporary
    is made (bench/lora.py)."""

    def __init__(self, out_features: int, strengths: list[float]) -> None:
        self.out_features, self.strengths = out_features, strengths
        self.terms: list[_Term] = []
        self._plans: dict[int, tuple[torch.Tensor, list[_Piece], list[_Piece]]] = {}

    def __call__(self, x: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
        if self.terms and self.terms[0][2].device != x.device:  # the model was moved (offloaded and back)
            self.terms = [(i, r, a.to(x.device), None if b is None else b.to(x.device)) for i, r, a, b in self.terms]
            self._plans.clear()
        if len(outs) not in self._plans:
            self._plans[len(outs)] = self._planned(len(outs))
        downs, low, dense = self._plans[len(outs)]
        x2 = x.reshape(-1, x.shape[-1])
        blocks = [y.view(-1, y.shape[-1]) for y in outs]  # Linear outputs are contiguous: views, written in place
        h = x2 @ downs.T if low else None  # (tokens, Σr)
        for lora, block, cols, h_cols, up_t in low:
            if s := self.strengths[lora]:
                blocks[block][:, cols].addmm_(h[:, h_cols], up_t, alpha=s)
        for lora, block, cols, _, delta_t in dense:
            if s := self.strengths[lora]:
                blocks[block][:, cols].addmm_(x2, delta_t, alpha=s)

    def _planned(self, parts: int) -> tuple[torch.Tensor, list[_Piece], list[_Piece]]:
        """(stacked downs, low-rank pieces, dense pieces): each term cut at the output's block boundaries."""
        width = self.out_features // parts
        low_terms = [t for t in self.terms if t[3] is not None]
        downs = torch.cat([t[2] for t in low_terms]) if low_terms else self.terms[0][2][:0]
        low, dense, h_start = [], [], 0
        for lora, rows, a, b in self.terms:
            r = a.shape[0] if b is not None else 0
            start, stop = rows.start or 0, rows.stop if rows.stop is not None else self.out_features
            for block in range(start // width, (stop - 1) // width + 1):
                lo, hi = max(start, block * width), min(stop, (block + 1) * width)
                cols = slice(lo - block * width, hi - block * width)
                if b is not None:
                    low.append((lora, block, cols, slice(h_start, h_start + r), b[lo - start:hi - start].T))
                else:
                    dense.append((lora, block, cols, slice(0, 0), a[lo - start:hi - start].T))
            h_start += r
        return downs, low, dense


class AppliedLoras:
    """LoRAs applied to a DiT. `remove()` restores the base exactly; `reports` say what matched."""

    def __init__(self, dit: ZImageDiT, mode: ApplyMode, reports: list[LoraReport], strengths: list[float]) -> None:
        self.dit, self.mode, self.reports, self.strengths = dit, mode, reports, strengths
        self._originals: dict[str, object] = {}  # attribute path → what it held before

    def set_strength(self, index: int, strength: float) -> None:
        if self.mode is not ApplyMode.RUNTIME:
            raise ValueError("strengths of merged LoRAs are baked in; remove() and apply again")
        self.strengths[index] = self.reports[index].strength = float(strength)

    def remove(self) -> None:
        for path, value in self._originals.items():
            _set_attr(self.dit, path, value)
        self._originals.clear()

    def _set(self, path: str, value: object) -> None:
        self._originals.setdefault(path, _get_attr(self.dit, path))
        _set_attr(self.dit, path, value)

    def text(self) -> str:
        return "\n".join(r.text() for r in self.reports)


def apply_loras(dit: ZImageDiT, loras: Sequence[tuple[LoraFile, float]],
                mode: ApplyMode = ApplyMode.RUNTIME) -> AppliedLoras:
    """Apply `(lora, strength)` pairs to `dit` (see the module docstring). Checks everything first."""
    if mode is ApplyMode.RUNTIME:
        patches, reports, strengths = runtime_patches(dit, loras)
        applied = AppliedLoras(dit, mode, reports, strengths)
        for path, value in patches.items():
            applied._set(path, value)
        return applied
    by_param, reports = plan_patches(dit, loras)
    applied = AppliedLoras(dit, mode, reports, [float(s) for _, s in loras])
    try:
        with torch.no_grad():
            for name, group in by_param.items():
                applied._set(name, _merged(name, group, applied.strengths, dit))
    except BaseException:  # e.g. out of memory half way: all or nothing
        applied.remove()
        raise
    return applied


def runtime_patches(dit: ZImageDiT, loras: Sequence[tuple[LoraFile, float]]
                    ) -> tuple[dict[str, object], list[LoraReport], list[float]]:
    """The runtime mode as attribute patches, without changing `dit`: '<linear>.delta' → the delta callable,
    '<norm or bias parameter>' → its replacement Parameter. (ComfyUI's ModelPatcher applies them as object
    patches; `apply_loras` sets them directly.) The strengths list is shared by the deltas (`set_strength`)."""
    by_param, reports = plan_patches(dit, loras)
    strengths = [float(s) for _, s in loras]
    patches: dict[str, object] = {}
    with torch.no_grad():
        for name, group in by_param.items():
            module_name = name.rpartition(".")[0]
            module = dit.get_submodule(module_name)
            if isinstance(module, Linear) and name.endswith(".weight"):
                patches[f"{module_name}.delta"] = _runtime_delta(dit, module, group, strengths)
            else:
                patches[name] = nn.Parameter(_merged(name, group, strengths, dit), requires_grad=False)
    return patches, reports, strengths


def plan_patches(dit: ZImageDiT, loras: Sequence[tuple[LoraFile, float]]
          ) -> tuple[dict[str, list[_Placed]], list[LoraReport]]:
    """Every patch placed on a parameter (shapes checked), by parameter; raises before anything is changed."""
    params = dict(dit.named_parameters())
    reports = [LoraReport(lora.name, float(s), unmatched=[f"{k} (names no Z-Image DiT module)" for k in lora.unmatched],
                          warnings=list(lora.warnings)) for lora, s in loras]
    by_param: dict[str, list[_Placed]] = defaultdict(list)
    for i, (lora, _) in enumerate(loras):
        for patch in lora.patches:
            p = _place(i, patch, params, lora.name)
            if p is None:
                reports[i].unmatched.append(f"{patch.adapter.name} (this DiT has no {patch.target.module})")
            else:
                by_param[p.param].append(p)
                reports[i].matched.append(p.param)
        if not reports[i].matched:
            raise ValueError(f"{lora.name}: none of its {len(lora.patches)} modules exists in this DiT")
    return by_param, reports


def _place(index: int, patch: LoraPatch, params: dict[str, nn.Parameter], lora_name: str) -> _Placed | None:
    leaf = "bias" if patch.adapter.kind is AdapterKind.DIFF_BIAS else "weight"
    name = f"{patch.target.module}.{leaf}"
    if name not in params:
        return None
    shape = tuple(params[name].shape)
    rows = shape[0] // patch.target.parts
    expected = (rows, *shape[1:]) if len(shape) > 1 else (rows,)
    got = tuple(patch.adapter.delta_shape())
    if got != expected:
        raise ValueError(f"{lora_name}: {patch.adapter.name} changes a {list(got)} weight, but this DiT's "
                         f"{patch.module} is {list(expected)}: a LoRA made for another model (e.g. Lumina-2) or "
                         "another size")
    start = patch.target.part * rows
    return _Placed(index, name, slice(start, start + rows), patch)


def _dense(p: _Placed, base: torch.Tensor) -> torch.Tensor:
    """ΔW of one placed patch at strength 1 on its rows (DoRA resolved against the base rows), float32."""
    delta = p.patch.adapter.delta(torch.float32, base.device).reshape(base[p.rows].shape)
    if "dora_scale" in p.patch.adapter.tensors:
        rows = base[p.rows].float()
        return p.patch.adapter.apply_dora(rows, delta) - rows
    return delta


def _runtime_delta(dit: ZImageDiT, module: Linear, group: list[_Placed], strengths: list[float]) -> _RuntimeDelta:
    dtype, device = dit.dtype, module.weight.device
    delta = _RuntimeDelta(module.out_features, strengths)
    base = module._weight_as(torch.float32) if any("dora_scale" in p.patch.adapter.tensors for p in group) else None
    for p in group:
        low = p.patch.adapter.low_rank(dtype, device)
        if low is not None:
            delta.terms.append((p.lora, p.rows, low[0], low[1]))
        else:
            delta.terms.append((p.lora, p.rows, _dense(p, base if base is not None else module.weight).to(dtype), None))
    return delta


def merged_float32(dit: ZImageDiT, name: str, group: Sequence[_Placed], strengths: Sequence[float]) -> torch.Tensor:
    """The MERGED rule for one parameter: W + Σ strength·ΔW in float32, from the base parameter (fp8: dequantised
    with its scale). With no patches it may return the parameter itself, which must then only be read."""
    param, scale = dit.get_parameter(name), _fp8_scale(dit, name)
    base = param.float() if scale is None else param.float() * scale.float()
    if not group:
        return base
    new = base.clone()
    for p in group:
        new[p.rows] += strengths[p.lora] * _dense(p, base)
    return new


def _merged(name: str, group: list[_Placed], strengths: list[float], dit: ZImageDiT) -> torch.Tensor:
    """The parameter with the group's ΔW added at their strengths, in its own dtype (fp8: with its own scale)."""
    new, scale = merged_float32(dit, name, group, strengths), _fp8_scale(dit, name)
    return (new if scale is None else new / scale.float()).to(dit.get_parameter(name).dtype)


def _fp8_scale(dit: ZImageDiT, name: str) -> torch.Tensor | None:
    """The `scale_weight` of an fp8 Linear weight parameter `name`, else None."""
    if not name.endswith(".weight"):
        return None
    return getattr(dit.get_submodule(name.rpartition(".")[0]), "scale_weight", None)


def _get_attr(root: nn.Module, path: str) -> object:
    module_name, _, leaf = path.rpartition(".")
    return getattr(root.get_submodule(module_name), leaf)


def _set_attr(root: nn.Module, path: str, value: object) -> None:
    module_name, _, leaf = path.rpartition(".")
    module = root.get_submodule(module_name)
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        value = nn.Parameter(value, requires_grad=False)
    setattr(module, leaf, value)
