"""LoRA costs: runtime-mode forward overhead against merged (reduced DiT, fp32), and merge + un-merge of a rank-64
LoRA on the full 6B bf16 DiT (time, peak memory, whether un-merge restores every bit).

Run: .venv/bin/python bench/lora.py [--small] [--rounds 15] [--skip-forward] [--skip-merge] [--cleanup]
Prints two tables and writes bench/out/lora.json (lora_small.json with --small); bench/README.md explains them.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from _common import OUT_DIR, add_repo_paths, read_status, table, write_json
from dit_forward import BenchShape, paired_ratio, timed_call
from synth_ckpt import StreamingSafetensorsWriter, bit_sum, synthetic

add_repo_paths()
from zimage_core import load_dit  # noqa: E402
from zimage_core.config import Z_IMAGE_6B, DiTConfig  # noqa: E402
from zimage_core.dit import ZImageDiT  # noqa: E402
from zimage_core.lora import ApplyMode, LoraFile, apply_loras, lora_from_state_dict  # noqa: E402

GIB = 2**30
# musubi's default targets, in diffusers names (split q/k/v, as musubi and AI Toolkit write them)
MODULES = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
MODES = ("base", "merged", "runtime")


def config_of(s: BenchShape) -> DiTConfig:
    return DiTConfig(dim=s.dim, n_layers=s.n_layers, n_refiner_layers=s.n_refiner_layers, n_heads=s.n_heads,
                     cap_feat_dim=s.cap_feat_dim, ffn_dim=s.ffn_dim, t_embed_dim=s.t_embed_dim,
                     adaln_dim=min(s.dim, 256))


def make_lora(cfg: DiTConfig, rank: int, blocks: list[str], dtype: torch.dtype, seed: int = 0) -> LoraFile:
    """A PEFT-layout LoRA (`diffusion_model.<block>.attention.to_q.lora_A/B`) on MODULES of `blocks`, ΔW ~ 0.1·W."""
    g = torch.Generator().manual_seed(seed)
    hidden = {"feed_forward.w1": cfg.ffn_dim, "feed_forward.w3": cfg.ffn_dim}
    sd = {}
    for block in blocks:
        for m in MODULES:
            out_f, in_f = hidden.get(m, cfg.dim), cfg.ffn_dim if m == "feed_forward.w2" else cfg.dim
            key = f"diffusion_model.{block}.{m}"
            sd[f"{key}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(dtype)
            sd[f"{key}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.1 * 0.02 / rank**0.5).to(dtype)
    return lora_from_state_dict(sd, f"rank{rank}")


def all_blocks(cfg: DiTConfig) -> list[str]:
    return ([f"layers.{i}" for i in range(cfg.n_layers)] + [f"noise_refiner.{i}" for i in range(cfg.n_refiner_layers)]
            + [f"context_refiner.{i}" for i in range(cfg.n_refiner_layers)])


# ------------------------------------------------------------------------------------------- (a) forward overhead


def forward_overhead(args: argparse.Namespace) -> dict:
    """Three copies of one random fp32 DiT: no LoRA, the LoRA merged, the LoRA in runtime mode; forwards
    interleaved round-robin as in dit_forward.py, medians over clean calls and of per-round paired ratios."""
    s = BenchShape(latent=16 if args.small else 64)
    cfg, threads = config_of(s), torch.get_num_threads()
    torch.manual_seed(0)
    models = {name: ZImageDiT(cfg).eval().requires_grad_(False) for name in MODES}
    for m in models.values():
        m.load_state_dict(models["base"].state_dict())
    lora = make_lora(cfg, args.rank, all_blocks(cfg), torch.float32)
    apply_loras(models["merged"], [(lora, 1.0)], ApplyMode.MERGED)
    apply_loras(models["runtime"], [(lora, 1.0)], ApplyMode.RUNTIME)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(s.batch, 16, s.latent, s.latent, generator=g)
    t, cap = torch.rand(s.batch, generator=g), torch.randn(s.batch, s.cap_len, s.cap_feat_dim, generator=g)
    runners = {name: (lambda m=m: m(x, t, cap)) for name, m in models.items()}
    with torch.inference_mode():
        out = {name: fn() for name, fn in runners.items()}
        for fn in runners.values():
            for _ in range(args.warmup):
                fn()
        calls: dict[str, list] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, fn in runners.items():
                calls[name].append(timed_call(fn))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).abs().max() / b.abs().max()).item()

    timing = {}
    for name, cs in calls.items():
        clean = [c.wall for c in cs if c.clean(threads)]
        walls = clean if len(clean) >= 3 else [c.wall for c in cs]
        timing[name] = {"median_s": statistics.median(walls), "min_s": min(walls), "clean_calls": len(clean),
                        "calls": len(cs), "runs_s": [c.wall for c in cs]}
    return {"shape": asdict(s), "rank": args.rank, "threads": threads, "blocks": len(all_blocks(cfg)),
            "modules": len(lora.patches), "timing": timing,
            "runtime_vs_merged_rel_err": rel(out["runtime"], out["merged"]),
            "lora_moves_output_rel": rel(out["merged"], out["base"]),
            "ratio_runtime_merged": timing["runtime"]["median_s"] / timing["merged"]["median_s"],
            "paired_runtime_merged": paired_ratio(calls, "runtime", "merged", threads),
            "paired_merged_base": paired_ratio(calls, "merged", "base", threads),
            "lora_flops_share": _lora_flop_share(cfg, args.rank),
            "lora_flops_share_6b": _lora_flop_share(Z_IMAGE_6B, args.rank)}


def _lora_flop_share(cfg: DiTConfig, rank: int) -> float:
    """Extra GEMM FLOPs of the runtime path, r·(in+out) per in·out of each adapted Linear (attention excluded)."""
    shapes = [(cfg.dim, cfg.dim)] * 4 + [(cfg.dim, cfg.ffn_dim)] * 3
    return sum(rank * (i + o) for i, o in shapes) / sum(i * o for i, o in shapes)


# --------------------------------------------------------------------------------------------- (b) merge on 6B


def write_model(path: Path, cfg: DiTConfig) -> None:
    """A bf16 ComfyUI-layout file of `cfg`'s DiT with synth_ckpt's N(0, 0.02) values (one tensor in memory)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ZImageDiT(cfg).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    writer = StreamingSafetensorsWriter(tmp, list(shapes.items()))
    for key, shape in shapes.items():
        writer.write(key, synthetic(key, shape))
    writer.close()
    tmp.rename(path)


class AnonPeak:
    """Samples RssAnon every 20 ms in a thread; `peak` is the largest value seen."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, read_status()["RssAnon"])
            time.sleep(0.02)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def merge_roundtrip(args: argparse.Namespace) -> dict:
    """Load the bf16 model from its file (mmap, as `load_dit` does for users), merge a rank-64 LoRA on MODULES of
    the main layers (musubi's default targets), un-merge; time both, sample memory, compare every bit."""
    cfg = config_of(BenchShape()) if args.small else Z_IMAGE_6B
    path = Path(args.dir) / ("dit_small.safetensors" if args.small else "dit_6b.safetensors")
    avail = _mem_available()
    need = 4 if args.small else 16
    if avail < need * GIB:
        return {"skipped": f"only {avail / GIB:.1f} GiB available, {need} GiB needed"}
    t0 = time.perf_counter()
    if not path.is_file():
        print(f"writing {path} ...", flush=True)
        write_model(path, cfg)
    write_s = time.perf_counter() - t0
    dit = load_dit(path, "cpu", torch.bfloat16)
    lora = make_lora(cfg, args.merge_rank, [f"layers.{i}" for i in range(cfg.n_layers)], torch.bfloat16, seed=1)
    targets = sorted({f"{p.target.module}.weight" for p in lora.patches})
    sums = {k: bit_sum(dit.get_parameter(k)) for k in targets}
    status0 = read_status()
    with AnonPeak() as peak:
        t1 = time.perf_counter()
        applied = apply_loras(dit, [(lora, 1.0)], ApplyMode.MERGED)
        merge_s = time.perf_counter() - t1
        status_merged = read_status()
        changed = sum(bit_sum(dit.get_parameter(k)) != sums[k] for k in targets)
        t2 = time.perf_counter()
        applied.remove()
        gc.collect()
        unmerge_s = time.perf_counter() - t2
    restored = sum(bit_sum(dit.get_parameter(k)) == sums[k] for k in targets)
    status1 = read_status()
    target_bytes = sum(dit.get_parameter(k).nbytes for k in targets)
    weight_bytes = sum(p.nbytes for p in dit.parameters())
    result = {"config": cfg.to_dict(), "rank": args.merge_rank, "file": str(path), "write_s": write_s,
              "params": sum(p.numel() for p in dit.parameters()), "weight_bytes": weight_bytes,
              "targets": len(targets), "target_bytes": target_bytes, "merge_s": merge_s, "unmerge_s": unmerge_s,
              "changed_by_merge": changed, "restored_bit_exact": restored,
              "anon_before": status0["RssAnon"], "anon_merged": status_merged["RssAnon"],
              "anon_peak": peak.peak, "anon_after_unmerge": status1["RssAnon"], "vmhwm": status1["VmHWM"],
              "rss_merged": status_merged["VmRSS"], "mem_available_before": avail}
    del applied, dit
    if args.cleanup:
        path.unlink()
    return result


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


# ---------------------------------------------------------------------------------------------- report


def print_report(res: dict) -> None:
    if fwd := res.get("forward"):
        s = fwd["shape"]
        print(f"\n(a) forward, fp32, dim {s['dim']}, {s['n_layers']}+{s['n_refiner_layers']}+{s['n_refiner_layers']} "
              f"blocks, {s['latent']}x{s['latent']} latent, rank {fwd['rank']} on {fwd['modules']} modules; "
              f"runtime vs merged output {fwd['runtime_vs_merged_rel_err']:.1e} (the LoRA moves it "
              f"{fwd['lora_moves_output_rel']:.1e})")
        rows = [[n, f"{r['median_s'] * 1e3:.0f}", f"{r['min_s'] * 1e3:.0f}", f"{r['clean_calls']}/{r['calls']}"]
                for n, r in fwd["timing"].items()]
        print(table(["mode", "median ms", "min ms", "clean"], rows))
        paired = fwd["paired_runtime_merged"]
        print(f"runtime/merged: ratio of medians {fwd['ratio_runtime_merged']:.3f}, median of paired per-round "
              f"ratios {'n/a (no round clean)' if paired is None else f'{paired:.3f}'} (goal <= 1.10); the LoRA adds "
              f"{fwd['lora_flops_share']:.1%} to the adapted Linears' FLOPs here, "
              f"{fwd['lora_flops_share_6b']:.1%} at the 6B size")
    if mrg := res.get("merge"):
        if "skipped" in mrg:
            print(f"\n(b) merge: skipped, {mrg['skipped']}")
            return
        print(f"\n(b) merge + un-merge, bf16, {mrg['params'] / 1e9:.2f} B params "
              f"({mrg['weight_bytes'] / GIB:.2f} GiB), "
              f"rank {mrg['rank']} on {mrg['targets']} weights ({mrg['target_bytes'] / GIB:.2f} GiB)")
        rows = [["merge", f"{mrg['merge_s']:.1f}", f"{mrg['anon_merged'] / GIB:.2f}",
                 f"{mrg['changed_by_merge']}/{mrg['targets']} changed"],
                ["un-merge", f"{mrg['unmerge_s']:.2f}", f"{mrg['anon_after_unmerge'] / GIB:.2f}",
                 f"{mrg['restored_bit_exact']}/{mrg['targets']} bit-exact"]]
        print(table(["step", "s", "anon GiB after", "weights"], rows))
        print(f"anon before {mrg['anon_before'] / GIB:.2f} GiB, peak anon {mrg['anon_peak'] / GIB:.2f} GiB, "
              f"VmHWM {mrg['vmhwm'] / GIB:.2f} GiB (with mapped file pages)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="smoke run (<1 min): 16x16 latent, 3 rounds, reduced model "
                    "for the merge")
    ap.add_argument("--rounds", type=int, default=None, help="forward rounds (default 15, --small 5)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32, help="runtime-overhead LoRA rank")
    ap.add_argument("--merge-rank", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--dir", default=str(OUT_DIR / "lora_models"), help="where the bf16 model file is written")
    ap.add_argument("--cleanup", action="store_true", help="delete the model file at the end")
    args = ap.parse_args()
    args.rounds = args.rounds or (3 if args.small else 15)
    args.warmup = 1 if args.small else args.warmup
    if args.threads:
        torch.set_num_threads(args.threads)
    with open("/proc/self/oom_score_adj", "w") as f:  # if memory runs out, this process goes first
        f.write("1000")
    res = {"torch": torch.__version__, "small": args.small, "cpus": os.cpu_count()}
    if not args.skip_forward:
        res["forward"] = forward_overhead(args)
    if not args.skip_merge:
        res["merge"] = merge_roundtrip(args)
    print_report(res)
    print(f"\nwrote {write_json('lora_small' if args.small else 'lora', res)}")


if __name__ == "__main__":
    main()
