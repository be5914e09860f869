"""Our `comfy` LoRA output in the real ComfyUI 0.3.75 host, on a DiT that ComfyUI itself detects as Z-Image.

Locks in (issue 6, LoRA hub): LoRA files of several trainers (musubi: split q/k/v with alpha; AI Toolkit: PEFT
lora_A/B with adaLN; LyCORIS LoKr), converted by `convert_lora(..., TargetFormat.COMFY)` + `save_lora` into the
host's models/loras, are loaded by ComfyUI's native `LoraLoaderModelOnly` with zero "lora key not loaded" lines;
ComfyUI's own graph (UNETLoader → LoraLoaderModelOnly → KSampler, euler/simple, cfg 1) gives the same LATENT as
ours (ZImageDiTLoader → ZImageLoraLoader with the SOURCE file → ZImageSampler), ≤ 1e-4 rel, same seed, same
CONDITIONING; the LoRA moves both outputs by far more than that. A negative control in the same log: the raw
musubi file given to ComfyUI as is loses its attention keys ("lora key not loaded", ZIMAGE_SPEC §6.2), so the check
for those lines is live. The DiT is dim 3840 (the only width ComfyUI
detects as Z-Image) with one main layer and the 2 + 2 refiners, random bf16 weights (1.7 GB, written per module
and deleted after). Breaks on a comfy key ComfyUI does not map, a wrong fuse of q/k/v into qkv, a lost alpha or
strength, a LoKr leaf ComfyUI reads differently, or any drift between ComfyUI's Z-Image model and ours.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import comfy_host
from host_models import DETECTABLE, write_detectable_dit, write_text_encoder
from lora_fixtures import Fmt, write_lora
from zimage_core.lora import TargetFormat, convert_lora, read_lora, save_lora
from zimage_fixtures import rel_err

DIT, TE = "zimage_detectable.safetensors", "qwen_3_4b.safetensors"  # TE: real vocabulary, ComfyUI's tokenizer
STRENGTHS = {Fmt.MUSUBI: 0.8, Fmt.AI_TOOLKIT: 1.0, Fmt.LOKR: 0.6}  # a strength ≠ 1 must reach both loaders
VARIANTS = ["base", *(f.value for f in STRENGTHS)]
RAW = "musubi-raw"  # native only: the unconverted musubi file, whose attention keys ComfyUI cannot map
SEED, STEPS, SIDE = 5, 2, 64  # 64² → an 8×8 latent, 16 image tokens; two forwards per run keep CPU time low
# Both sides run fp32 on the CPU from the same bf16 weights. They differ in (a) the DiT code (ComfyUI's NextDiT vs
# ours: op order, attention kernel, RoPE; ~1e-6 rel per forward), (b) the LoRA: ComfyUI merges W + s·ΔW into the
# weight, we add s·(x·downᵀ)·upᵀ at run time (fp32 rounding, ~1e-7), (c) the Euler step (ComfyUI goes through
# denoised = x − σ·out, we step with v). 1e-4 is ~10× above what those give and ~100× below the LoRA's effect.
TOL = 1e-4


def conditioning_nodes() -> dict:
    return {"te": {"class_type": "ZImageTextEncoderLoader", "inputs": {"text_encoder_name": TE,
                                                                       "weight_dtype": "default"}},
            "pos": {"class_type": "ZImageTextEncode", "inputs": {"text_encoder": ["te", 0], "text": "a red fox"}},
            "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIDE, "height": SIDE,
                                                                       "batch_size": 1}}}


def native_prompt() -> dict:
    """ComfyUI's own nodes: UNETLoader → (LoraLoaderModelOnly with our comfy output) → KSampler → SaveLatent."""
    prompt = conditioning_nodes() | {"unet": {"class_type": "UNETLoader",
                                              "inputs": {"unet_name": DIT, "weight_dtype": "default"}}}
    files = {f.value: (f"{f.value}_comfy.safetensors", s) for f, s in STRENGTHS.items()}
    files[RAW] = (f"{Fmt.MUSUBI.value}.safetensors", STRENGTHS[Fmt.MUSUBI])
    for name in [*VARIANTS, RAW]:
        model = ["unet", 0]
        if name != "base":
            lora_name, strength = files[name]
            prompt[f"lora_{name}"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": model, "lora_name": lora_name, "strength_model": strength}}
            model = [f"lora_{name}", 0]
        prompt[f"sample_{name}"] = {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["pos", 0], "negative": ["pos", 0], "latent_image": ["latent", 0],
            "seed": SEED, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
        prompt[f"save_{name}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"sample_{name}", 0],
                                                                         "filename_prefix": f"native_{name}"}}
    return prompt


def our_prompt() -> dict:
    """Our nodes: ZImageDiTLoader → (ZImageLoraLoader with the trainer's own file) → ZImageSampler → SaveLatent."""
    prompt = conditioning_nodes() | {"dit": {"class_type": "ZImageDiTLoader",
                                             "inputs": {"dit_name": DIT, "weight_dtype": "default"}}}
    for name in VARIANTS:
        dit = ["dit", 0]
        if name != "base":
            prompt[f"lora_{name}"] = {"class_type": "ZImageLoraLoader", "inputs": {
                "dit": dit, "lora_name": f"{name}.safetensors", "strength": STRENGTHS[Fmt(name)]}}
            dit = [f"lora_{name}", 0]
        prompt[f"sample_{name}"] = {"class_type": "ZImageSampler", "inputs": {
            "dit": dit, "positive": ["pos", 0], "latent": ["latent", 0], "preset": "turbo", "seed": SEED,
            "steps": STEPS, "guidance": 0.0, "shift": 3.0, "denoise": 1.0}}
        prompt[f"save_{name}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"sample_{name}", 0],
                                                                         "filename_prefix": f"ours_{name}"}}
    return prompt


def write_loras(folder: Path) -> None:
    """Each trainer's file (the fixture's exact layout at dim 3840, bf16) and our comfy conversion of it."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, fmt in enumerate(STRENGTHS):
        source = write_lora(fmt, folder / f"{fmt.value}.safetensors", rank=4, seed=20 + i, cfg=DETECTABLE,
                            dtype=torch.bfloat16).path
        save_lora(convert_lora(read_lora(source), TargetFormat.COMFY), folder / f"{fmt.value}_comfy.safetensors")


def run(server: comfy_host.Server, prompt: dict) -> tuple[dict[str, torch.Tensor], float]:
    """The SaveLatent outputs of one prompt by variant, and its wall time."""
    start = time.monotonic()
    entry = server.wait(server.queue(prompt), timeout=300)
    seconds = time.monotonic() - start
    assert entry["status"]["status_str"] == "success", entry["status"]
    latents = {}
    for name in [n for n in entry["outputs"] if n.startswith("save_")]:
        (saved,) = entry["outputs"][name]["latents"]
        path = server.base_dir / "output" / saved["subfolder"] / saved["filename"]
        latents[name.removeprefix("save_")] = load_file(path)["latent_tensor"]
    return latents, seconds


def peak_rss(server: comfy_host.Server) -> int:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Both graphs run once in one server (native first, then POST /free so that only one 3.6 GB fp32 DiT is
    resident at a time); the models folder (1.7 GB) is deleted afterwards."""
    root = tmp_path_factory.mktemp("lora_host")
    models = root / "models"
    try:
        write_detectable_dit(models / "diffusion_models" / DIT)
        write_text_encoder(models / "text_encoders" / TE)
        write_loras(models / "loras")
        extra = comfy_host.write_extra_paths(root / "extra_paths.yaml", models)
        server = comfy_host.Server(root / "base", extra, root / "server.log").start()
        try:
            native, native_s = run(server, native_prompt())
            assert server.post("/free", {"unload_models": True, "free_memory": True})[0] == 200
            time.sleep(2)  # the prompt worker wakes up, unloads and drops its caches
            ours, ours_s = run(server, our_prompt())
            print(f"\nnative graph {native_s:.1f} s, ours {ours_s:.1f} s; server peak RSS "
                  f"{peak_rss(server) / 2**30:.2f} GiB")
        finally:
            server.stop()
        yield native, ours, server.log()
    finally:
        shutil.rmtree(models, ignore_errors=True)


def test_comfyui_detects_the_dit_and_loads_every_lora_key(outputs):
    """Every "lora key not loaded" line names a key of the raw musubi control (its attention projections), none of
    our comfy outputs (all of whose keys start `diffusion_model.`)."""
    native, _, log = outputs
    assert "model_type FLOW" in log  # UNETLoader detected a flow model (Z-Image) from the file
    assert "unet missing" not in log and "unet unexpected" not in log, "the DiT file must be complete"
    not_loaded = sorted(line.split("lora key not loaded: ")[1].strip() for line in log.splitlines()
                        if "lora key not loaded: " in line)
    ours = [k for k in not_loaded if not k.startswith("lora_unet_")]
    print(f"{len(not_loaded)} keys not loaded, all of the raw musubi control; {len(ours)} of our comfy outputs")
    assert ours == []
    attention = [f"lora_unet_layers_0_attention_{m}.{leaf}" for m in ("to_q", "to_k", "to_v", "to_out_0")
                 for leaf in ("alpha", "lora_down.weight", "lora_up.weight")]
    assert not_loaded == sorted(attention)  # the control: the log check sees a key ComfyUI drops
    assert rel_err(native[RAW], native[Fmt.MUSUBI.value]) > 100 * TOL  # and dropping them changes the output


def test_base_models_agree(outputs):
    """Without a LoRA both graphs give the same latent: the ground the LoRA comparison stands on."""
    native, ours, _ = outputs
    err = rel_err(ours["base"], native["base"])
    print(f"base: native KSampler vs ZImageSampler {err:.2e}")
    assert ours["base"].shape == native["base"].shape == (1, 16, SIDE // 8, SIDE // 8)
    assert torch.isfinite(native["base"]).all() and err <= TOL


@pytest.mark.parametrize("fmt", list(STRENGTHS), ids=lambda f: f.value)
def test_native_lora_loader_equals_ours(outputs, fmt):
    native, ours, _ = outputs
    name = fmt.value
    err = rel_err(ours[name], native[name])
    moved_native, moved_ours = rel_err(native[name], native["base"]), rel_err(ours[name], ours["base"])
    print(f"{name} (strength {STRENGTHS[fmt]}): native vs ours {err:.2e}; the LoRA moves native by "
          f"{moved_native:.2e}, ours by {moved_ours:.2e}")
    assert moved_native > 100 * TOL and moved_ours > 100 * TOL
    assert err <= TOL
