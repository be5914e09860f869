"""Demo of the core engine on tiny RANDOM-WEIGHT models (not real models; real weights can't be bundled).

Writes a DiT in the official sharded layout (transformer/ shards + index), a Qwen3 text encoder as
ComfyUI's single file and a Flux-shaped VAE as BFL's ae.safetensors; inspects the DiT with the CLI,
runs one DiT forward, then `python -m zimage_core generate` end to end (Turbo preset, 8 DiT
forwards, the host's bundled Qwen tokenizer) to a 256x256 PNG, and finally the pack's main job: a
real headless ComfyUI 0.3.75 (.host/) with this pack, the Turbo workflow (workflows/zimage_turbo.api.json)
queued through its HTTP API, and the PNG it saved. The images are noise-like: the weights are random.

With real weights: `ZIMAGE_MODELS=/path/to/ComfyUI/models bash scripts/demo.sh` queues the workflow on
diffusion_models/z_image_turbo_bf16.safetensors, text_encoders/qwen_3_4b.safetensors and vae/ae.safetensors
from that folder at 1024x1024 instead of writing random ones.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # comfy_host: the real host's paths and a stdlib HTTP client
from zimage_core import FLUX_VAE, DiTConfig, DiTLayout, FluxVAE, ZImageDiT, load_dit  # noqa: E402
from zimage_core.keymaps import from_canonical, join_key, split_key  # noqa: E402

OUT = ROOT / "demo_out" / "Z-Image-tiny-RANDOM-WEIGHTS"
TOKENIZER = ROOT / ".host" / "ComfyUI" / "comfy" / "text_encoders" / "qwen25_tokenizer"  # written by setup.sh
TINY = DiTConfig(dim=256, n_layers=2, n_refiner_layers=2, n_heads=2, cap_feat_dim=64, ffn_dim=682,
                 t_embed_dim=1024, adaln_dim=256)


def write_official_layout(model: ZImageDiT, folder: Path, n_shards: int = 2) -> None:
    tensors = {}
    for key, value in model.state_dict().items():
        module, leaf = split_key(key)
        for name, target in from_canonical(module, DiTLayout.DIFFUSERS):
            tensors[join_key(name, leaf)] = value.chunk(target.parts)[target.part].contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    keys, weight_map = sorted(tensors), {}
    for i in range(n_shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k] for k in keys[i::n_shards]}, folder / name, metadata={"note": "random demo weights"})
        weight_map.update({k: name for k in keys[i::n_shards]})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def main() -> None:
    torch.manual_seed(0)
    model = ZImageDiT(TINY)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    write_official_layout(model, OUT / "transformer")
    print(f"wrote a tiny random-weight DiT in the official layout: {OUT}")
    subprocess.run([sys.executable, "-m", "zimage_core", "inspect", str(OUT)], check=True, cwd=ROOT)
    dit = load_dit(OUT, device="cpu", dtype=torch.float32)
    x = torch.randn(1, 16, 32, 32)  # a 256x256 image's latent
    with torch.no_grad():
        v = dit(x, torch.tensor([0.5]), [torch.randn(12, TINY.cap_feat_dim)])
    print(f"DiT forward: v {tuple(v.shape)} {v.dtype}, mean {v.mean():.4f}, std {v.std():.4f} (t = 1 − σ = 0.5)")
    te, vae = write_text_encoder(OUT / "qwen_3_4b_tiny.safetensors"), write_vae(OUT / "ae_tiny.safetensors")
    png = ROOT / "demo_out" / "demo.png"
    subprocess.run([sys.executable, "-m", "zimage_core", "generate", "--dit", str(OUT), "--text-encoder", str(te),
                    "--vae", str(vae), "--tokenizer", str(TOKENIZER), "--prompt", "a lighthouse at dusk, oil painting",
                    "--preset", "turbo", "--width", "256", "--height", "256", "--seed", "42", "--out", str(png),
                    "--device", "cpu", "--dtype", "fp32"], check=True, cwd=ROOT)
    print(f"generate: wrote {png} (8 DiT forwards, guidance 0; settings in the PNG metadata)")
    real = os.environ.get("ZIMAGE_MODELS")
    models = Path(real) if real else write_comfy_models(ROOT / "demo_out" / "models-RANDOM-WEIGHTS", model)
    queue_turbo_workflow(models, size=1024 if real else 256)


RANDOM = {"note": "RANDOM demo weights written by scripts/demo.py; not a real model"}


def write_comfy_models(models: Path, dit: ZImageDiT) -> Path:
    """The three files under the names the Turbo workflow expects (ComfyUI's), with random weights."""
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()},
              models / "diffusion_models" / "z_image_turbo_bf16.safetensors", metadata=RANDOM)
    write_text_encoder(models / "text_encoders" / "qwen_3_4b.safetensors")
    write_vae(models / "vae" / "ae.safetensors")
    print(f"wrote random-weight model files under {models}")
    return models


def queue_turbo_workflow(models: Path, size: int) -> None:
    """Start the real ComfyUI headless with this pack, queue workflows/zimage_turbo.api.json, print the PNG."""
    import comfy_host

    run = ROOT / "demo_out" / "comfyui"
    run.mkdir(parents=True, exist_ok=True)
    extra = comfy_host.write_extra_paths(run / "extra_paths.yaml", models)
    server = comfy_host.Server(run / "base", extra, run / "server.log").start()
    try:
        prompt = json.loads((ROOT / "workflows" / "zimage_turbo.api.json").read_text())
        prompt["5"]["inputs"].update(width=size, height=size)
        t0 = time.perf_counter()
        entry = server.wait(server.queue(prompt), timeout=3600)
        status = entry["status"]["status_str"]
        if status != "success":
            raise SystemExit(f"the Turbo workflow ended with {status}: {json.dumps(entry['status'])[:2000]}\n"
                             f"server log: {server.log_path}")
        (image,) = entry["outputs"]["8"]["images"]
        path = server.base_dir / "output" / image["subfolder"] / image["filename"]
        print(f"ComfyUI {server.url}: the Turbo workflow ran in {time.perf_counter() - t0:.1f} s and saved {path}")
    finally:
        server.stop()


def write_text_encoder(path: Path) -> Path:
    """A 2-layer Qwen3 (hidden 64 = the tiny DiT's caption width, the real vocabulary), ComfyUI's key names."""
    from transformers import Qwen3Config, Qwen3Model

    cfg = Qwen3Config(hidden_size=TINY.cap_feat_dim, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, intermediate_size=128, vocab_size=151936)
    model = Qwen3Model(cfg)
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, path, metadata=RANDOM)
    return path


def write_vae(path: Path) -> Path:
    """A narrow Flux-shaped VAE (32 base channels instead of 128), BFL ae.safetensors key names."""
    vae = FluxVAE(dataclasses.replace(FLUX_VAE, ch=32))
    for p in vae.parameters():
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=p[0].numel() ** -0.5)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, path, metadata=RANDOM)
    return path


if __name__ == "__main__":
    main()
