"""LoRA training on CPU: step time and peak RSS of ours (`zimage_core.train.train_lora`) against ComfyUI 0.3.75's
native `TrainLoraNode`, on the same dim-3840 reduced-layer Z-Image file and the same latent + caption features.

Run: .venv/bin/python bench/train.py [--steps 2] [--warmup 1] [--repeats 2] [--layers 1] [--size 256]
Prints a table and writes bench/out/train.json; bench/README.md explains it. Every run of a variant is a fresh
subprocess (this script with --child); the variants run round-robin, `--repeats` times each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from _common import OUT_DIR, PeakStatus, add_repo_paths, import_comfy, read_status, table, write_json

RANK = 16
LEARNING_RATE = 5e-4  # TrainLoraNode's default; ours is given the same
SEED = 0
GIB = 2**30


@dataclass(frozen=True)
class Variant:
    name: str
    side: str  # "comfy" or "ours"
    what: str
    gradient_checkpointing: bool = False  # comfy only (ours has none)
    targets: str = "attn_ffn"  # ours only: TrainTargets value


VARIANTS = {v.name: v for v in (
    Variant("comfy", "comfy", "TrainLoraNode, its defaults (gradient_checkpointing on, LoRA, AdamW, MSE) but fp32 "
            "training and LoRA dtype, rank 16", gradient_checkpointing=True),
    Variant("comfy_nogc", "comfy", "the same with gradient_checkpointing off"),
    Variant("ours", "ours", "train_lora, TrainTargets.ATTN_FFN (our default: qkv/out/w1-3 of the main layers)"),
    Variant("ours_all", "ours", "train_lora, TrainTargets.ALL (+ adaLN, + the refiner blocks)", targets="all"),
)}


@dataclass(frozen=True)
class Spec:
    """What one child runs: the model and data files, and how many steps."""

    model: str
    data: str
    steps: int  # warm-up steps + timed steps
    warmup: int
    threads: int
    profile: bool


# ------------------------------------------------------------------------------------------------- inputs


def write_inputs(args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """The bf16 ComfyUI-detectable DiT file and the training latent + caption features (written once, reused)."""
    add_repo_paths()
    from safetensors.torch import save_file

    from host_models import DETECTABLE, write_detectable_dit

    folder = Path(args.dir)
    cfg = dict(DETECTABLE, n_layers=args.layers)
    model = folder / f"zimage_dit_{args.layers}layers_bf16.safetensors"
    if not model.is_file():
        print(f"writing {model} ...", flush=True)
        tmp = model.with_suffix(".part")
        write_detectable_dit(tmp, seed=0, cfg=cfg)
        tmp.rename(model)
    lat = args.size // 8
    data = folder / f"train_data_{args.size}px_{args.cap_len}tok.safetensors"
    if not data.is_file():
        g = torch.Generator().manual_seed(1)
        tensors = {"latent": torch.randn(16, lat, lat, generator=g),  # model space (what FluxVAE.encode returns)
                   "caption": torch.randn(args.cap_len, cfg["cap_feat_dim"], generator=g)}
        tmp = data.with_suffix(".part")
        save_file(tensors, tmp)
        tmp.rename(data)
    tokens = (lat // 2) ** 2
    return model, data, {**cfg, "image_px": args.size, "latent": [16, lat, lat], "image_tokens": tokens,
                         "caption_tokens": args.cap_len, "params": _param_count(cfg)}


def _param_count(cfg: dict) -> int:
    add_repo_paths()
    from lora_fixtures import canonical_shapes

    return sum(torch.Size(s).numel() for s in canonical_shapes(cfg).values()) + cfg["dim"]


# ------------------------------------------------------------------------------------------------- child


class Marks:
    """Step boundaries: (wall, process CPU) time stamps, plus an optional profiler stepped at each one."""

    def __init__(self, prof: torch.profiler.profile | None) -> None:
        self.t: list[tuple[float, float]] = []
        self.prof = prof

    def mark(self) -> None:
        self.t.append((time.perf_counter(), time.process_time()))
        if self.prof is not None:
            self.prof.step()

    def steps(self) -> list[dict]:
        return [{"wall": b[0] - a[0], "cpu": b[1] - a[1]} for a, b in zip(self.t, self.t[1:], strict=False)]


def _profiler(spec: Spec) -> torch.profiler.profile | None:
    """A CPU profiler that records the first step after the warm-up (the schedule is stepped at every mark)."""
    if not spec.profile:
        return None
    # both sides mark once right before training step 1 and at every step boundary after it, so profiler step 0
    # is the set-up before training and profiler step k is training step k: skip `warmup + 1`, record one
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                  schedule=torch.profiler.schedule(wait=spec.warmup + 1, warmup=0, active=1,
                                                                   repeat=1))


def _top_ops(prof: torch.profiler.profile | None, n: int = 25) -> list[dict]:
    if prof is None:
        return []
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:n]]


def run_comfy(variant: Variant, spec: Spec) -> dict:
    """ComfyUI's UNETLoader call on the file, then `TrainLoraNode.execute` as the node graph calls it."""
    import_comfy()
    import comfy.sd
    import comfy_extras.nodes_train as nt
    from safetensors.torch import load_file

    data = load_file(spec.data)
    t0 = time.perf_counter()
    mp = comfy.sd.load_diffusion_model(spec.model, model_options={})  # UNETLoader, weight_dtype "default"
    load_s = time.perf_counter() - t0
    loaded = read_status()
    # the node takes VAE-space latents and the sampler applies process_latent_in: hand it the model-space latent
    samples = mp.model.latent_format.process_out(data["latent"][None])
    positive = [[data["caption"][None], {}]]
    # ComfyUI 0.3.75's execute raises UnboundLocalError (multi_res) for a single LATENT input: the same latent goes
    # in twice (two equal images, one caption for both), which samples exactly the one item at batch size 1
    latents = [{"samples": samples}, {"samples": samples.clone()}]
    prof = _profiler(spec)
    marks = Marks(prof)
    fwd_bwd, sample = nt.TrainSampler.fwd_bwd, nt.TrainSampler.sample

    def timed_fwd_bwd(self, *a, **k):
        marks.mark()  # a step starts (noise and σ of the step were drawn just before)
        return fwd_bwd(self, *a, **k)

    def timed_sample(self, *a, **k):
        out = sample(self, *a, **k)
        marks.mark()  # the last step's optimizer step is done
        return out

    nt.TrainSampler.fwd_bwd, nt.TrainSampler.sample = timed_fwd_bwd, timed_sample
    reset_hwm()
    with PeakStatus(["RssAnon", "VmRSS"]) as peak, prof if prof is not None else _nothing():
        out = nt.TrainLoraNode.execute(
            model=[mp], latents=latents, positive=[positive], batch_size=[1], steps=[spec.steps],
            grad_accumulation_steps=[1], learning_rate=[LEARNING_RATE], rank=[RANK], optimizer=["AdamW"],
            loss_function=["MSE"], seed=[SEED], training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoRA"],
            gradient_checkpointing=[variant.gradient_checkpointing], existing_lora=["[None]"])
    lora_sd, loss_map = out.result[1], out.result[2]
    trained = sum(p.numel() for p in lora_sd.values())
    dtype = str(next(mp.model.diffusion_model.parameters()).dtype)
    return {"load_s": load_s, "loaded": loaded, "steps": marks.steps(), "losses": loss_map["loss"],
            "trained_params": trained, "trained_tensors": len(lora_sd), "weight_dtype": dtype,
            "peak_anon": peak.peak["RssAnon"], "top_ops": _top_ops(prof)}


def run_ours(variant: Variant, spec: Spec) -> dict:
    """`load_dit` of the same file (fp32 compute), then `train_lora` with rank 16, batch 1, σ shift-3."""
    add_repo_paths()
    from safetensors.torch import load_file

    from zimage_core import load_dit
    from zimage_core.train import TimestepSampling, TrainConfig, TrainItem, TrainTargets, train_lora

    data = load_file(spec.data)
    t0 = time.perf_counter()
    dit = load_dit(spec.model, "cpu", torch.float32)
    load_s = time.perf_counter() - t0
    loaded = read_status()
    lat = data["latent"]
    item = TrainItem(lat, data["caption"], "bench", (lat.shape[2] * 8, lat.shape[1] * 8), "bench")
    prof = _profiler(spec)
    marks = Marks(prof)
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = TrainConfig(steps=spec.steps, rank=RANK, targets=TrainTargets(variant.targets),
                          learning_rate=LEARNING_RATE, timestep_sampling=TimestepSampling.SHIFT, shift=3.0,
                          seed=SEED, output_dir=Path(out_dir), name="bench")
        reset_hwm()
        with PeakStatus(["RssAnon", "VmRSS"]) as peak, prof if prof is not None else _nothing():
            marks.mark()  # ours' first step includes building the LoRA and the optimizer (a warm-up step)
            result = train_lora(dit, [item], cfg, on_step=lambda *_: marks.mark())
    trained = sum(p.numel() for p in result.lora.parameters())
    return {"load_s": load_s, "loaded": loaded, "steps": marks.steps(), "losses": result.losses,
            "trained_params": trained, "trained_tensors": len(list(result.lora.parameters())),
            "weight_dtype": str(next(dit.parameters()).dtype), "peak_anon": peak.peak["RssAnon"],
            "top_ops": _top_ops(prof)}


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def reset_hwm() -> None:
    """VmHWM back to the current RSS (/proc/self/clear_refs 5): the next read is the training peak."""
    Path("/proc/self/clear_refs").write_text("5")


def child(name: str, spec_path: str, result_path: str) -> None:
    spec = Spec(**json.loads(Path(spec_path).read_text()))
    torch.set_num_threads(spec.threads)
    with open("/proc/self/oom_score_adj", "w") as f:  # if memory runs out, the child goes first
        f.write("1000")
    variant = VARIANTS[name]
    run = run_comfy if variant.side == "comfy" else run_ours
    res = run(variant, spec)
    res["train_hwm"] = read_status()["VmHWM"]  # peak RSS since the reset after the load
    # the whole child's peak: the clear_refs reset also resets ru_maxrss, so the load's peak is read before it
    res["peak_rss"] = max(res["loaded"]["VmHWM"], res["train_hwm"])
    res["threads"] = torch.get_num_threads()
    Path(result_path).write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------------- parent


def run_child(name: str, spec: Spec, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", name, str(spec_path), str(result_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not result_path.is_file():
            return {"failed": f"exit {proc.returncode}", "log_tail": proc.stdout[-3000:], "child_s": wall}
        res = json.loads(result_path.read_text())
    res["child_s"] = wall
    return res


def summarize(runs: list[dict], warmup: int, threads: int) -> dict:
    """Median per-step wall time over the timed steps of all runs (clean steps when ≥ 3 are clean)."""
    ok = [r for r in runs if "failed" not in r]
    if not ok:
        first = runs[0] if runs else {"failed": "no timed runs", "log_tail": ""}
        return {"failed": first["failed"], "log_tail": first["log_tail"]}
    timed = [s for r in ok for s in r["steps"][warmup:]]
    clean = [s["wall"] for s in timed if s["cpu"] >= 0.9 * threads * s["wall"]]
    walls = clean if len(clean) >= 3 else [s["wall"] for s in timed]
    return {"median_s": statistics.median(walls), "min_s": min(walls), "clean_steps": len(clean),
            "timed_steps": len(timed), "run_medians_s": [statistics.median(s["wall"] for s in r["steps"][warmup:])
                                                         for r in ok],
            "first_step_s": statistics.median(r["steps"][0]["wall"] for r in ok),
            "load_s": min(r["load_s"] for r in ok), "peak_rss": max(r["peak_rss"] for r in ok),
            "load_peak_rss": max(r["loaded"]["VmHWM"] for r in ok),
            "train_peak_rss": max(r["train_hwm"] for r in ok), "peak_anon": max(r["peak_anon"] for r in ok),
            "loaded_anon": statistics.median(r["loaded"]["RssAnon"] for r in ok),
            "trained_params": ok[0]["trained_params"], "trained_tensors": ok[0]["trained_tensors"],
            "weight_dtype": ok[0]["weight_dtype"], "failed_runs": len(runs) - len(ok)}


def paired(runs: dict[str, list[dict]], a: str, b: str, warmup: int) -> float | None:
    """Median over repeats of (run median of a) / (run median of b), each pair measured back to back."""
    ratios = [statistics.median(s["wall"] for s in ra["steps"][warmup:])
              / statistics.median(s["wall"] for s in rb["steps"][warmup:])
              for ra, rb in zip(runs[a], runs[b], strict=True) if "failed" not in ra and "failed" not in rb]
    return statistics.median(ratios) if ratios else None


def print_report(res: dict) -> None:
    m = res["model"]
    print(f"\nZ-Image DiT dim {m['dim']}, {m['n_layers']} + {m['n_refiner_layers']} + {m['n_refiner_layers']} blocks "
          f"({m['params'] / 1e6:.0f}M params, bf16 file, fp32 compute), {m['image_px']}x{m['image_px']} image = "
          f"{m['image_tokens']} image + {m['caption_tokens']} caption tokens, rank {RANK}, batch 1, "
          f"{res['threads']} threads; {res['warmup']} warm-up + {res['steps'] - res['warmup']} timed steps per run, "
          f"{res['repeats']} runs per variant, round-robin")
    rows = []
    for name, s in res["summary"].items():
        if "failed" in s:
            rows.append([name, "FAILED", s["failed"]] + [""] * 8)
            continue
        rows.append([name, f"{s['median_s']:.2f}", f"{s['min_s']:.2f}", f"{s['clean_steps']}/{s['timed_steps']}",
                     f"{s['first_step_s']:.1f}", f"{s['load_s']:.1f}", f"{s['trained_params'] / 1e6:.2f}M",
                     f"{s['peak_rss'] / GIB:.2f}", f"{s['load_peak_rss'] / GIB:.2f}",
                     f"{s['train_peak_rss'] / GIB:.2f}", f"{s['peak_anon'] / GIB:.2f}"])
    print(table(["variant", "median s/step", "min s", "clean", "1st step s", "load s", "trained",
                 "peak RSS GiB", "load VmHWM", "train VmHWM", "peak anon"], rows))
    print("\nours / ComfyUI (goal <= 0.8):")
    for k, v in res["ratios"].items():
        pair = "n/a" if v["paired"] is None else f"{v['paired']:.3f}"
        print(f"  {k}: step time ratio of medians {v['ratio']:.3f}, median of paired per-run ratios {pair}; "
              f"peak RSS {v['peak_rss']:.2f}, training VmHWM {v['train_peak_rss']:.2f}")
    for name, runs in res["runs"].items():
        for r in runs:
            if r.get("top_ops"):
                print(f"\nprofile {name} (one step, top ops by self CPU time):")
                print(table(["op", "self ms", "share", "calls"],
                            [[o["op"][:60], f"{o['self_ms']:.0f}", f"{o['share']:.1%}", o["calls"]]
                             for o in r["top_ops"][:15]]))
                break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="timed steps per run (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps per run, not timed")
    ap.add_argument("--repeats", type=int, default=2, help="runs (fresh subprocesses) per variant")
    ap.add_argument("--layers", type=int, default=1, help="main layers of the DiT (2 + 2 refiners always)")
    ap.add_argument("--size", type=int, default=256, help="training image side in pixels (latent = size/8)")
    ap.add_argument("--cap-len", type=int, default=32, help="caption tokens")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in each child")
    ap.add_argument("--profile", action="store_true", help="also profile one step of each variant (extra runs)")
    ap.add_argument("--dir", default=str(OUT_DIR / "train_models"), help="where the model and data files go")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per child run")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.size % 16:
        ap.error(f"--size must be a multiple of 16 (latent patches of 2), got {args.size}")
    model, data, model_info = write_inputs(args)
    spec = Spec(str(model), str(data), args.warmup + args.steps, args.warmup, args.threads, False)
    runs: dict[str, list[dict]] = {name: [] for name in args.variants}
    t0 = time.perf_counter()
    for rep in range(args.repeats):
        for name in args.variants:
            r = run_child(name, spec, args.timeout)
            runs[name].append(r)
            steps = [f"{s['wall']:.2f}" for s in r.get("steps", [])]
            print(f"run {rep + 1}/{args.repeats} {name}: " + (f"FAILED {r['failed']}\n{r['log_tail']}" if "failed" in r
                  else f"steps {' '.join(steps)} s, peak RSS {r['peak_rss'] / GIB:.2f} GiB"), flush=True)
    if args.profile:
        for name in args.variants:
            r = run_child(name, Spec(**{**asdict(spec), "steps": args.warmup + 2, "profile": True}), args.timeout)
            runs[name].append({**r, "profile_run": True})
    timed_runs = {k: [r for r in v if not r.get("profile_run")] for k, v in runs.items()}
    summary = {k: summarize(v, args.warmup, args.threads) for k, v in timed_runs.items()}
    ratios = {}
    for ours in (n for n in args.variants if VARIANTS[n].side == "ours"):
        for ref in (n for n in args.variants if VARIANTS[n].side == "comfy"):
            a, b = summary[ours], summary[ref]
            if "failed" in a or "failed" in b:
                continue
            ratios[f"{ours}/{ref}"] = {"ratio": a["median_s"] / b["median_s"],
                                       "paired": paired(timed_runs, ours, ref, args.warmup),
                                       "peak_rss": a["peak_rss"] / b["peak_rss"],
                                       "train_peak_rss": a["train_peak_rss"] / b["train_peak_rss"]}
    res = {"torch": torch.__version__, "cpus": os.cpu_count(), "threads": args.threads, "model": model_info,
           "model_file": str(model), "data_file": str(data), "rank": RANK, "learning_rate": LEARNING_RATE,
           "steps": spec.steps, "warmup": args.warmup, "repeats": args.repeats,
           "variants": {n: asdict(VARIANTS[n]) for n in args.variants}, "summary": summary, "ratios": ratios,
           "runs": runs, "total_s": time.perf_counter() - t0}
    print_report(res)
    print(f"\nwrote {write_json('train', res)}")


if __name__ == "__main__":
    main()
