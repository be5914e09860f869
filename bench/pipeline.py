"""End-to-end text-to-image, all three models: ours (`zimage_core.pipeline.generate`) against diffusers' ZImagePipeline.

Run: .venv/bin/python bench/pipeline.py [--dir bench/out/pipeline_root] [--regen] [--cleanup] [--size 256]
                                        [--repeats 3] [--only NAME ...]

One synthetic model root in the official diffusers layout (model_index.json, scheduler/, transformer/,
text_encoder/, tokenizer/, vae/) is written once and reused: real widths, few layers (DIT_LAYERS,
TE_LAYERS), the real Flux VAE and the real Qwen vocabulary, random bf16 weights. Both implementations
load the same files. Each runs in a fresh subprocess (its own peak RSS): load the three models, one
warm-up generation, then `--repeats` timed generations of PROMPT, Turbo preset (8 steps, guidance 0),
from the same initial noise. Writes bench/out/pipeline.json; bench/README.md explains the columns.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import OUT_DIR, REPO, add_repo_paths, disk_read_kib, read_status, table, write_json
from synth_ckpt import TURBO_CONFIG, StreamingSafetensorsWriter

# ---------------------------------------------------------------------------------------------- the model root

FORMAT_VERSION = 1
MARKER = "bench_root.json"  # written last: a folder without a current one is regenerated
BPE_FROM = REPO / ".host" / "ComfyUI" / "comfy" / "text_encoders" / "qwen25_tokenizer"
VAE_KEYS = REPO / "tests" / "fixtures" / "keys" / "keys_vae_flux_diffusers.txt"  # a copy of shared/docs/keys

# Real widths, few blocks. The full model has 30 main + 2 noise-refiner + 2 context-refiner DiT blocks and
# 36 text-encoder layers; here 3 + 1 + 1 (5 of 34 blocks, 15 %) and 5 of 36 layers (14 %), so the TE / DiT
# compute split is close to the real one. diffusers runs all TE layers (hidden_states[-2] with
# output_hidden_states); ours drops the last one, which saves 1/36 at full size but 1/5 here: see
# `project_full` for the figures rescaled to the full depth.
DIT_LAYERS, DIT_REFINERS = 3, 1
TE_LAYERS = 5
FULL_DIT_LAYERS, FULL_DIT_REFINERS, FULL_TE_LAYERS = 30, 2, 36
DIT_CONFIG = {**TURBO_CONFIG, "n_layers": DIT_LAYERS, "n_refiner_layers": DIT_REFINERS}
# text_encoder/config.json of the real repo (ZIMAGE_SPEC §2a), with fewer layers.
TE_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
    "initializer_range": 0.02, "intermediate_size": 9728, "max_position_embeddings": 40960, "max_window_layers": 36,
    "num_attention_heads": 32, "num_hidden_layers": TE_LAYERS, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
# vae/config.json of the real repo (ZIMAGE_SPEC §2a): the Flux VAE.
VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
    "force_upcast": True, "latents_mean": None, "latents_std": None,
}
MODEL_INDEX = {
    "_class_name": "ZImagePipeline", "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"], "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1",
                    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
N_SHARDS = 3  # transformer/ and text_encoder/, as the real repo

PROMPT = ("A weathered red fishing boat rests on a pebble beach at dawn, nets piled on its deck, gulls circling "
          "above a calm silver sea, soft pink clouds on the horizon, shot on a 35mm lens, gentle film grain.")
SEED = 42
STEPS = 8  # Turbo preset: 8 DiT forwards, guidance 0, shift 3


def _meta_shapes(build: Callable[[], torch.nn.Module], prefix: str = "") -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build()
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}


def dit_shapes() -> dict[str, tuple[int, ...]]:
    from diffusers import ZImageTransformer2DModel

    return _meta_shapes(lambda: ZImageTransformer2DModel(**{k: v for k, v in DIT_CONFIG.items()
                                                            if not k.startswith("_")}))


def te_shapes() -> dict[str, tuple[int, ...]]:
    """HF `model.` names as in the real text_encoder/ shards (no lm_head: the embeddings are tied)."""
    from transformers import Qwen3Config, Qwen3Model

    cfg = Qwen3Config(**{k: v for k, v in TE_CONFIG.items() if k not in ("architectures", "model_type",
                                                                       "torch_dtype")})
    return _meta_shapes(lambda: Qwen3Model(cfg), prefix="model.")


def vae_shapes() -> dict[str, tuple[int, ...]]:
    """diffusers AutoencoderKL names, checked against the key manifest of the real repo's vae/ file."""
    from diffusers import AutoencoderKL

    shapes = _meta_shapes(lambda: AutoencoderKL(**{k: v for k, v in VAE_CONFIG.items() if not k.startswith("_")}))
    manifest = {}
    if VAE_KEYS.is_file():
        for line in VAE_KEYS.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, shape = line.split("\t")
                manifest[key] = tuple(json.loads(shape))
        if manifest != shapes:
            raise RuntimeError(f"diffusers' AutoencoderKL does not match {VAE_KEYS}: "
                               f"{sorted(set(manifest) ^ set(shapes))[:5]}")
    return shapes


def synthetic(key: str, shape: tuple[int, ...], gain: float) -> torch.Tensor:
    """Init-like random bf16, seeded by the key: matrices N(0, gain²/fan_in), norm scales 1 ± 0.05, biases and
    embeddings small. Activations stay O(1) through every block, so bf16 stays finite and the image is not flat."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    t = torch.empty(shape, dtype=torch.bfloat16)
    if "pad_token" in key:
        return t.normal_(0.0, 1.0, generator=g)
    if "embed_tokens" in key:
        return t.normal_(0.0, 0.05, generator=g)
    if len(shape) == 1:
        return t.normal_(1.0, 0.05, generator=g) if key.endswith("weight") else t.normal_(0.0, 0.02, generator=g)
    fan_in = torch.Size(shape[1:]).numel()
    return t.normal_(0.0, gain / fan_in**0.5, generator=g)


# Per-component gain of the matrices. The VAE decoder adds ~20 residual branches: a smaller gain keeps its
# output pixels mostly inside [-1, 1], so that the image comparison is not dominated by clamping.
GAINS = {"transformer": 1.0, "text_encoder": 1.0, "vae": 0.35}


def write_component(folder: Path, shapes: dict[str, tuple[int, ...]], gain: float, stem: str, n_shards: int) -> int:
    """Write `shapes` (sorted keys) as `n_shards` shards + index (or one file); returns the bytes of weights."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(shapes)
    nbytes = {k: torch.Size(shapes[k]).numel() * 2 for k in keys}
    total = sum(nbytes.values())
    groups: list[list[str]] = [[]]
    acc = 0
    for k in keys:
        if acc >= total / n_shards * len(groups) and len(groups) < n_shards:
            groups.append([])
        groups[-1].append(k)
        acc += nbytes[k]
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"{stem}.safetensors" if n_shards == 1 else f"{stem}-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        writer = StreamingSafetensorsWriter(folder / name, [(k, shapes[k]) for k in group])
        for k in group:
            writer.write(k, synthetic(k, shapes[k], gain))
            weight_map[k] = name
        writer.close()
    if n_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def write_root(root: Path) -> dict:
    add_repo_paths()
    from te_fixtures import write_qwen3_style_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    sizes = {
        "transformer": write_component(root / "transformer", dit_shapes(), GAINS["transformer"],
                                       "diffusion_pytorch_model", N_SHARDS),
        "text_encoder": write_component(root / "text_encoder", te_shapes(), GAINS["text_encoder"], "model", N_SHARDS),
        "vae": write_component(root / "vae", vae_shapes(), GAINS["vae"], "diffusion_pytorch_model", 1),
    }
    (root / "transformer" / "config.json").write_text(json.dumps(DIT_CONFIG, indent=2))
    (root / "text_encoder" / "config.json").write_text(json.dumps(TE_CONFIG, indent=2))
    (root / "vae" / "config.json").write_text(json.dumps(VAE_CONFIG, indent=2))
    write_qwen3_style_tokenizer(root / "tokenizer", BPE_FROM)
    return {"weight_bytes": sizes, "weights_dtype": "bf16 (all three components, the VAE too)"}


def _root_spec() -> dict:
    return {"version": FORMAT_VERSION, "dit": DIT_CONFIG, "te": TE_CONFIG, "vae": VAE_CONFIG, "gains": GAINS}


def ensure_root(root: Path, regen: bool) -> dict:
    marker = root / MARKER
    if not regen and marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("spec") == json.loads(json.dumps(_root_spec())):
            print(f"reusing {root} (--regen to rewrite)")
            return info
    shutil.rmtree(root, ignore_errors=True)
    print(f"writing the synthetic model root to {root} ...", flush=True)
    t0 = time.perf_counter()
    info = {"spec": _root_spec(), **write_root(root)}
    info["write_s"] = time.perf_counter() - t0
    marker.write_text(json.dumps(info, indent=2))
    gb = sum(info["weight_bytes"].values()) / 1e9
    print(f"  {gb:.2f} GB written in {info['write_s']:.0f} s")
    return info


def root_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.safetensors"))


# ---------------------------------------------------------------------------------------------- implementations


class Timers:
    """Wall time per pipeline stage, summed over the calls of one generation (`current` is reset per generation)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.info: dict[str, object] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - t0
        return timed


@dataclass(frozen=True)
class Impl:
    name: str
    call: str  # what is timed, for the report
    # prepare(root, size, timers) does the imports and returns (load, instrument, generate):
    # load() -> models; instrument(models) wraps the stages; generate(models) -> (1, 3, H, W) float32 in [0, 1]
    prepare: Callable


def _preimport_transformers() -> None:
    """The transformers classes both implementations use (the child times the load call, not imports)."""
    from transformers import AutoTokenizer, Qwen2Tokenizer, Qwen3Config, Qwen3Model  # noqa: F401
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding  # noqa: F401


def _keep_pages(model: torch.nn.Module) -> bool:
    """The diagnostic stand-in for `release_mapped_pages`: every weight page stays mapped."""
    return False


def _ours(vae_dtype: torch.dtype, release: bool = True) -> Callable:
    def prepare(root: Path, size: int, timers: Timers):
        add_repo_paths()
        import zimage_core.pipeline as zp
        from zimage_core import PRESETS, Preset, load_dit
        from zimage_core.text_encoder import load_text_encoder, tokenize_prompt
        from zimage_core.vae import load_vae
        _preimport_transformers()  # zimage_core imports these lazily: keep the import out of the load time

        def load():
            dit = load_dit(root, "cpu", torch.bfloat16)
            te = load_text_encoder(root, "cpu", torch.bfloat16, tokenizer=root / "tokenizer")
            te.cache_size = 0  # every generation runs the encoder, as diffusers' does (the cache would skip it)
            vae = load_vae(root / "vae", "cpu", vae_dtype)
            timers.info["caption_tokens"] = len(tokenize_prompt(te.tokenizer, PROMPT))
            timers.info["te_layers_run"] = len(te.model.layers)
            return dit, te, vae

        def instrument(models) -> None:
            _, te, vae = models
            te.encode = timers.wrap("encode", te.encode)
            zp.sample = timers.wrap("denoise", zp.sample)
            vae.decode = timers.wrap("decode", vae.decode)
            zp.release_mapped_pages = timers.wrap("release pages", zp.release_mapped_pages if release else _keep_pages)

        def generate(models) -> torch.Tensor:
            dit, te, vae = models
            return zp.generate(dit, te, vae, PROMPT, zp.ImageSize(size, size), SEED, PRESETS[Preset.TURBO])

        return load, instrument, generate
    return prepare


def _diffusers(vae_dtype: torch.dtype | None = None) -> Callable:
    def prepare(root: Path, size: int, timers: Timers):
        return _diffusers_prepare(root, size, timers, vae_dtype)
    return prepare


def _diffusers_prepare(root: Path, size: int, timers: Timers, vae_dtype: torch.dtype | None):
    add_repo_paths()
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    from zimage_core.sampling import make_noise

    _preimport_transformers()  # diffusers' classes are lazy modules too: import them all before the timed load
    del AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

    def load():
        pipe = ZImagePipeline.from_pretrained(root, torch_dtype=torch.bfloat16)
        if vae_dtype is not None:
            pipe.vae.to(vae_dtype)  # the official code's setting: the VAE in fp32
        pipe.set_progress_bar_config(disable=True)
        timers.info["te_layers_run"] = len(pipe.text_encoder.layers)
        return pipe

    def instrument(pipe) -> None:
        te_forward = pipe.text_encoder.forward

        def forward(*args, **kwargs):  # what the encoder really runs on: padded ids and the mask
            timers.info["te_input_tokens"] = int(kwargs["input_ids"].shape[1])
            timers.info["caption_tokens"] = int(kwargs["attention_mask"].sum())
            return te_forward(*args, **kwargs)

        pipe.text_encoder.forward = forward
        pipe.encode_prompt = timers.wrap("encode", pipe.encode_prompt)
        pipe.transformer.forward = timers.wrap("denoise", pipe.transformer.forward)
        pipe.vae.decode = timers.wrap("decode", pipe.vae.decode)

    def generate(pipe) -> torch.Tensor:
        noise = make_noise(SEED, (1, 16, size // 8, size // 8))
        out = pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=STEPS, guidance_scale=0.0,
                   latents=noise, output_type="pt")
        return out.images.float()

    return load, instrument, generate


IMPLS = (
    Impl("diffusers", "ZImagePipeline.from_pretrained(root, torch_dtype=bf16); pipe(prompt, latents=make_noise(seed))",
         _diffusers()),
    Impl("diffusers_vae_fp32", "the same with pipe.vae.to(float32), as the official code runs the VAE",
         _diffusers(torch.float32)),
    Impl("ours", "load_dit / load_text_encoder bf16, load_vae fp32 (default); zimage_core.pipeline.generate",
         _ours(torch.float32)),
    Impl("ours_vae_bf16", "the same with load_vae(..., dtype=bf16)", _ours(torch.bfloat16)),
    # Diagnostic, not a goal figure: `ours` with release_mapped_pages made a no-op, to show what handing the
    # weight pages back between stages costs in time and saves in peak RSS.
    Impl("ours_keep_pages", "ours with zimage_core.pipeline.release_mapped_pages replaced by a no-op",
         _ours(torch.float32, release=False)),
)


# ---------------------------------------------------------------------------------------------- child

def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (/proc/self/clear_refs 5), so the next read is the peak since now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler(threading.Thread):
    """Peak RssAnon / RssFile / VmRSS, sampled every 20 ms; `take()` returns the peaks so far and restarts."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.lock = threading.Lock()
        self.peak = dict.fromkeys(("VmRSS", "RssAnon", "RssFile"), 0)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            st = read_status()
            with self.lock:
                for k in self.peak:
                    self.peak[k] = max(self.peak[k], st[k])

    def take(self) -> dict[str, int]:
        with self.lock:
            out, self.peak = self.peak, dict.fromkeys(self.peak, 0)
        return out


def out_name(size: int) -> str:
    """bench/out/<name>.json and the images: `pipeline` at the default 256², `pipeline_<size>` otherwise."""
    return "pipeline" if size == 256 else f"pipeline_{size}"


def child_main(name: str, root: Path, size: int, repeats: int) -> None:
    """Run one implementation in this (fresh) process and print one `RESULT {json}` line."""
    Path("/proc/self/oom_score_adj").write_text("1000")  # if memory runs out, the kernel kills this child
    torch.set_num_threads(os.cpu_count() or 1)
    impl = next(x for x in IMPLS if x.name == name)
    timers = Timers()
    load, instrument, generate = impl.prepare(root, size, timers)
    res: dict = {"threads": torch.get_num_threads(), "after_import": read_status()}
    sampler = RssSampler()
    sampler.start()
    t0, kib0 = time.perf_counter(), disk_read_kib()
    models = load()
    res["load_s"] = time.perf_counter() - t0
    res["load_disk_read_gb"] = (disk_read_kib() - kib0) * 1024 / 1e9
    res["after_load"] = read_status()  # VmHWM here: the peak of the load
    res["load_sampled_peak"] = sampler.take()
    res["hwm_reset"] = reset_hwm()
    instrument(models)
    gens, images = [], []
    for i in range(1 + repeats):
        timers.current = {}
        ru0, kib0, c0 = resource.getrusage(resource.RUSAGE_SELF), disk_read_kib(), time.process_time()
        t0 = time.perf_counter()
        image = generate(models)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        gens.append({"warmup": i == 0, "wall_s": wall, "cpu_per_wall": (time.process_time() - c0) / wall,
                     "stages": dict(timers.current), "major_faults": ru1.ru_majflt - ru0.ru_majflt,
                     "minor_faults": ru1.ru_minflt - ru0.ru_minflt,
                     "disk_read_gb": (disk_read_kib() - kib0) * 1024 / 1e9, "status": read_status()})
        images.append(image)
        print(f"  [{name}] generation {i} ({'warm-up' if i == 0 else 'timed'}): {wall:.2f} s", file=sys.stderr,
              flush=True)
    res["gen_sampled_peak"] = sampler.take()
    sampler.done.set()
    res["generations"] = gens
    res["info"] = timers.info
    res["end"] = read_status()  # VmHWM: the peak since the reset after loading (the generations)
    res["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the whole child's peak
    img = images[-1]
    res["image_shape"] = list(img.shape)
    res["image_finite"] = bool(torch.isfinite(img).all())
    res["image_mean"], res["image_std"] = float(img.mean()), float(img.std())
    res["repeat_max_diff"] = max(float((x - img).abs().max()) for x in images)  # same seed: expect 0
    torch.save(img.cpu(), OUT_DIR / f"{out_name(size)}_{name}.pt")
    add_repo_paths()
    from zimage_core.png import save_png

    save_png(OUT_DIR / f"{out_name(size)}_{name}.png", img[0])
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------- parent


def warm_page_cache(files: list[Path]) -> float:
    """Read the model files once (cat > /dev/null) so every child starts from a warm page cache."""
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def run_child(impl: Impl, root: Path, size: int, repeats: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl.name, "--dir", str(root),
           "--size", str(size), "--repeats", str(repeats)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        return {"status": "ok", "child_s": time.perf_counter() - t0, **json.loads(lines[-1].removeprefix("RESULT "))}
    why = "killed by SIGKILL (the OOM killer, oom_score_adj 1000)" if proc.returncode == -9 else "failed"
    return {"status": f"{why}, rc {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}


def summarise(res: dict) -> None:
    """Medians over the timed generations (the clean ones if at least 2 are), per stage too."""
    timed = [g for g in res["generations"] if not g["warmup"]]
    clean = [g for g in timed if g["cpu_per_wall"] >= 0.9 * res["threads"]]
    use = clean if len(clean) >= 2 else timed
    res["gen_median_s"] = statistics.median(g["wall_s"] for g in use)
    res["gen_median_all_s"] = statistics.median(g["wall_s"] for g in timed)
    res["gen_clean"] = f"{len(clean)}/{len(timed)}"
    for g in res["generations"]:  # everything outside the three stages (release pages, scheduler, postprocess)
        g["stages"]["other"] = g["wall_s"] - sum(g["stages"].get(k, 0.0) for k in ("encode", "denoise", "decode"))
    stages = sorted({k for g in use for k in g["stages"]})
    res["stage_median_s"] = {k: statistics.median(g["stages"].get(k, 0.0) for g in use) for k in stages}
    res["peak_rss"] = res["ru_maxrss"]


def dit_gflop(n_layers: int, n_refiners: int, img_tokens: int, cap_tokens: int) -> float:
    """Analytic GFLOP of one DiT forward (2·M·N·K per Linear, 4·L²·D per attention; elementwise ops count 0)."""
    d, ffn, pad = TURBO_CONFIG["dim"], 10240, 32
    cap = -(-cap_tokens // pad) * pad
    img = -(-img_tokens // pad) * pad

    def block(n: int) -> float:
        return 2 * n * (4 * d * d + 3 * d * ffn) + 4 * n * n * d

    embed = 2 * img * 64 * d + 2 * cap * TURBO_CONFIG["cap_feat_dim"] * d + 2 * img * d * 64
    return (n_layers * block(img + cap) + n_refiners * (block(img) + block(cap)) + embed) / 1e9


def project_full(res: dict, size: int, te_layers_run_full: int) -> dict:
    """Rescale the measured stages to the full depth: encode × (layers run at full size / here), denoise × the
    FLOP ratio of the full and the reduced DiT at these token counts, decode and the rest unchanged.
    An estimate: it assumes each stage's time is proportional to its layers (the page faults included)."""
    st, info = res["stage_median_s"], res["info"]
    img_tokens = (size // 16) ** 2
    k_dit = (dit_gflop(FULL_DIT_LAYERS, FULL_DIT_REFINERS, img_tokens, info["caption_tokens"])
             / dit_gflop(DIT_LAYERS, DIT_REFINERS, img_tokens, info["caption_tokens"]))
    k_te = te_layers_run_full / info["te_layers_run"]
    encode, denoise = st["encode"] * k_te, st["denoise"] * k_dit
    total = res["gen_median_s"] - st["encode"] - st["denoise"] + encode + denoise
    return {"k_te": k_te, "k_dit": k_dit, "encode_s": encode, "denoise_s": denoise, "total_s": total,
            "te_share": encode / total}


def compare_images(names: list[str], size: int) -> dict[str, dict[str, float]]:
    files = {n: OUT_DIR / f"{out_name(size)}_{n}.pt" for n in names}
    imgs = {n: torch.load(f) for n, f in files.items() if f.is_file()}
    out = {}
    for a, b in [("ours", "diffusers_vae_fp32"), ("ours_vae_bf16", "diffusers"), ("ours", "diffusers"),
                 ("ours_keep_pages", "ours")]:
        if a in imgs and b in imgs:
            d = (imgs[a] - imgs[b]).abs()
            out[f"{a} vs {b}"] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                                  "frac_over_0.05": float((d > 0.05).float().mean())}
    return out


def print_report(results: dict[str, dict], ratios: dict, images: dict, size: int, info: dict) -> None:
    gb = 1e9
    w = info["weight_bytes"]
    print(f"\nmodel root: DiT {DIT_LAYERS}+{DIT_REFINERS}+{DIT_REFINERS} blocks ({w['transformer'] / gb:.2f} GB), "
          f"text encoder {TE_LAYERS} layers ({w['text_encoder'] / gb:.2f} GB), Flux VAE ({w['vae'] / gb:.2f} GB), "
          f"all bf16 on disk; {size}x{size}, {STEPS} steps, guidance 0; threads {os.cpu_count()}\n")
    rows = []
    for name, r in results.items():
        if r["status"] != "ok":
            rows.append([name, r["status"]] + [""] * 13)
            continue
        st = r["stage_median_s"]
        timed = [g["wall_s"] for g in r["generations"] if not g["warmup"]]
        warm = next(g["wall_s"] for g in r["generations"] if g["warmup"])
        rows.append([name, f"{r['load_s']:.1f}", f"{warm:.1f}", "/".join(f"{x:.1f}" for x in timed),
                     f"{r['gen_median_s']:.2f}", r["gen_clean"],
                     f"{st.get('encode', 0):.2f}", f"{st.get('denoise', 0):.2f}", f"{st.get('decode', 0):.2f}",
                     f"{st['other']:.2f}", f"{r['after_import']['VmRSS'] / gb:.2f}",
                     f"{r['after_load']['VmRSS'] / gb:.2f}",
                     f"{r['after_load']['VmHWM'] / gb:.2f}", f"{r['end']['VmHWM'] / gb:.2f}",
                     f"{r['ru_maxrss'] / gb:.2f}"])
    print(table(["impl", "load s", "warm-up s", "timed s", "median s", "clean", "encode", "denoise", "decode",
                 "other", "RSS import GB", "RSS loaded GB", "peak load GB", "peak gen GB", "peak RSS GB"], rows))
    print("\nper generation (median): major faults, disk GB read, peak anon / file GB (sampled, generations)")
    for name, r in results.items():
        if r["status"] == "ok":
            timed = [g for g in r["generations"] if not g["warmup"]]
            print(f"  {name}: {statistics.median(g['major_faults'] for g in timed):.0f} major faults, "
                  f"{statistics.median(g['disk_read_gb'] for g in timed):.2f} GB read, "
                  f"anon {r['gen_sampled_peak']['RssAnon'] / gb:.2f} / file {r['gen_sampled_peak']['RssFile'] / gb:.2f}"
                  f"; TE on {r['info'].get('te_input_tokens', r['info']['caption_tokens'])} tokens "
                  f"({r['info']['caption_tokens']} real), {r['info']['te_layers_run']} layers; "
                  f"release pages {r['stage_median_s'].get('release pages', 0):.2f} s")
    print("\nratios ours / diffusers (goals: generation <= 1.0, peak RSS <= 0.8):")
    for k, v in ratios.items():
        print(f"  {k}: generation {v['generation']:.2f}, peak RSS {v['peak_rss']:.2f}, load {v['load']:.2f}; "
              f"projected to full depth: generation {v['projected_generation']:.2f}")
    print("\nprojected to the full depth (30+2+2 DiT blocks, 36 TE layers; an estimate, see README):")
    for name, r in results.items():
        if r["status"] == "ok":
            p = r["projected_full"]
            print(f"  {name}: encode {p['encode_s']:.1f} s (x{p['k_te']:.2f}), denoise {p['denoise_s']:.1f} s "
                  f"(x{p['k_dit']:.2f}), total {p['total_s']:.1f} s, TE share {p['te_share']:.1%}")
    print("\nimages on [0, 1] pixels (bf16: expect differences of about 1e-2; a sanity check, not parity):")
    for k, v in images.items():
        print(f"  {k}: max |diff| {v['max_abs']:.4f}, mean {v['mean_abs']:.5f}, "
              f"{v['frac_over_0.05']:.2%} of values off by > 0.05")
    for name, r in results.items():
        if r["status"] == "ok":
            print(f"  {name}: mean {r['image_mean']:.3f}, std {r['image_std']:.3f}, finite {r['image_finite']}, "
                  f"repeat max diff {r['repeat_max_diff']:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=OUT_DIR / "pipeline_root")
    ap.add_argument("--regen", action="store_true", help="rewrite the model root even if present")
    ap.add_argument("--cleanup", action="store_true", help="delete the model root at the end")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (a multiple of 16)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per implementation (after 1 warm-up)")
    ap.add_argument("--only", nargs="+", choices=[x.name for x in IMPLS], help="run only these implementations")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per child")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.size % 16 or args.size < 16:
        ap.error("--size must be a positive multiple of 16")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.child:
        return child_main(args.child, args.dir, args.size, args.repeats)
    t_start = time.perf_counter()
    if float(_loadavg().split()[0]) > 0.5:
        print(f"note: load average {_loadavg()}: other processes are running, timings will be noisy", flush=True)
    info = ensure_root(args.dir, args.regen)
    impls = [x for x in IMPLS if not args.only or x.name in args.only]
    results = {}
    for impl in impls:
        warm_s = warm_page_cache(root_files(args.dir))
        load_before = _loadavg()
        print(f"{impl.name}: page cache warmed ({warm_s:.1f} s), load average {load_before}; running in a fresh "
              "process ...", flush=True)
        res = run_child(impl, args.dir, args.size, args.repeats, args.timeout)
        res.update(call=impl.call, loadavg_before=load_before, loadavg_after=_loadavg())
        if res["status"] == "ok":
            summarise(res)
            res["projected_full"] = project_full(res, args.size, FULL_TE_LAYERS - (impl.name != "diffusers"))
            print(f"  load {res['load_s']:.1f} s, generation median {res['gen_median_s']:.2f} s "
                  f"({res['gen_clean']} clean), peak RSS {res['ru_maxrss'] / 1e9:.2f} GB", flush=True)
        else:
            print(f"  {res['status']}\n{res.get('stderr_tail', '')}", flush=True)
        results[impl.name] = res
    ok = {k: v for k, v in results.items() if v["status"] == "ok"}
    ratios = {}
    # Like with like: VAE dtype equal on both sides (fp32: ours' default and the official code's; bf16:
    # diffusers' torch_dtype default), plus ours' default against diffusers' default.
    pairs = [("ours", "diffusers_vae_fp32"), ("ours_vae_bf16", "diffusers"), ("ours", "diffusers"),
             ("ours_keep_pages", "diffusers_vae_fp32")]
    for name, ref_name in pairs:
        if name in ok and ref_name in ok:
            r, ref = ok[name], ok[ref_name]
            ratios[f"{name}/{ref_name}"] = {
                "generation": r["gen_median_s"] / ref["gen_median_s"],
                "generation_all": r["gen_median_all_s"] / ref["gen_median_all_s"],
                "peak_rss": r["ru_maxrss"] / ref["ru_maxrss"],
                "peak_rss_generation": r["end"]["VmHWM"] / ref["end"]["VmHWM"],
                "load": r["load_s"] / ref["load_s"],
                "projected_generation": r["projected_full"]["total_s"] / ref["projected_full"]["total_s"],
            }
    images = compare_images(list(ok), args.size)
    print_report(results, ratios, images, args.size, info)
    out = {"size": args.size, "steps": STEPS, "prompt": PROMPT, "seed": SEED, "repeats": args.repeats,
           "root": str(args.dir), "root_info": info, "dit_config": DIT_CONFIG, "te_layers": TE_LAYERS,
           "vae_file_dtype": "bf16", "cpu_count": os.cpu_count(), "ratios": ratios, "images": images,
           "impls": results, "bench_s": time.perf_counter() - t_start}
    print(f"\nwrote {write_json(out_name(args.size), out)} ({out['bench_s']:.0f} s in all)")
    if args.cleanup:
        shutil.rmtree(args.dir)
        print(f"deleted {args.dir}")


if __name__ == "__main__":
    main()
