"""A synthetic full-size (6B) Z-Image DiT checkpoint for bench/load.py, written by a streaming writer.

Both real layouts, with identical values: the official sharded diffusers release
(`transformer/diffusion_pytorch_model-0000{1,2,3}-of-00003.safetensors` + index + the Turbo config.json)
and the ComfyUI single file (fused qkv, plus the unused `norm_final.weight`). The key lists come from
diffusers' own class on the meta device; they equal shared/docs/keys/keys_dit_zimage_{diffusers,comfy}.txt.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import zlib
from pathlib import Path

import torch

PARAMS_6B = 6_154_908_736
WEIGHT_BYTES = PARAMS_6B * 2  # bf16
COMFY_FILE = "z_image_turbo_bf16.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
MARKER = "bench_ckpt.json"  # written last: a folder without it is regenerated
FORMAT_VERSION = 1
N_SHARDS = 3
STD = 0.02
# The Turbo transformer/config.json (ZIMAGE_SPEC §2a).
TURBO_CONFIG = {
    "_class_name": "ZImageTransformer2DModel", "_diffusers_version": "0.42.1",
    "all_f_patch_size": [1], "all_patch_size": [2], "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
    "cap_feat_dim": 2560, "dim": 3840, "in_channels": 16, "n_heads": 30, "n_kv_heads": 30, "n_layers": 30,
    "n_refiner_layers": 2, "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0,
}
# Canonical (ComfyUI) names whose checksums every loader reports.
CHECK_KEYS = ("layers.0.attention.qkv.weight", "layers.29.feed_forward.w2.weight",
              "noise_refiner.1.attention.out.weight", "context_refiner.0.feed_forward.w1.weight",
              "x_embedder.weight", "cap_embedder.1.weight", "final_layer.linear.weight", "x_pad_token")


# ---------------------------------------------------------------------------------------------- key layout

_RENAMES = ((r"^all_x_embedder\.2-1\.", "x_embedder."), (r"^all_final_layer\.2-1\.", "final_layer."),
            (r"\.attention\.to_out\.0\.", ".attention.out."), (r"\.attention\.norm_q\.", ".attention.q_norm."),
            (r"\.attention\.norm_k\.", ".attention.k_norm."))
_QKV = re.compile(r"\.attention\.to_([qkv])\.")


def to_canonical(diffusers_key: str) -> tuple[str, int]:
    """diffusers key -> (ComfyUI key, row block): to_q/to_k/to_v are blocks 0/1/2 of the fused qkv."""
    if m := _QKV.search(diffusers_key):
        return _QKV.sub(".attention.qkv.", diffusers_key), "qkv".index(m[1])
    for pattern, repl in _RENAMES:
        diffusers_key = re.sub(pattern, repl, diffusers_key)
    return diffusers_key, 0


def diffusers_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official checkpoint, from diffusers' own class on the meta device."""
    from diffusers import ZImageTransformer2DModel

    kwargs = {k: v for k, v in TURBO_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = ZImageTransformer2DModel(**kwargs)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    n = sum(torch.Size(s).numel() for s in shapes.values())
    if n != PARAMS_6B:
        raise RuntimeError(f"diffusers builds {n:,} parameters, expected {PARAMS_6B:,}")
    return shapes


def canonical_layout(dshapes: dict[str, tuple[int, ...]]) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """ComfyUI key -> its diffusers pieces [(key, shape)] in row-block order, sorted by ComfyUI key."""
    groups: dict[str, list[tuple[int, str, tuple[int, ...]]]] = {}
    for key, shape in dshapes.items():
        canon, part = to_canonical(key)
        groups.setdefault(canon, []).append((part, key, shape))
    return {k: [(key, shape) for _, key, shape in sorted(groups[k])] for k in sorted(groups)}


# ---------------------------------------------------------------------------------------------- writing


class StreamingSafetensorsWriter:
    """Writes a safetensors file whose header (all names and shapes) is known up front; tensors are then
    appended one by one, in header order, so only one tensor is ever in memory."""

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...]]]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in specs:
            nbytes = torch.Size(shape).numel() * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.pending = list(specs)
        self.f = open(path, "wb")
        self.f.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        want, shape = self.pending.pop(0)
        if (name, tuple(t.shape), t.dtype) != (want, shape, torch.bfloat16):
            raise ValueError(f"writer expected {want} {shape} bf16, got {name} {tuple(t.shape)} {t.dtype}")
        self.f.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        self.f.close()
        if self.pending:
            raise ValueError(f"{self.f.name}: {len(self.pending)} tensors never written, e.g. {self.pending[0][0]}")


def synthetic(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Deterministic small normal noise in bf16, seeded by the canonical key (same values in both layouts)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, STD, generator=g)


def bit_sum(t: torch.Tensor) -> int:
    """Exact, order-independent checksum of a bf16 tensor: the sum of its 16-bit patterns."""
    flat = t.contiguous().view(-1).view(torch.int16)
    return int(sum(c.to(torch.int64).sum().item() for c in flat.split(1 << 20)))


def abs_sum(t: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """sum |W| in float64 (an fp8 weight is dequantised by its per-row `scale` first), in row chunks."""
    total = 0.0
    for i in range(0, t.shape[0], 256):
        w = t[i:i + 256].double()
        total += (w * scale[i:i + 256].double() if scale is not None else w).abs().sum().item()
    return total


def shard_plan(layout: dict[str, list[tuple[str, tuple[int, ...]]]]) -> list[list[str]]:
    """Split the canonical keys, in order, into N_SHARDS runs of about equal bytes."""
    sizes = {k: sum(torch.Size(s).numel() * 2 for _, s in pieces) for k, pieces in layout.items()}
    target, shards, acc = sum(sizes.values()) / N_SHARDS, [[]], 0
    for k in layout:
        if acc >= target * len(shards) and len(shards) < N_SHARDS:
            shards.append([])
        shards[-1].append(k)
        acc += sizes[k]
    return shards


def write_checkpoint(root: Path) -> dict:
    """Write both layouts in one pass over the canonical tensors; returns the expected checksums."""
    layout = canonical_layout(diffusers_layout())
    tdir = root / "transformer"
    tdir.mkdir(parents=True, exist_ok=True)
    comfy_specs = [(k, _joined_shape(p)) for k, p in layout.items()] + [("norm_final.weight", (3840,))]
    comfy = StreamingSafetensorsWriter(root / COMFY_FILE, comfy_specs)
    weight_map, expected, total = {}, {}, 0
    for i, keys in enumerate(shard_plan(layout)):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{N_SHARDS:05d}.safetensors"
        shard = StreamingSafetensorsWriter(tdir / name, [p for k in keys for p in layout[k]])
        for k in keys:
            t = synthetic(k, _joined_shape(layout[k]))
            comfy.write(k, t)
            for (dkey, _), piece in zip(layout[k], t.chunk(len(layout[k])), strict=True):
                shard.write(dkey, piece)
                weight_map[dkey] = name
            total += bit_sum(t)
            if k in CHECK_KEYS:
                expected[k] = {"bit_sum": bit_sum(t), "abs_sum": abs_sum(t)}
        shard.close()
    comfy.write("norm_final.weight", torch.ones(3840, dtype=torch.bfloat16))  # the unused Lumina-2 leftover
    comfy.close()
    index = {"metadata": {"total_size": WEIGHT_BYTES}, "weight_map": dict(sorted(weight_map.items()))}
    (tdir / INDEX).write_text(json.dumps(index, indent=2))
    (tdir / "config.json").write_text(json.dumps(TURBO_CONFIG, indent=2))
    return {"version": FORMAT_VERSION, "params": PARAMS_6B, "expected": expected, "total_bit_sum": total}


def _joined_shape(pieces: list[tuple[str, tuple[int, ...]]]) -> tuple[int, ...]:
    rows = sum(shape[0] for _, shape in pieces)
    return (rows, *pieces[0][1][1:])


def ensure_checkpoint(root: Path, regen: bool) -> dict:
    """Reuse the checkpoint in `root` if its marker is current, else (re)write it; returns the marker."""
    marker = root / MARKER
    complete = marker.is_file() and (root / COMFY_FILE).is_file() and (root / "transformer" / INDEX).is_file()
    if not regen and complete:
        info = json.loads(marker.read_text())
        if info.get("version") == FORMAT_VERSION:
            print(f"reusing {root} (--regen to rewrite)")
            return info
    shutil.rmtree(root, ignore_errors=True)
    print(f"writing the synthetic 6B checkpoint to {root} (both layouts, ~25 GB) ...", flush=True)
    t0 = time.perf_counter()
    info = write_checkpoint(root)
    info["write_s"] = time.perf_counter() - t0
    marker.write_text(json.dumps(info, indent=2))
    print(f"  written in {info['write_s']:.0f} s")
    return info
