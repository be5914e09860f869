"""Saving a DiT with LoRAs baked in, streamed tensor by tensor, in the ComfyUI or the official diffusers layout.

    save_merged_dit(dit, [(read_lora("style.safetensors"), 0.8)], "z_image_style_bf16.safetensors")

W' = W + Σ strength·ΔW is computed in float32 per parameter from the *base* parameters, with apply.py's own
planning and merge rule (`plan_patches`, `merged_float32`: the MERGED mode's path), then cast to the output dtype.
`dit` is never changed: runtime LoRAs it may carry as `Linear.delta` callables (ComfyUI object patches) are not
part of its parameters and are ignored. The header is written first from the known shapes and dtypes, then each tensor's
bytes: at most one merged parameter (plus its cast) is alive at a time, so saving the 6B model needs memory for
its largest tensor, not a second state dict.

Layouts:
- `DiTLayout.COMFY`: one safetensors file in our canonical names, which are those of the Comfy-Org release
  (fused `attention.qkv`, `x_embedder`, `final_layer`, plus the unused Lumina-2 `norm_final.weight` the release
  carries, as ones): ComfyUI's UNETLoader and `load_dit` read it.
- `DiTLayout.DIFFUSERS`: a folder as the official `transformer/`: `config.json`, and
  `diffusion_pytorch_model.safetensors`, or `diffusion_pytorch_model-0000i-of-0000n.safetensors` shards of at most
  `max_shard_bytes` with their `.safetensors.index.json` (diffusers' own convention), split q/k/v through keymaps.

`MergedDtype.FP8` (ComfyUI layout only: diffusers reads no fp8 checkpoint) writes ComfyUI's legacy "scaled fp8":
a 2-element `scaled_fp8` marker (fp8 matmul off: the activations are not quantised) and, for every Linear weight,
float8_e4m3fn with a float32 per-tensor `scale_weight` = max|W'|/448. Every Linear, not only the large block ones:
ComfyUI 0.3.75 builds every Linear of a scaled-fp8 model as an fp8 layer and would cast a bf16 weight to fp8 with
scale 1 (a per-row scale does not load there either). Other tensors (norms, biases, pad tokens) are bf16.

Output is atomic: written under a temporary name beside `out`, then renamed; a failure leaves nothing behind.
An existing `out` is refused. The merged LoRAs (names, strengths, formats) are recorded in `__metadata__`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import FP8_MAX
from ..dit import ZImageDiT
from ..keymaps import DiTLayout, from_canonical, join_key, split_key
from ..safetensors_file import DTYPES
from .apply import merged_float32, plan_patches
from .read import LoraFile


class MergedDtype(str, Enum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    FP8 = "fp8_e4m3fn"


DEFAULT_SHARD_BYTES = 5 * 10**9  # the official release's shards are ≈ 5 GB
_STORAGE = {MergedDtype.BF16: torch.bfloat16, MergedDtype.FP16: torch.float16, MergedDtype.FP32: torch.float32,
            MergedDtype.FP8: torch.bfloat16}  # fp8: what is not a Linear weight stays bf16
_SAFETENSORS_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_DIFFUSERS_STEM = "diffusion_pytorch_model"


def save_merged_dit(dit: ZImageDiT, loras: Sequence[tuple[LoraFile, float]], out: str | os.PathLike,
                    layout: DiTLayout = DiTLayout.COMFY, dtype: MergedDtype = MergedDtype.BF16, *,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `dit` with `(lora, strength)` pairs merged (see the module docstring); returns the file or folder.

    Raises ValueError (bad option, a LoRA that does not fit this DiT, fp16 overflow) or FileExistsError /
    FileNotFoundError (output exists, its folder does not) naming the path or key, before writing anything
    where it can tell.
    """
    layout, dtype, out = check_merge_output(out, layout, dtype, max_shard_bytes)
    merger = _Merger(dit, loras)
    entries = plan_entries(dit, layout, dtype)
    metadata = {"format": "pt", "zimage_layout": layout.value, "zimage_merged_dtype": dtype.value,
                "zimage_merged_loras": json.dumps(merger.record())}
    if layout is DiTLayout.COMFY:
        with _atomic(out, folder=False) as tmp:
            write_safetensors(tmp, entries, merger.tensor, metadata)
    else:
        with _atomic(out, folder=True) as tmp:
            _write_diffusers(tmp, dit, entries, merger.tensor, metadata, max_shard_bytes)
    return out


def check_merge_output(out: str | os.PathLike, layout: DiTLayout | str = DiTLayout.COMFY,
                       dtype: MergedDtype | str = MergedDtype.BF16, max_shard_bytes: int = DEFAULT_SHARD_BYTES
                       ) -> tuple[DiTLayout, MergedDtype, Path]:
    """The options of `save_merged_dit`, checked (as enums) before any work: callers that must first load a large
    DiT can refuse a bad output up front."""
    out = Path(out)
    try:
        layout, dtype = DiTLayout(layout), MergedDtype(dtype)
    except ValueError as e:
        raise ValueError(f"{out}: {e}; layouts {[v.value for v in DiTLayout]}, dtypes "
                         f"{[v.value for v in MergedDtype]}") from None
    if layout is DiTLayout.COMFY and out.suffix != ".safetensors":
        raise ValueError(f"{out}: a merged ComfyUI DiT is saved as one .safetensors file only")
    if layout is DiTLayout.DIFFUSERS and out.suffix == ".safetensors":
        raise ValueError(f"{out}: the diffusers layout is a folder (config.json + shards); give a folder path")
    if layout is DiTLayout.DIFFUSERS and dtype is MergedDtype.FP8:
        raise ValueError(f"{out}: fp8 is written in ComfyUI's scaled-fp8 layout only; diffusers' "
                         "ZImageTransformer2DModel.from_pretrained reads no fp8 checkpoint (use layout comfy)")
    if max_shard_bytes < 1:
        raise ValueError(f"{out}: max_shard_bytes must be positive, got {max_shard_bytes}")
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out}: already exists; a merged model never overwrites (remove it or pick another)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out}: the folder {out.parent} does not exist")
    return layout, dtype, out


# ------------------------------------------------------------------------------------------ what gets written


@dataclass(frozen=True)
class Entry:
    """One tensor of the output: its key, shape and dtype (known before any data), and where its values come from."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    param: str = ""  # canonical parameter it is made from ("" for the constants below)
    rows: slice | None = None  # row block of `param` (diffusers q/k/v)
    kind: str = "value"  # value | fp8 | scale | ones (norm_final) | marker (scaled_fp8)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_entries(dit: ZImageDiT, layout: DiTLayout, dtype: MergedDtype) -> list[Entry]:
    """Every output tensor in file order, from parameter names and shapes only (a meta-device `dit` will do)."""
    storage = _STORAGE[dtype]
    entries: list[Entry] = []
    for name, p in dit.named_parameters():
        module, leaf = split_key(name)
        shape = tuple(p.shape)
        if dtype is MergedDtype.FP8 and leaf == "weight" and isinstance(dit.get_submodule(module), nn.Linear):
            entries += [Entry(name, shape, torch.float8_e4m3fn, name, kind="fp8"),
                        Entry(join_key(module, "scale_weight"), (), torch.float32, name, kind="scale")]
            continue
        for foreign, target in from_canonical(module, layout):
            n = shape[0] // target.parts
            rows = None if target.parts == 1 else slice(target.part * n, (target.part + 1) * n)
            entries.append(Entry(join_key(foreign, leaf), (n, *shape[1:]), storage, name, rows))
    if layout is DiTLayout.COMFY:
        entries.append(Entry("norm_final.weight", (dit.cfg.dim,), storage, kind="ones"))  # as the release carries
    if dtype is MergedDtype.FP8:
        entries.append(Entry("scaled_fp8", (2,), torch.float8_e4m3fn, kind="marker"))
    return entries


class _Merger:
    """Merged float32 parameters, one at a time: only the last is kept (q/k/v blocks and fp8 scales reuse it)."""

    def __init__(self, dit: ZImageDiT, loras: Sequence[tuple[LoraFile, float]]) -> None:
        self.dit = dit
        self.by_param, self.reports = plan_patches(dit, loras)  # checks every LoRA against the shapes first
        self.strengths = [float(s) for _, s in loras]
        self.formats = [lora.format.value for lora, _ in loras]
        self._last: tuple[str, dict[str, torch.Tensor]] | None = None

    def record(self) -> list[dict]:
        return [{"name": r.name, "strength": r.strength, "format": f, "modules": len(r.matched)}
                for r, f in zip(self.reports, self.formats, strict=True)]

    def tensor(self, e: Entry) -> torch.Tensor:
        """The values of one output entry, on the CPU, in its dtype."""
        if e.kind == "ones":
            return torch.ones(e.shape, dtype=e.dtype)
        if e.kind == "marker":
            return torch.zeros(e.shape, dtype=e.dtype)
        cached = self._cached(e.param)
        if e.kind in ("fp8", "scale"):
            if "fp8" not in cached:
                w = cached["value"]
                scale = w.abs().max().clamp(min=1e-12) / FP8_MAX  # per tensor: what ComfyUI 0.3.75 loads
                cached["fp8"] = (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
                cached["scale"] = scale.reshape(())
            return cached[e.kind].cpu()
        w = cached["value"] if e.rows is None else cached["value"][e.rows]
        out = w.to(device="cpu", dtype=e.dtype)
        if e.dtype == torch.float16 and not torch.isfinite(out).all():
            raise ValueError(f"{e.key}: merged values up to {w.abs().max().item():.4g} overflow fp16 "
                             f"(max {torch.finfo(torch.float16).max:g}); save as bf16 or fp32")
        return out

    def _cached(self, name: str) -> dict[str, torch.Tensor]:
        if self._last is None or self._last[0] != name:
            self._last = None  # drop the previous parameter before computing the next
            self._last = (name, {"value": self._merged(name)})
        return self._last[1]

    def _merged(self, name: str) -> torch.Tensor:
        with torch.no_grad():
            return merged_float32(self.dit, name, self.by_param.get(name, ()), self.strengths)


# ---------------------------------------------------------------------------------------------------- writing


def write_safetensors(path: Path, entries: Sequence[Entry], values: Callable[[Entry], torch.Tensor],
                      metadata: dict[str, str]) -> None:
    """A safetensors file streamed entry by entry: the header from shapes and dtypes, then each tensor's bytes."""
    header: dict[str, object] = {}
    offset = 0
    for e in entries:
        header[e.key] = {"dtype": _SAFETENSORS_NAMES[e.dtype], "shape": list(e.shape),
                         "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data start stays 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in entries:
            t = values(e)
            if tuple(t.shape) != e.shape or t.dtype != e.dtype:
                raise RuntimeError(f"{path}: {e.key} came out {t.dtype} {list(t.shape)}, its header says "
                                   f"{e.dtype} {list(e.shape)}")
            f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            del t
        f.flush()
        os.fsync(f.fileno())


def _write_diffusers(folder: Path, dit: ZImageDiT, entries: list[Entry], values: Callable[[Entry], torch.Tensor],
                     metadata: dict[str, str], max_shard_bytes: int) -> None:
    (folder / "config.json").write_text(json.dumps(diffusers_config(dit), indent=2) + "\n")
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:  # in order, so a split qkv's blocks stay together and reuse one merged tensor
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    if len(shards) == 1:
        write_safetensors(folder / f"{_DIFFUSERS_STEM}.safetensors", shards[0], values, metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{_DIFFUSERS_STEM}-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / name, shard, values, metadata)
        weight_map |= {e.key: name for e in shard}
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries), **metadata}, "weight_map": weight_map}
    (folder / f"{_DIFFUSERS_STEM}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def diffusers_config(dit: ZImageDiT) -> dict:
    """`config.json` for diffusers' ZImageTransformer2DModel (ZIMAGE_SPEC §2a); refuses what it cannot express."""
    c = dit.cfg
    fixed = {"ffn_dim": int(c.dim / 3 * 8), "t_embed_dim": 1024, "freq_dim": 256}  # derived inside diffusers
    odd = {k: (getattr(c, k), v) for k, v in fixed.items() if getattr(c, k) != v}
    if odd:
        raise ValueError(f"this DiT cannot be written in the diffusers layout: diffusers derives "
                         f"{', '.join(f'{k} = {v}' for k, (_, v) in odd.items())}, this DiT has "
                         f"{', '.join(f'{k} = {g}' for k, (g, _) in odd.items())} (use layout comfy)")
    return {"_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [c.f_patch_size],
            "all_patch_size": [c.patch_size], "axes_dims": list(c.axes_dims), "axes_lens": list(c.axes_lens),
            "cap_feat_dim": c.cap_feat_dim, "dim": c.dim, "in_channels": c.in_channels, "n_heads": c.n_heads,
            "n_kv_heads": c.n_heads, "n_layers": c.n_layers, "n_refiner_layers": c.n_refiner_layers,
            "norm_eps": c.norm_eps, "qk_norm": True, "rope_theta": c.rope_theta, "t_scale": c.t_scale}


@contextmanager
def _atomic(out: Path, folder: bool) -> Iterator[Path]:
    """A temporary file or folder beside `out`, renamed to `out` on success and removed on any failure."""
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    else:
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if out.exists():  # appeared while we wrote
            raise FileExistsError(f"{out}: created by someone else while the merged model was written")
        os.rename(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
