"""`python -m zimage_core lora inspect|convert|merge`: the LoRA hub (`zimage_core.lora`) on the command line.

- `lora inspect F`: JSON: format, ranks, alphas, adapter kinds, the modules it adapts, its coverage of the
  Z-Image 6B model's Linear layers by group, unmatched keys, warnings, metadata (`read_lora`, the one parser).
- `lora convert IN OUT --to comfy|diffusers|musubi [--lokr-rank N]`: `convert_lora` + `save_lora`; one summary line,
  then one line per lossy (SVD) step with its error.
- `lora merge --dit P --lora F[:S] … --out P [--layout comfy|diffusers] [--dtype …]`: `save_merged_dit`. The DiT is
  loaded in the dtype it is stored in (bf16 files stay file-mapped, fp8 files stay fp8), ΔW is computed in float32
  per parameter, so nothing is rounded twice and memory stays near the file's size.
Outputs are never overwritten. Bad input exits 2 with one line (cli.py's convention).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import torch

from .config import WeightFormat
from .keymaps import DiTLayout
from .lora import MergedDtype, TargetFormat, convert_lora, read_lora, save_lora, save_merged_dit
from .lora.merge import DEFAULT_SHARD_BYTES, check_merge_output
from .lora.report import lora_report


def add_lora(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("lora", help="inspect, convert or merge Z-Image LoRAs",
                            description="LoRA tools: inspect (JSON report), convert (to another trainer's format), "
                            "merge (bake LoRAs into a DiT checkpoint).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    a = actions.add_parser("inspect", help="what a LoRA file holds and which DiT modules it covers (JSON)")
    a.add_argument("path", help="LoRA .safetensors file")
    a.set_defaults(run=run_inspect)

    a = actions.add_parser("convert", help="convert a LoRA to the format ComfyUI, diffusers or musubi-tuner loads")
    a.add_argument("src", help="LoRA .safetensors file, any trainer's format")
    a.add_argument("out", help="output .safetensors file (must not exist)")
    a.add_argument("--to", type=TargetFormat, choices=list(TargetFormat), required=True, help="target format")
    a.add_argument("--lokr-rank", type=int, help="rank for LoHa/LoKr → LoRA by SVD (default: 99.99%% of the energy)")
    a.set_defaults(run=run_convert)

    a = actions.add_parser("merge", help="save a DiT with LoRAs merged into its weights",
                           description="Merge LoRAs into a DiT and save it (ComfyUI single file or diffusers folder).")
    a.add_argument("--dit", required=True, help="DiT: a ComfyUI file, an fp8 file, or the official transformer/ folder")
    a.add_argument("--lora", action="append", required=True, metavar="FILE[:STRENGTH]",
                   help="a LoRA and its strength (default 1.0; split at the last ':'); repeat for several")
    a.add_argument("--out", required=True, help="output: a .safetensors file (comfy) or a folder (diffusers)")
    a.add_argument("--layout", type=DiTLayout, choices=list(DiTLayout), default=DiTLayout.COMFY)
    a.add_argument("--dtype", type=MergedDtype, choices=list(MergedDtype), default=MergedDtype.BF16,
                   help="stored dtype; fp8_e4m3fn is ComfyUI's scaled fp8 (comfy layout only)")
    a.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1e9,
                   help="diffusers layout: largest shard in GB (default %(default)g)")
    a.set_defaults(run=run_merge)


# ---------------------------------------------------------------------------------------------------- inspect


def run_inspect(args: argparse.Namespace) -> int:
    print(json.dumps(lora_report(read_lora(args.path)), indent=2))
    return 0



# ---------------------------------------------------------------------------------------------------- convert


def run_convert(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; convert never overwrites (remove it or pick another name)")
    lora = read_lora(args.src)
    converted = convert_lora(lora, args.to, lokr_rank=args.lokr_rank)
    save_lora(converted, out)
    meta = converted.metadata
    print(f"{out}: {lora.format.value} → {args.to.value}, {len(lora.patches)} modules, {len(converted.state_dict)} "
          f"keys, rank {meta['zimage_rank']}, alpha {meta['zimage_alpha']}")
    for note in converted.notes:
        print(f"  {note}")
    return 0


# ------------------------------------------------------------------------------------------------------ merge


def parse_lora_arg(value: str) -> tuple[Path, float]:
    """'FILE[:STRENGTH]' → (file, strength), split at the last ':' so that paths may hold colons; no strength → 1."""
    head, sep, tail = value.rpartition(":")
    if sep and Path(value).exists():
        return Path(value), 1.0
    if sep and head:
        try:
            strength = float(tail) if tail else 1.0
        except ValueError:
            strength = None
        if strength is not None and not math.isfinite(strength):
            raise ValueError(f"--lora {value}: strength {tail} is not a finite number")
        if strength is not None:
            return Path(head), strength
        if Path(head).exists():
            raise ValueError(f"--lora {value}: strength {tail!r} is not a number (expected FILE:STRENGTH, "
                             "e.g. style.safetensors:0.8)")
    return Path(value), 1.0


def run_merge(args: argparse.Namespace) -> int:
    from .checkpoint import load_dit

    shard_bytes = int(args.max_shard_gb * 1e9)
    layout, dtype, out = check_merge_output(args.out, args.layout, args.dtype, shard_bytes)  # before loading 12 GB
    loras = [(read_lora(path), strength) for path, strength in map(parse_lora_arg, args.lora)]
    compute, weights = stored_dtype(args.dit)
    dit = load_dit(args.dit, "cpu", compute, weights)
    path = save_merged_dit(dit, loras, out, layout, dtype, max_shard_bytes=shard_bytes)
    merged = ", ".join(f"{lora.name} at {s:g}" for lora, s in loras)
    print(f"{path}: {Path(args.dit).name} + {merged} ({layout.value} layout, {dtype.value})")
    return 0


def stored_dtype(dit_path: str | Path) -> tuple[torch.dtype, WeightFormat]:
    """How to load a DiT for merging without rounding: the dtype its block weights are stored in (fp8: kept fp8)."""
    from .checkpoint import _FP8_TARGETS, plan_dit

    plan = plan_dit(dit_path)
    stored = [ps[0].info.dtype for key, ps in plan.pieces.items() if _FP8_TARGETS.match(key)]
    dtype = Counter(stored).most_common(1)[0][0] if stored else torch.bfloat16
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.bfloat16, WeightFormat.FP8
    return dtype, WeightFormat.COMPUTE
