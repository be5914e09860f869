"""What a LoRA file holds and which modules of the Z-Image 6B DiT it covers: `lora inspect` (JSON) and the
LoRA Inspect node (text) both report from here.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import cache

import torch
from torch import nn

from ..config import Z_IMAGE_6B
from ..dit import ZImageDiT
from ..inspection import target_group
from ..keymaps import BLOCK_PREFIXES
from .read import LoraFile

COVERAGE_GROUPS = ("attention", "feed_forward", "adaLN", "noise_refiner", "context_refiner", "embedders",
                   "final_layer")


def lora_report(lora: LoraFile) -> dict:
    """The JSON report of `lora inspect`."""
    return {
        "name": lora.name,
        "format": lora.format.value,
        "ranks": lora.ranks,
        "alphas": lora.alphas,
        "adapter_kinds": sorted({p.adapter.kind.value for p in lora.patches}),
        "dora": any("dora_scale" in p.adapter.tensors for p in lora.patches),
        "modules": len(lora.patches),
        "targets": sorted({p.module for p in lora.patches}),
        "coverage": coverage(lora),
        "unmatched": list(lora.unmatched),
        "warnings": list(lora.warnings),
        "metadata": lora.metadata,
    }


@cache
def _lora_able_units() -> dict[str, frozenset[tuple[str, int]]]:
    """Group → the (canonical Linear module, row block) units of the 6B DiT; the fused qkv counts as q, k, v."""
    with torch.device("meta"):
        model = ZImageDiT(Z_IMAGE_6B)
    groups: dict[str, set[tuple[str, int]]] = {name: set() for name in COVERAGE_GROUPS}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            group = _group(name)
            parts = 3 if name.endswith(".attention.qkv") else 1
            groups[group] |= {(name, part) for part in range(parts)}
    return {k: frozenset(v) for k, v in groups.items()}


def _group(module: str) -> str:
    group = target_group(module)
    return module.split(".")[0] if group == "refiners" else group


def coverage(lora: LoraFile) -> dict:
    """Which LoRA-able (Linear) modules of the Z-Image 6B DiT the file changes, per group, and the overall fraction.
    A LoRA on to_q covers a third of the fused qkv; one on the fused qkv covers all three. Changes to other tensors
    (norm diffs) are counted apart, and modules the 6B model does not have are listed."""
    units = _lora_able_units()
    every = frozenset().union(*units.values())
    covered: set[tuple[str, int]] = set()
    other, outside = set(), set()
    for p in lora.patches:
        t = p.target
        whole = 3 if t.parts == 1 and t.module.endswith(".attention.qkv") else 1
        parts = {(t.module, t.part)} if t.parts > 1 else {(t.module, i) for i in range(whole)}
        if parts <= every:
            covered |= parts
        else:  # norm diffs, or a module of a larger model
            (outside if _outside_6b(t.module) else other).add(t.module)
    groups = {g: {"covered": len(covered & u), "total": len(u)} for g, u in units.items()}
    return {"groups": groups, "covered": len(covered), "total": len(every),
            "fraction": round(len(covered) / len(every), 4), "other_modules": len(other),
            "outside_6b": sorted(outside)}


def _outside_6b(module: str) -> bool:
    m = re.match(r"^(layers|noise_refiner|context_refiner)\.(\d+)\.", module)
    limit = Z_IMAGE_6B.n_layers if m and m.group(1) == "layers" else Z_IMAGE_6B.n_refiner_layers
    return bool(m) and int(m.group(2)) >= limit


def report_lines(lora: LoraFile) -> list[str]:
    """The same report as text lines (the LoRA Inspect node): format, ranks, alphas, adapter kinds, targets by block,
    unmatched keys, warnings, metadata."""
    kinds: dict[str, int] = defaultdict(int)
    for p in lora.patches:
        kinds[p.adapter.kind.value + (" + DoRA" if "dora_scale" in p.adapter.tensors else "")] += 1
    alphas = ", ".join(f"{a:g}" for a in lora.alphas) or "none (scale 1)"
    lines = [f"{lora.name}: a Z-Image LoRA, {lora.format.value} format",
             f"modules: {len(lora.patches)} ({', '.join(f'{k} ×{n}' for k, n in sorted(kinds.items()))})",
             f"rank: {', '.join(map(str, lora.ranks)) or 'full'}; alpha: {alphas}", "targets:",
             *(f"  {line}" for line in _targets(lora)), f"unmatched keys: {len(lora.unmatched)}",
             *(f"  {k}" for k in lora.unmatched[:20])]
    if len(lora.unmatched) > 20:
        lines.append(f"  … and {len(lora.unmatched) - 20} more")
    lines += [f"warning: {w}" for w in lora.warnings]
    lines.append(f"metadata: {len(lora.metadata) or 'none'}")
    lines += [f"  {k}: {v if len(v) <= 200 else v[:200] + '…'}" for k, v in sorted(lora.metadata.items())]
    return lines


def _targets(lora: LoraFile) -> list[str]:
    """'layers 0–29: attention.to_q, …' per block kind (module names as the file spells them), then top-level ones."""
    blocks: dict[str, set[int]] = defaultdict(set)
    inner: dict[str, set[str]] = defaultdict(set)
    top = set()
    for p in lora.patches:
        kind, _, rest = p.module.partition(".")
        index, _, name = rest.partition(".")
        if kind in BLOCK_PREFIXES and index.isdigit():
            blocks[kind].add(int(index))
            inner[kind].add(name)
        else:
            top.add(p.module)
    lines = [f"{kind} {_span(sorted(blocks[kind]))}: {', '.join(sorted(inner[kind]))}" for kind in BLOCK_PREFIXES
             if kind in blocks]
    return lines + ([f"top level: {', '.join(sorted(top))}"] if top else [])


def _span(indices: list[int]) -> str:
    contiguous = indices == list(range(indices[0], indices[-1] + 1))
    return f"{indices[0]}–{indices[-1]}" if contiguous and len(indices) > 1 else ",".join(map(str, indices))
