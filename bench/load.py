"""Load a full-size (6B) synthetic bf16 Z-Image DiT with ours, diffusers and ComfyUI: wall time and peak RSS.

Run: .venv/bin/python bench/load.py [--dir bench/out/ckpt6b] [--regen] [--cleanup] [--only NAME ...]

The checkpoint is written once (about 25 GB: the official sharded diffusers layout and the ComfyUI single
file, same values) by a streaming safetensors writer, then reused. Each loader runs in a fresh
subprocess after the files it reads were read once (`cat > /dev/null`), so every loader starts from a
warm page cache and its own peak RSS. Writes bench/out/load.json; bench/README.md explains the columns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import OUT_DIR, PeakStatus, add_repo_paths, disk_read_kib, import_comfy, read_status, table, write_json
from synth_ckpt import (
    CHECK_KEYS,
    COMFY_FILE,
    PARAMS_6B,
    WEIGHT_BYTES,
    abs_sum,
    bit_sum,
    ensure_checkpoint,
    to_canonical,
)

# ---------------------------------------------------------------------------------------------- loaders
# Each loader: (files it reads, prepare) where prepare(root) does the imports and returns the timed load
# call and a function giving the loaded tensors by canonical name (fp8 weights with their scale).

Piece = tuple[torch.Tensor, torch.Tensor | None]  # a weight (row block) and its fp8 per-row scale, if any
Tensors = dict[str, list[Piece]]  # canonical name -> pieces in row order
Prepared = tuple[Callable[[], object], Callable[[object], Tensors]]


def _shards(root: Path) -> list[Path]:
    return sorted((root / "transformer").glob("*.safetensors"))


def _ours(kind: str) -> Callable[[Path], Prepared]:
    def prepare(root: Path) -> Prepared:
        add_repo_paths()
        from zimage_core import WeightFormat, load_dit

        path = root if kind == "sharded" else root / COMFY_FILE
        fmt = WeightFormat.FP8 if kind == "fp8" else WeightFormat.COMPUTE
        return (lambda: load_dit(path, "cpu", torch.bfloat16, weight_format=fmt)), _ours_tensors
    return prepare


def _ours_tensors(model: torch.nn.Module) -> Tensors:
    out = {}
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        out[name] = [(p, getattr(module, "scale_weight", None) if name.endswith(".weight") else None)]
    return out


def _diffusers(root: Path) -> Prepared:
    from diffusers import ZImageTransformer2DModel

    def load() -> torch.nn.Module:
        return ZImageTransformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=torch.bfloat16)

    def tensors(model: torch.nn.Module) -> Tensors:
        groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for name, p in model.named_parameters():
            canon, part = to_canonical(name)
            groups.setdefault(canon, []).append((part, p))
        return {k: [(p, None) for _, p in sorted(v, key=lambda x: x[0])] for k, v in groups.items()}

    return load, tensors


def _comfy(root: Path) -> Prepared:
    import_comfy()
    import comfy.sd

    def load() -> object:
        return comfy.sd.load_diffusion_model(str(root / COMFY_FILE), model_options={"dtype": torch.bfloat16})

    def tensors(patcher: object) -> Tensors:
        dm = patcher.model.diffusion_model
        return {k: [(p, None)] for k, p in dm.named_parameters() if k != "norm_final.weight"}

    return load, tensors


@dataclass(frozen=True)
class Loader:
    name: str
    call: str  # what is timed, for the report
    files: Callable[[Path], list[Path]]
    prepare: Callable[[Path], Prepared]
    fp8: bool = False


LOADERS = (
    Loader("ours_sharded", "load_dit(<dir>, 'cpu', bf16)", _shards, _ours("sharded")),
    Loader("ours_comfy", f"load_dit({COMFY_FILE}, 'cpu', bf16)", lambda r: [r / COMFY_FILE], _ours("comfy")),
    Loader("ours_fp8", f"load_dit({COMFY_FILE}, 'cpu', bf16, weight_format=FP8)", lambda r: [r / COMFY_FILE],
           _ours("fp8"), fp8=True),
    Loader("diffusers", "ZImageTransformer2DModel.from_pretrained(<dir>, subfolder='transformer', bf16)",
           _shards, _diffusers),
    Loader("comfy", f"comfy.sd.load_diffusion_model({COMFY_FILE}, dtype=bf16)", lambda r: [r / COMFY_FILE], _comfy),
)


# ---------------------------------------------------------------------------------------------- child

def checksums(tensors: Tensors, fp8: bool) -> dict:
    """Per CHECK_KEYS: exact bf16 bit sum (not for fp8 weights) and sum |W|; the bit sum of everything."""
    out: dict = {}
    for k in CHECK_KEYS:
        pieces = tensors[k]
        quantised = any(s is not None for _, s in pieces)
        out[k] = {"abs_sum": sum(abs_sum(t, s) for t, s in pieces),
                  "bit_sum": None if quantised else sum(bit_sum(t) for t, _ in pieces)}
    if not fp8:
        out["total_bit_sum"] = sum(bit_sum(t) for pieces in tensors.values() for t, _ in pieces)
    return out


def touch_all(tensors: Tensors) -> float:
    """Read one byte of every 4 KiB page of every loaded tensor (lazily mmap'd weights get read now);
    returns the seconds it took, which is near zero when the weights are already in anonymous memory."""
    t0 = time.perf_counter()
    for pieces in tensors.values():
        for t, scale in pieces:
            for x in (t, scale) if scale is not None else (t,):
                x.contiguous().view(-1).view(torch.uint8)[::2048].sum()
    return time.perf_counter() - t0


def mapped_files(root: Path) -> list[str]:
    """Checkpoint files still mmap'd by this process."""
    with open("/proc/self/maps") as f:
        paths = {line.split(maxsplit=5)[5].strip() for line in f if len(line.split(maxsplit=5)) == 6}
    return sorted(Path(p).name for p in paths if p.startswith(str(root.resolve())))


def child_main(name: str, root: Path) -> None:
    """Run one loader in this (fresh) process and print one `RESULT {json}` line."""
    Path("/proc/self/oom_score_adj").write_text("1000")  # if memory runs out, the kernel kills this child
    loader = next(x for x in LOADERS if x.name == name)
    load, tensors_of = loader.prepare(root)
    res: dict = {"rss_before_load": read_status()["VmRSS"]}
    sampler = PeakStatus(["RssAnon", "RssFile"])
    sampler.start()
    t0, kib0 = time.perf_counter(), disk_read_kib()
    model = load()
    res["load_s"] = time.perf_counter() - t0
    res["disk_read_gb"] = (disk_read_kib() - kib0) * 1024 / 1e9
    res["sampled_peak"], res["after_load"] = sampler.stop(), read_status()
    res["still_mapped"] = mapped_files(root)
    tensors = tensors_of(model)
    res["touch_s"] = touch_all(tensors)
    res["after_touch"] = read_status()
    res["params"] = sum(t.numel() for pieces in tensors.values() for t, _ in pieces)
    res["dtypes"] = sorted({str(t.dtype) for pieces in tensors.values() for t, _ in pieces})
    res["checksums"] = checksums(tensors, loader.fp8)
    res["end"] = read_status()
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------- parent


def warm_page_cache(root: Path, files: list[Path]) -> float:
    """Drop the other layout's files from the page cache (posix_fadvise DONTNEED), then read these files
    once (cat > /dev/null) so the loader starts from a warm cache; returns the seconds the read took.

    A 12.3 GB file and a 12.3 GB model do not both fit in 24 GiB: part of the cache is evicted during the
    load, and the child reports how much was read from disk again (`disk_read_gb`).
    """
    for f in [root / COMFY_FILE, *_shards(root)]:
        if f not in files:
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def run_child(loader: Loader, root: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", loader.name, "--dir", str(root)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        return {"status": "ok", **json.loads(lines[-1].removeprefix("RESULT "))}
    why = "killed by SIGKILL (the OOM killer, oom_score_adj 1000)" if proc.returncode == -9 else "failed"
    return {"status": f"{why}, rc {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}


def verify(res: dict, info: dict, fp8: bool) -> str:
    """'exact' when every bit sum matches the generator's, else the largest relative |W| sum error."""
    sums, expected = res["checksums"], info["expected"]
    if not fp8:
        exact = all(sums[k]["bit_sum"] == expected[k]["bit_sum"] for k in CHECK_KEYS)
        exact = exact and sums["total_bit_sum"] == info["total_bit_sum"]
        if exact:
            return "exact (all params)"
    worst = max(abs(sums[k]["abs_sum"] / expected[k]["abs_sum"] - 1) for k in CHECK_KEYS)
    return f"{'MISMATCH' if not fp8 else 'fp8'}: max rel |W|-sum err {worst:.1e}"


def measure(loaders: list[Loader], root: Path, info: dict, timeout: float, repeats: int) -> dict[str, dict]:
    """Run every loader `repeats` times (loaders interleaved); keep each loader's fastest run, with the
    load times and VmHWM of all its runs."""
    runs: dict[str, list[dict]] = {x.name: [] for x in loaders}
    for _ in range(repeats):
        for loader in loaders:
            runs[loader.name].append(measure_one(loader, root, info, timeout))
    results = {}
    for name, rs in runs.items():
        ok = [r for r in rs if r["status"] == "ok"]
        best = min(ok, key=lambda r: r["load_s"]) if ok else rs[-1]
        results[name] = {**best, "runs_load_s": [r.get("load_s") for r in rs],
                         "runs_vmhwm": [r["end"]["VmHWM"] if r["status"] == "ok" else None for r in rs]}
    return results


def measure_one(loader: Loader, root: Path, info: dict, timeout: float) -> dict:
    files = loader.files(root)
    warm_s = warm_page_cache(root, files)
    print(f"{loader.name}: page cache warmed ({sum(f.stat().st_size for f in files) / 1e9:.1f} GB "
          f"in {warm_s:.1f} s), loading in a fresh process ...", flush=True)
    res = run_child(loader, root, timeout)
    res.update(call=loader.call, warm_s=warm_s)
    if res["status"] != "ok":
        print(f"  {res['status']}", flush=True)
        return res
    res["checksum"] = verify(res, info, loader.fp8)
    res["peak_rss_over_weights"] = res["end"]["VmHWM"] / WEIGHT_BYTES
    print(f"  load {res['load_s']:.1f} s (+ touch {res['touch_s']:.1f} s), VmHWM {res['end']['VmHWM'] / 1e9:.2f} GB, "
          f"{res['disk_read_gb']:.1f} GB read from disk, checksum {res['checksum']}", flush=True)
    return res


def ratios(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """ours / reference, for the load call alone and for load + touch (every page of the weights read)."""
    ok = {k: v for k, v in results.items() if v["status"] == "ok"}
    pairs = [(a, b) for a in ("ours_sharded", "ours_comfy") for b in ("diffusers", "comfy") if a in ok and b in ok]
    return {f"{a}/{b}": {"load": ok[a]["load_s"] / ok[b]["load_s"],
                         "load+touch": _loaded_s(ok[a]) / _loaded_s(ok[b])} for a, b in pairs}


def _loaded_s(r: dict) -> float:
    return r["load_s"] + r["touch_s"]


def print_report(results: dict[str, dict], rat: dict[str, dict[str, float]]) -> None:
    gb = 1e9
    print(f"\nweights: {PARAMS_6B:,} params x 2 B = {WEIGHT_BYTES / gb:.2f} GB (bf16); "
          "every loader started from a warm page cache (files read once with cat just before)\n")
    rows = []
    for name, r in results.items():
        if r["status"] != "ok":
            rows.append([name, r["status"]] + [""] * 9)
            continue
        runs = "/".join(f"{x:.1f}" if x is not None else "x" for x in r["runs_load_s"])
        rows.append([name, f"{r['load_s']:.1f}", runs, f"{r['touch_s']:.1f}", f"{r['disk_read_gb']:.1f}",
                     f"{r['end']['VmHWM'] / gb:.2f}", f"{r['peak_rss_over_weights']:.3f}",
                     f"{r['sampled_peak']['RssAnon'] / gb:.2f}", f"{r['after_load']['RssAnon'] / gb:.2f}",
                     len(r["still_mapped"]), r["checksum"]])
    print(table(["loader", "load s", "all runs s", "touch s", "disk GB", "VmHWM GB", "VmHWM/weights",
                 "peak anon GB", "anon after GB", "files mapped", "checksums"], rows))
    print("\nload time ratios (goal <= 1.0), load call | load + touch: "
          + ", ".join(f"{k} {v['load']:.2f} | {v['load+touch']:.2f}" for k, v in rat.items()))
    print("goals: ours VmHWM/weights <= 1.1; ours_fp8 <= 0.6")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=OUT_DIR / "ckpt6b")
    ap.add_argument("--regen", action="store_true", help="rewrite the checkpoint even if present")
    ap.add_argument("--cleanup", action="store_true", help="delete the checkpoint folder at the end")
    ap.add_argument("--only", nargs="+", choices=[x.name for x in LOADERS], help="run only these loaders")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per loader run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per loader (the fastest is reported)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args.child, args.dir)
    info = ensure_checkpoint(args.dir, args.regen)
    loaders = [x for x in LOADERS if not args.only or x.name in args.only]
    results = measure(loaders, args.dir, info, args.timeout, args.repeats)
    rat = ratios(results)
    print_report(results, rat)
    out = {"weight_bytes": WEIGHT_BYTES, "params": PARAMS_6B, "checkpoint": str(args.dir),
           "write_s": info.get("write_s"), "ratios": rat, "loaders": results}
    print(f"\nwrote {write_json('load', out)}")
    if args.cleanup:
        shutil.rmtree(args.dir)
        print(f"deleted {args.dir}")


if __name__ == "__main__":
    main()
