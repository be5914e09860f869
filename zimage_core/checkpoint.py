"""Load a Z-Image DiT from any layout users hold, streamed tensor by tensor into a meta-initialised model.

Layouts (detected from headers): the official diffusers shards (`transformer/` + index, or its first
shard), a plain file in those names (musubi full fine-tunes), ComfyUI single files (fused qkv, with
or without `model.diffusion_model.`), and ComfyUI fp8 files ("scaled fp8": a `scaled_fp8` marker and
`<layer>.scale_weight`; the newer `<layer>.weight_scale` + `<layer>.comfy_quant`).

dtype policy: everything is cast to the compute `dtype`, except, with `WeightFormat.FP8`, the large
block Linear weights (attention qkv/out, FFN w1/w2/w3), which stay float8_e4m3fn with a float32
per-row scale and are upcast per matmul. fp8 files are kept as stored under FP8, or dequantised
(W = W8 · scale) otherwise. Loading is strict: a missing or unexpected key or a wrong shape is an
error naming the file and the keys, raised from the headers before any tensor is read.
"""

from __future__ import annotations

import json
import mmap
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from .config import DiTConfig, WeightFormat
from .dit import ZImageDiT
from .keymaps import ALL_IN_ONE_PREFIX, UNUSED_COMFY_KEYS, DiTLayout, find_prefix, join_key, split_key, to_canonical
from .probe import FOREIGN_NAMES, ModelKind, classify
from .safetensors_file import Header, TensorInfo, map_file, map_tensor, read_into, read_tensor, release_mappings
from .sources import Source, open_source


class QuantFormat(str, Enum):
    NONE = "none"
    SCALED_FP8 = "scaled_fp8"  # legacy ComfyUI: `scaled_fp8` marker + `<layer>.scale_weight`
    COMFY_QUANT = "comfy_quant"  # newer ComfyUI: `<layer>.weight_scale` + `<layer>.comfy_quant` JSON


SCALE_LEAVES = {"scale_weight", "weight_scale"}
IGNORED_LEAVES = {"scale_input", "input_scale", "comfy_quant"}  # activation scales: we upcast weights instead
_FP8_TARGETS = re.compile(
    r"^(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])\.weight$"
)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class Piece:
    """One stored tensor feeding rows [part·n, (part+1)·n) of a canonical tensor."""

    header: Header
    key: str
    info: TensorInfo
    part: int = 0
    parts: int = 1


@dataclass
class DiTPlan:
    source: Source
    layout: DiTLayout
    quant: QuantFormat
    prefix: str
    config: DiTConfig
    pieces: dict[str, list[Piece]]  # canonical key -> pieces
    shapes: dict[str, tuple[int, ...]]  # canonical key -> shape of the joined tensor
    scales: dict[str, Piece] = field(default_factory=dict)  # stored key (with prefix) of an fp8 weight -> its scale
    ignored: list[str] = field(default_factory=list)


def plan_dit(path: str | Path | Source) -> DiTPlan:
    """Detect layout and quantisation, map every stored key to ours and infer the config: headers only."""
    src = path if isinstance(path, Source) else open_source(path, component="transformer")
    tensors = src.tensors()
    kind = classify(tensors)
    if kind is not ModelKind.ZIMAGE_DIT:
        raise ValueError(f"{src.path}: this is {FOREIGN_NAMES.get(kind, 'not a Z-Image DiT checkpoint')}, "
                         "not a Z-Image DiT")
    # A ComfyUI all-in-one checkpoint also holds the text encoder and VAE: take its DiT container only.
    if any(k.startswith(ALL_IN_ONE_PREFIX) for k in tensors):
        tensors = {k: v for k, v in tensors.items() if k.startswith(ALL_IN_ONE_PREFIX) or k == "scaled_fp8"}
    prefix = find_prefix(k for k in tensors if k != "scaled_fp8")
    bare = {k.removeprefix(prefix): v for k, v in tensors.items()}
    layout = DiTLayout.DIFFUSERS if "all_x_embedder.2-1.weight" in bare else DiTLayout.COMFY
    quant = quant_format(bare)
    pieces: dict[str, list[Piece]] = defaultdict(list)
    scales: dict[str, Piece] = {}
    ignored: list[str] = []
    for key, (header, info) in bare.items():
        module, leaf = split_key(key)
        if key == "scaled_fp8" or leaf in IGNORED_LEAVES or (layout is DiTLayout.COMFY and key in UNUSED_COMFY_KEYS):
            ignored.append(key)
        elif leaf in SCALE_LEAVES and quant is not QuantFormat.NONE:
            scales[prefix + join_key(module, "weight")] = Piece(header, prefix + key, info)
        else:
            t = to_canonical(module, layout)
            pieces[join_key(t.module, leaf)].append(Piece(header, prefix + key, info, t.part, t.parts))
    orphans = sorted({k.removeprefix(prefix) for k in scales} - set(bare))
    if orphans:
        raise ValueError(f"{src.path}: scales without a weight: {orphans[:5]}")
    shapes = {k: _joined_shape(k, ps) for k, ps in pieces.items()}
    try:
        config = DiTConfig.from_key_shapes(shapes)
    except (KeyError, ValueError) as e:  # a key the config is read from is missing or malformed
        raise ValueError(f"{src.path}: cannot infer the DiT config: "
                         f"{f'missing key {e}' if isinstance(e, KeyError) else e}") from None
    plan = DiTPlan(src, layout, quant, prefix, config, dict(pieces), shapes, scales, ignored)
    _check_against_model(plan)
    return plan


def quant_format(bare: dict[str, tuple[Header, TensorInfo]]) -> QuantFormat:
    if "scaled_fp8" in bare:
        return QuantFormat.SCALED_FP8
    quant_keys = [k for k in bare if k.endswith(".comfy_quant")]
    if not quant_keys:
        return QuantFormat.NONE
    for key in quant_keys:
        header, info = bare[key]
        blob = bytes(_read_small(header.path, info).numpy())
        try:
            spec = json.loads(blob.decode())
        except ValueError:  # also UnicodeDecodeError
            spec = None
        if not isinstance(spec, dict):
            raise ValueError(f"{header.path}: {key} is not a ComfyUI quantisation spec (a JSON object)")
        if spec.get("format") not in ("float8_e4m3fn", "float8_e5m2"):
            raise ValueError(f"{header.path}: {key} uses quantisation format {spec.get('format')!r}; only "
                             "float8 (float8_e4m3fn, float8_e5m2) files are supported")
    return QuantFormat.COMFY_QUANT


def _joined_shape(key: str, pieces: list[Piece]) -> tuple[int, ...]:
    parts = pieces[0].parts
    got = sorted(p.part for p in pieces)
    if got != list(range(parts)) or len({p.info.shape for p in pieces}) != 1:
        raise ValueError(f"{pieces[0].header.path}: {key} needs {parts} equal row blocks, found "
                         f"{[(p.key, list(p.info.shape)) for p in pieces]}")
    shape = pieces[0].info.shape
    return (shape[0] * parts, *shape[1:]) if parts > 1 else shape


def _check_against_model(plan: DiTPlan) -> None:
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ZImageDiT(plan.config).state_dict().items()}
    where = f"{plan.source.path} (detected {plan.layout.value} layout, {plan.config.n_layers} layers)"
    check_keys(where, expected, plan.shapes, stored=lambda k: plan.pieces[k][0].key if k in plan.pieces else k)


def check_keys(where: str, expected: Mapping[str, tuple[int, ...]], got: Mapping[str, Sequence[int]],
               stored: Callable[[str], str] = str, stray: Sequence[str] = (),
               fits: Callable[[str, tuple[int, ...], tuple[int, ...]], bool] | None = None) -> None:
    """Strict loading from headers: every expected key present, none extra, every shape right.

    One ValueError naming `where` and up to five keys of each problem. `stored(key)` gives the name a
    key has (or would have) in the file, `stray` are stored keys that map to nothing, `fits(key, got, expected)` may
    accept a shape that differs but loads (a Linear filling a 1×1 conv).
    """
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(stored(k) for k in set(got) - set(expected)) + sorted(stray)
    problems = [f"{len(missing)} missing keys, e.g. {[stored(k) for k in missing[:5]]}"] if missing else []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
    wrong = [(k, tuple(got[k]), e) for k, e in expected.items()
             if k in got and tuple(got[k]) != e and not (fits and fits(k, tuple(got[k]), e))]
    if wrong:
        problems.append(f"shape mismatch for {len(wrong)} keys, e.g. "
                        + "; ".join(f"{stored(k)}: file {list(g)} vs model {list(e)}" for k, g, e in wrong[:5]))
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)}")


def load_dit(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
             weight_format: WeightFormat = WeightFormat.COMPUTE) -> ZImageDiT:
    """Load a Z-Image DiT from a file, a sharded folder, an index or a shard; see the module docstring.

    `dtype` is the compute dtype (fp32/bf16 on CPU, bf16/fp16 on CUDA, fp16 on MPS). Nothing holds a
    second copy of the weights: on the CPU a tensor kept as stored is a copy-on-write view of the file
    mapping; any other is read into its final storage (through one tensor-sized buffer when it must
    be converted).
    """
    plan = plan_dit(path)
    device = torch.device(device)
    with torch.device("meta"):
        model = ZImageDiT(plan.config)
    fp8 = (lambda key: bool(_FP8_TARGETS.match(key))) if weight_format is WeightFormat.FP8 else None
    stream_weights(model, plan.source.headers, plan.pieces, plan.shapes, device, dtype, plan.scales, fp8)
    return model.eval().requires_grad_(False)


def stream_weights(model: nn.Module, headers: Sequence[Header], pieces: Mapping[str, list[Piece]],
                   shapes: Mapping[str, tuple[int, ...]], device: torch.device | str, dtype: torch.dtype,
                   scales: Mapping[str, Piece] | None = None, fp8: Callable[[str], bool] | None = None) -> None:
    """Fill a meta-initialised `model` with stored tensors, file by file in file order (any model, not only the DiT).

    `pieces` maps each parameter name to the stored tensors it is made of (row blocks when fused);
    `shapes` gives each parameter's shape (a stored tensor of the same numel is reshaped, e.g. a 1×1
    conv stored as a Linear). `scales` maps a stored fp8 weight's key to its scale; parameters for
    which `fp8(name)` is true are kept float8_e4m3fn with a per-row scale (`Linear.scale_weight`).
    On the CPU a tensor kept as stored is a copy-on-write view of the file mapping; any other is
    read into its final storage, through one reused buffer when it must be converted. The file
    mappings that back parameters are kept in `model.mapped_files` (see `release_mapped_pages`).
    """
    device = torch.device(device)
    mapped: list[mmap.mmap] = []
    scales = scales or {}
    pending: dict[str, _Assembly] = {}
    scratch = _Scratch()
    for header in headers:  # shard by shard, tensors in file order
        jobs = [(k, p) for k, ps in pieces.items() for p in ps if p.header is header]
        mapping = map_file(header.path) if device.type == "cpu" and jobs else None
        with open(header.path, "rb") as f:
            for key, piece in sorted(jobs, key=lambda j: j[1].info.start):
                keep_fp8 = fp8 is not None and fp8(key)
                storage = torch.float8_e4m3fn if keep_fp8 else dtype
                scale = scales.get(piece.key)
                if key not in pending and mapping is not None and piece.parts == 1 and scale is None \
                        and piece.info.dtype == storage and not keep_fp8:
                    view = map_tensor(mapping, piece.info)
                    if view is not None:
                        _assign(model, key, view.reshape(shapes[key]))
                        if not mapped or mapped[-1] is not mapping:
                            mapped.append(mapping)
                        continue
                asm = pending.setdefault(key, _Assembly(shapes[key], storage, device))
                asm.write(f, piece, None if scale is None else _read_small(scale.header.path, scale.info), scratch)
                if asm.done == piece.parts:
                    _assign(model, key, asm.tensor, asm.scale)
                    del pending[key]
    model.mapped_files = _Mappings(mapped)


class _Mappings(tuple):
    """The file mappings behind a model's weights; a deep copy of the model shares them (mmaps can't be copied)."""

    def __deepcopy__(self, memo: dict) -> _Mappings:
        return self


def release_mapped_pages(model: nn.Module) -> bool:
    """Drop `model`'s file-mapped weights from this process's resident memory, keeping the model usable.

    Used between pipeline stages (the text encoder is idle while the DiT samples), so that peak memory
    is not the sum of the models. The pages stay in the OS page cache and come back from it on next use
    (about 0.02 s per GB). A file whose mapped weights were changed in place (a merged LoRA) is left
    resident, so no edit is ever lost. Returns True if every mapping was released; Linux only (elsewhere,
    and for weights that were read rather than mapped, nothing happens).
    """
    return release_mappings(getattr(model, "mapped_files", ()))


class _Assembly:
    """A canonical tensor being filled, one row block at a time, in its final storage dtype."""

    def __init__(self, shape: tuple[int, ...], storage: torch.dtype, device: torch.device) -> None:
        self.tensor = torch.empty(shape, dtype=storage, device=device)
        self.scale = torch.empty(shape[0], 1, device=device) if storage == torch.float8_e4m3fn else None
        self.done = 0

    def write(self, f, piece: Piece, scale: torch.Tensor | None, scratch: _Scratch) -> None:
        """Fill this piece's rows; `scale` is the stored fp8 scale (scalar or per row) if any."""
        rows = slice(None)
        if piece.parts > 1:
            n = self.tensor.shape[0] // piece.parts
            rows = slice(piece.part * n, (piece.part + 1) * n)
        dst = self.tensor[rows].view(piece.info.shape)  # same numel; a 1×1 conv may be stored as a Linear
        if piece.info.dtype == dst.dtype and (scale is None or self.scale is not None):
            if dst.device.type == "cpu":
                read_into(f, piece.info, dst)  # straight into the final storage
            else:
                dst.copy_(scratch.read(f, piece.info))
            if self.scale is not None:
                self.scale[rows] = 1.0 if scale is None else _per_row(scale, dst.shape[0])
        else:
            w = scratch.read(f, piece.info).view(dst.shape)
            _convert(w, None if scale is None else _per_row(scale, w.shape[0]), dst,
                     None if self.scale is None else self.scale[rows])
        self.done += 1


class _Scratch:
    """One read buffer for every tensor that must be converted or moved: fresh pages are costly to fault in."""

    def __init__(self) -> None:
        self.buf = torch.empty(0, dtype=torch.uint8)

    def read(self, f, info: TensorInfo) -> torch.Tensor:
        n = info.end - info.start
        if n > self.buf.numel():
            self.buf = torch.empty(n, dtype=torch.uint8)
        return read_into(f, info, self.buf[:n].view(info.dtype).view(info.shape))


_CHUNK_ROWS = 64  # rows converted at a time: fp32 temporaries stay small and cache-resident


def _convert(w: torch.Tensor, src_scale: torch.Tensor | None, dst: torch.Tensor,
             dst_scale: torch.Tensor | None) -> None:
    """dst ← w (dequantised by src_scale if given), quantised to fp8 with one scale per row if dst_scale is given."""
    if w.ndim < 2:
        dst.copy_(w)
        return
    buf = torch.empty(min(_CHUNK_ROWS, w.shape[0]), *w.shape[1:])  # one fp32 scratch, reused
    for i in range(0, w.shape[0], _CHUNK_ROWS):
        rows = slice(i, i + _CHUNK_ROWS)
        chunk = buf[: len(w[rows])]
        chunk.copy_(w[rows])
        if src_scale is not None:
            chunk.mul_(src_scale[rows])
        if dst_scale is not None:
            s = torch.linalg.vector_norm(chunk, ord=float("inf"), dim=1, keepdim=True)  # max |w| per row
            chunk.div_(s.clamp_(min=1e-12).div_(FP8_MAX)).clamp_(-FP8_MAX, FP8_MAX)
            dst_scale[rows] = s
        dst[rows].copy_(chunk)


def _per_row(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A stored scale (scalar or one per output row) as a (rows, 1) float32 tensor."""
    scale = scale.float()
    return scale.reshape(-1, 1) if scale.numel() == rows else scale.reshape(()).expand(rows, 1)


def _read_small(path: Path, info: TensorInfo) -> torch.Tensor:
    """One small tensor (a scale, a quantisation spec) read on its own."""
    with open(path, "rb") as f:
        return read_tensor(f, info)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    module_path, leaf = split_key(key)
    module = model.get_submodule(module_path)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    if scale is not None:
        module.scale_weight = scale
