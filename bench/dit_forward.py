"""CPU fp32 forward of a reduced Z-Image DiT: ours vs diffusers vs ComfyUI's NextDiT, same weights.

Run: .venv/bin/python bench/dit_forward.py [--rounds 21] [--warmup 2] [--profile-attempts 8]
Prints a table and writes bench/out/dit_forward.json; bench/README.md explains how to read it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from _common import OUT_DIR, add_repo_paths, import_comfy, table, write_json

Runner = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class BenchShape:
    """The reduced model and the input: 1024 image tokens (64×64 latent) + 64 caption tokens."""

    dim: int = 768
    n_layers: int = 6
    n_refiner_layers: int = 2
    n_heads: int = 6  # head_dim 128, RoPE axes (32, 48, 48) as in the real model
    cap_feat_dim: int = 2560  # the real text width (Qwen3-4B hidden)
    latent: int = 64  # latent H = W
    cap_len: int = 64
    batch: int = 1
    t_embed_dim: int = 1024  # diffusers/ours; ComfyUI's NextDiT uses min(dim, 1024) = 768

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_img(self) -> int:
        return (self.latent // 2) ** 2


# ---------------------------------------------------------------------------------------------- models


def build_models(s: BenchShape) -> dict[str, torch.nn.Module]:
    """diffusers (reference names), ours through `load_dit` from a ComfyUI-layout file, ComfyUI's NextDiT.

    Every weight is shared except the timestep MLP: ComfyUI builds it 256→768→256 where diffusers has
    256→1024→256, so NextDiT gets its own random one. `ours_comfy_t` is ours loaded from exactly
    NextDiT's weights (t_embed_dim 768 inferred from the file), used only to check ours against ComfyUI.
    """
    add_repo_paths()
    from safetensors.torch import save_file

    from zimage_core import load_dit
    from zimage_fixtures import comfy_state_dict, diffusers_dit

    dif = diffusers_dit(seed=0, dim=s.dim, n_layers=s.n_layers, n_refiner_layers=s.n_refiner_layers,
                        n_heads=s.n_heads, n_kv_heads=s.n_heads, cap_feat_dim=s.cap_feat_dim)
    sd = comfy_state_dict(dif.state_dict())  # fused qkv, renames, plus norm_final.weight
    sd_comfy_t = {**sd, **_random_t_embedder(s, seed=1)}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    models: dict[str, torch.nn.Module] = {"diffusers": dif}
    for name, weights in (("ours", sd), ("ours_comfy_t", sd_comfy_t)):
        path = OUT_DIR / f"dit_forward_{name}.safetensors"
        save_file(weights, path)
        models[name] = load_dit(path, "cpu", torch.float32)
        path.unlink()
    models["comfy"] = _build_nextdit(s, sd_comfy_t)
    return models


def _random_t_embedder(s: BenchShape, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = min(s.dim, 1024)
    shapes = {"t_embedder.mlp.0.weight": (hidden, 256), "t_embedder.mlp.0.bias": (hidden,),
              "t_embedder.mlp.2.weight": (256, hidden), "t_embedder.mlp.2.bias": (256,)}
    return {k: torch.randn(shp, generator=g) / shp[-1] ** 0.5 for k, shp in shapes.items()}


def _build_nextdit(s: BenchShape, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    import_comfy()
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT

    model = NextDiT(patch_size=2, in_channels=16, dim=s.dim, n_layers=s.n_layers,
                    n_refiner_layers=s.n_refiner_layers, n_heads=s.n_heads, n_kv_heads=s.n_heads,
                    multiple_of=256, ffn_dim_multiplier=8 / 3, norm_eps=1e-5, qk_norm=True,
                    cap_feat_dim=s.cap_feat_dim, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
                    rope_theta=256.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
                    operations=comfy.ops.disable_weight_init)
    model.load_state_dict(sd, strict=True)
    return model.eval().requires_grad_(False)


def make_runners(models: dict[str, torch.nn.Module], s: BenchShape) -> dict[str, Runner]:
    """One closure per model, each returning v in our convention (t = 1 − σ, v ≈ x0 − ε)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(s.batch, 16, s.latent, s.latent, generator=g)
    t = torch.rand(s.batch, generator=g)
    cap = torch.randn(s.batch, s.cap_len, s.cap_feat_dim, generator=g)
    dif, comfy = models["diffusers"], models["comfy"]
    return {
        "ours": lambda: models["ours"](x, t, cap),
        "diffusers": lambda: torch.stack(dif(list(x.unsqueeze(2)), t, list(cap), return_dict=False)[0]).squeeze(2),
        "comfy": lambda: -comfy(x, timesteps=1 - t, context=cap, num_tokens=s.cap_len),
        "ours_comfy_t": lambda: models["ours_comfy_t"](x, t, cap),
    }


def check_numerics(runners: dict[str, Runner]) -> dict[str, float]:
    """max|a − ref| / max|ref| for ours vs diffusers and (with NextDiT's t_embedder) ours vs ComfyUI."""
    with torch.inference_mode():
        out = {name: fn().float() for name, fn in runners.items()}

    def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
        return ((a - ref).abs().max() / ref.abs().max()).item()

    return {"ours_vs_diffusers": rel(out["ours"], out["diffusers"]),
            "ours_vs_comfy": rel(out["ours_comfy_t"], out["comfy"])}


# ---------------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Call:
    """One timed call: wall seconds and the process CPU seconds it used (all threads)."""

    wall: float
    cpu: float

    def clean(self, threads: int) -> bool:
        """Whether every thread had its core: this VM's host sometimes takes a vCPU away for seconds,
        and a 2-thread OpenMP op then runs several times slower. Such calls are kept but flagged."""
        return self.cpu >= 0.9 * threads * self.wall


def timed_call(fn: Callable[[], object]) -> Call:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    t1, c1 = time.perf_counter(), time.process_time()
    return Call(t1 - t0, c1 - c0)


@dataclass(frozen=True)
class Gemm:
    """One fp32 GEMM of the forward, x (m, k) @ Wᵀ with W stored (n, k) as a Linear stores it."""

    m: int
    k: int
    n: int

    @property
    def label(self) -> str:
        return f"[{self.m},{self.k}]x[{self.k},{self.n}]"

    def gflops(self, repeats: int = 3) -> float:
        a, w, out = torch.randn(self.m, self.k), torch.randn(self.n, self.k), torch.empty(self.m, self.n)
        best = min(timed_call(lambda: torch.mm(a, w.t(), out=out)).wall for _ in range(repeats + 1))
        return 2 * self.m * self.n * self.k / best / 1e9


def forward_gemms(s: BenchShape) -> list[Gemm]:
    tokens = s.n_img + s.cap_len
    return [Gemm(tokens, s.dim, 3 * s.dim), Gemm(tokens, s.dim, s.ffn_dim), Gemm(tokens, s.ffn_dim, s.dim),
            Gemm(tokens, s.dim, s.dim), Gemm(2048, 2048, 2048)]


def time_round_robin(runners: dict[str, Runner], gemms: list[Gemm], warmup: int,
                     rounds: int) -> tuple[dict[str, list[Call]], list[list[float]]]:
    """Warm each model up, then per round: one forward of each model in turn and one GEMM probe.

    Returns the calls per model and, per round, the GFLOP/s of each GEMM shape (best of 3, `out=`).
    """
    calls: dict[str, list[Call]] = {name: [] for name in runners}
    probes: list[list[float]] = []
    with torch.inference_mode():
        for fn in runners.values():
            for _ in range(warmup):
                fn()
        for _ in range(rounds):
            for name, fn in runners.items():
                calls[name].append(timed_call(fn))
            probes.append([g.gflops() for g in gemms])
    return calls, probes


def forward_flops(s: BenchShape) -> dict[str, float]:
    """Analytic FLOPs of one forward: 2·M·N·K per Linear over its tokens, 4·B·H·L²·Dh per attention."""
    b, d, f = s.batch, s.dim, s.ffn_dim

    def block(tokens: int, modulated: bool) -> float:
        linears = 2 * b * tokens * d * (3 * d + d + 3 * f)
        attention = 4 * b * s.n_heads * tokens**2 * s.head_dim
        return linears + attention + (2 * b * 256 * 4 * d if modulated else 0)

    n_img = math.ceil(s.n_img / 32) * 32
    n_cap = math.ceil(s.cap_len / 32) * 32
    parts = {
        "t_embedder": 2 * b * (256 * s.t_embed_dim + s.t_embed_dim * 256),
        "x_embedder": 2 * b * n_img * 64 * d,
        "cap_embedder": 2 * b * n_cap * s.cap_feat_dim * d,
        "noise_refiner": s.n_refiner_layers * block(n_img, True),
        "context_refiner": s.n_refiner_layers * block(n_cap, False),
        "layers": s.n_layers * block(n_img + n_cap, True),
        "final_layer": 2 * b * (256 * d + s.n_img * d * 64),
    }
    return {**parts, "total": sum(parts.values())}


# ---------------------------------------------------------------------------------------------- profile

_MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}


def profile_ops(fn: Runner, attempts: int, threads: int, top: int = 15) -> dict:
    """Self-CPU time per op of one forward: the top ops, the matmul / attention / other split, and the
    GFLOP/s of each GEMM and attention shape.

    Profiles single forwards until one is clean (see `Call.clean`, at most `attempts`; else the
    fastest), so that a forward slowed by the host taking a vCPU away does not skew the split.
    """
    from torch.profiler import ProfilerActivity, profile

    best = None
    with torch.inference_mode():
        fn()
        for _ in range(attempts):
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                call = timed_call(fn)
            if best is None or call.wall < best[0].wall:
                best = (call, prof)
            if call.clean(threads):
                break
    call, prof = best
    events = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0),
                    key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    shares = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for e in events:
        shares[_category(e.key)] += e.self_cpu_time_total / total
    rows = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in events[:top]]
    return {"wall_ms": call.wall * 1e3, "cpu_per_wall": call.cpu / call.wall, "clean": call.clean(threads),
            "shares": shares, "top_ops": rows, "by_shape": _by_shape(prof)}


def _by_shape(prof: object) -> list[dict]:
    """GFLOP/s of every matmul and attention call, grouped by input shapes, slowest total first."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        shapes = [s for s in e.input_shapes if s]
        if e.key in ("aten::mm", "aten::addmm") and len(shapes) >= 2:
            (m, k), n = shapes[-2], shapes[-1][1]
            flops = 2 * m * n * k
        elif "scaled_dot_product" in e.key and e.key.startswith("aten::_") and len(shapes) >= 3:
            (b, h, lq, d), lk = shapes[0], shapes[1][2]
            flops = 4 * b * h * lq * lk * d
        else:
            continue
        ms = e.self_cpu_time_total / 1e3
        rows.append({"op": e.key, "shapes": shapes[:3], "calls": e.count, "self_ms": ms,
                     "gflops": flops * e.count / (ms / 1e3) / 1e9 if ms else None})
    return sorted(rows, key=lambda r: -r["self_ms"])


def _category(op: str) -> str:
    if op in _MATMUL_OPS:
        return "matmul"
    if "attention" in op or "scaled_dot_product" in op:
        return "attention"
    return "other"


# ---------------------------------------------------------------------------------------------- report


def summarise(calls: dict[str, list[Call]], flops: float, peak: float, threads: int) -> dict[str, dict]:
    """Median wall time per model over the clean calls (all calls if fewer than 3 are clean)."""
    out = {}
    for name, cs in calls.items():
        clean = [c.wall for c in cs if c.clean(threads)]
        walls = clean if len(clean) >= 3 else [c.wall for c in cs]
        med = statistics.median(walls)
        out[name] = {"median_s": med, "min_s": min(walls), "clean_calls": len(clean), "calls": len(cs),
                     "median_all_calls_s": statistics.median(c.wall for c in cs),
                     "runs": [{"wall_s": c.wall, "cpu_per_wall": c.cpu / c.wall} for c in cs],
                     "gflops": flops / med / 1e9, "fraction_of_peak": flops / med / 1e9 / peak}
    return out


def paired_ratio(calls: dict[str, list[Call]], a: str, b: str, threads: int) -> float | None:
    """Median over rounds where both calls were clean of wall(a) / wall(b): robust to slow drift."""
    ratios = [ca.wall / cb.wall for ca, cb in zip(calls[a], calls[b], strict=True)
              if ca.clean(threads) and cb.clean(threads)]
    return statistics.median(ratios) if ratios else None


def print_report(res: dict) -> None:
    print("\nnumerics (max|a-ref|/max|ref|): " + ", ".join(f"{k} {v:.2e}" for k, v in res["numerics"].items()))
    print(f"fp32 GEMM peak: {res['peak_gflops']:.1f} GFLOP/s ({res['threads']} threads); "
          f"forward: {res['flops']['total'] / 1e9:.1f} GFLOP; ComfyUI attention: {res['comfy_attention']}\n")
    rows = [[n, f"{r['median_s'] * 1e3:.0f}", f"{r['min_s'] * 1e3:.0f}", f"{r['clean_calls']}/{r['calls']}",
             f"{r['median_all_calls_s'] * 1e3:.0f}", f"{r['gflops']:.1f}", f"{r['fraction_of_peak']:.3f}"]
            for n, r in res["timing"].items()]
    print(table(["model", "median ms", "min ms", "clean", "median all ms", "GFLOP/s", "of peak"], rows))
    print("\nratio of medians: " + ", ".join(f"{k} {v:.3f}" for k, v in res["ratios"].items())
          + "; median of paired per-round ratios: "
          + ", ".join(f"{k} {v:.3f}" for k, v in res["paired_ratios"].items() if v is not None) + "  (goal <= 1.0)")
    for name, prof in res["profile"].items():
        print(f"profile {name} ({prof['wall_ms']:.0f} ms, {'clean' if prof['clean'] else 'NOT clean'}): "
              + ", ".join(f"{k} {v:.1%}" for k, v in prof["shares"].items()))
    print("\ntop ops of ours by self CPU time (one forward):")
    top = res["profile"]["ours"]["top_ops"]
    rows = [[r["op"], r["calls"], f"{r['self_ms']:.1f}", f"{r['share']:.1%}"] for r in top]
    print(table(["op", "calls", "self ms", "share"], rows))
    print("\nGEMM and attention calls of ours by input shape (self CPU time):")
    rows = [[r["op"], " ".join(str(x) for x in r["shapes"]), r["calls"], f"{r['self_ms']:.1f}",
             f"{r['gflops']:.0f}" if r["gflops"] else "-"] for r in res["profile"]["ours"]["by_shape"]]
    print(table(["op", "input shapes", "calls", "self ms", "GFLOP/s"], rows))


def run(args: argparse.Namespace) -> dict:
    s = BenchShape()
    threads = torch.get_num_threads()
    runners = make_runners(build_models(s), s)
    numerics = check_numerics(runners)
    timed = {k: v for k, v in runners.items() if k != "ours_comfy_t"}
    gemms = forward_gemms(s)
    calls, probes = time_round_robin(timed, gemms, args.warmup, args.rounds)
    peak = max(max(p) for p in probes)
    flops = forward_flops(s)
    timing = summarise(calls, flops["total"], peak, threads)
    return {"shape": asdict(s), "threads": threads, "torch": torch.__version__,
            "comfy_attention": _comfy_attention_name(), "numerics": numerics, "flops": flops,
            "peak_gflops": peak, "gemm_best_gflops": {g.label: max(p[i] for p in probes) for i, g in enumerate(gemms)},
            "gemm_probes_gflops": probes, "timing": timing,
            "ratios": {f"ours/{n}": timing["ours"]["median_s"] / timing[n]["median_s"] for n in ("diffusers", "comfy")},
            "paired_ratios": {f"ours/{n}": paired_ratio(calls, "ours", n, threads) for n in ("diffusers", "comfy")},
            "profile": {n: profile_ops(fn, args.profile_attempts, threads) for n, fn in timed.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile-attempts", type=int, default=8)
    res = run(ap.parse_args())
    print_report(res)
    print(f"\nwrote {write_json('dit_forward', res)}")


def _comfy_attention_name() -> str:
    import comfy.ldm.lumina.model as lumina

    return lumina.optimized_attention_masked.__name__


if __name__ == "__main__":
    main()
