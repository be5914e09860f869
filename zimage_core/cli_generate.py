"""`python -m zimage_core generate`: prompt → PNG with the three models, a progress bar and metadata."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from enum import Enum
from pathlib import Path

import torch

from .config import WeightFormat
from .pipeline import ImageSize, generate
from .png import save_png
from .sampling import Preset, preset_config


class Dtype(str, Enum):
    AUTO = "auto"  # bf16 on CUDA and CPU, fp16 on MPS
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


_TORCH_DTYPES = {Dtype.BF16: torch.bfloat16, Dtype.FP16: torch.float16, Dtype.FP32: torch.float32}


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(choice: Dtype, device: torch.device) -> torch.dtype:
    if choice is Dtype.AUTO:
        return torch.float16 if device.type == "mps" else torch.bfloat16
    return _TORCH_DTYPES[choice]


def add_generate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "generate", help="text to image (PNG) with a Z-Image DiT, the Qwen3 text encoder and the Flux VAE",
        description="Generate images. Sampler settings come from --preset; --steps/--guidance/--shift override it. "
        "Guidance is diffusers' guidance_scale g (ComfyUI's cfg = g + 1; 0 = no guidance, one forward per step).",
    )
    p.add_argument("--dit", required=True, help="DiT: a ComfyUI file, an fp8 file, or the official transformer/ folder")
    p.add_argument("--text-encoder", required=True, help="Qwen3-4B: qwen_3_4b.safetensors or text_encoder/ folder")
    p.add_argument("--vae", required=True, help="Flux VAE: ae.safetensors or the diffusers vae/ folder")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model root's tokenizer/)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="", help="negative prompt (used only when guidance > 0)")
    p.add_argument("--preset", type=Preset, choices=list(Preset), default=Preset.TURBO,
                   help="turbo: 8 steps, g 0, shift 3 | de-turbo: 25 steps, g 2 | base: 50 steps, g 4, shift 6")
    p.add_argument("--steps", type=int, help="DiT forwards (override the preset)")
    p.add_argument("--guidance", type=float, help="g ≥ 0 (override the preset; ComfyUI cfg = g + 1)")
    p.add_argument("--shift", type=float, help="schedule shift (override the preset)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="images for this prompt (one seed: ComfyUI's batch noise)")
    p.add_argument("--out", required=True, help="output PNG (NAME_1.png, NAME_2.png … when --batch > 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", type=Dtype, choices=list(Dtype), default=Dtype.AUTO, help="DiT and text encoder dtype")
    p.add_argument("--weights", type=WeightFormat, choices=list(WeightFormat), default=WeightFormat.COMPUTE,
                   help="DiT block weights in the compute dtype or in fp8 (half the memory)")
    p.add_argument("--vae-tile", type=int, help="decode in tiles of this many pixels (large images, less memory)")
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from .checkpoint import load_dit
    from .text_encoder import load_text_encoder
    from .vae import load_vae

    cfg = preset_config(args.preset, args.steps, args.guidance, args.shift)  # validates steps ≥ 1, guidance ≥ 0 …
    size = ImageSize(args.width, args.height)
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: expected ≥ 1")
    out = Path(args.out)
    if out.suffix.lower() != ".png" or not out.parent.is_dir():
        raise ValueError(f"--out {out}: expected a .png path in an existing folder")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)

    t0 = time.perf_counter()
    te = load_text_encoder(args.text_encoder, device, dtype, tokenizer=args.tokenizer)
    dit = load_dit(args.dit, device, dtype, args.weights)
    vae = load_vae(args.vae, device)
    print(f"loaded in {time.perf_counter() - t0:.1f}s on {device} ({str(dtype).removeprefix('torch.')})",
          file=sys.stderr)
    images = generate(dit, te, vae, args.prompt, size, args.seed, cfg, negative=args.negative,
                      images_per_prompt=args.batch, tile_size=args.vae_tile, on_step=ProgressBar())
    settings = {"prompt": args.prompt, "negative": args.negative if cfg.guidance > 0 else "",
                "preset": args.preset.value, **dataclasses.asdict(cfg), "width": size.width, "height": size.height,
                "seed": args.seed, "batch": args.batch, "dit": Path(args.dit).name,
                "text_encoder": Path(args.text_encoder).name, "vae": Path(args.vae).name}
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}_{i + 1}{out.suffix}")
        save_png(path, image, {"parameters": describe(settings, i), "zimage": json.dumps({**settings, "index": i})})
        print(path)
    return 0


def describe(settings: dict, index: int) -> str:
    """A one-paragraph, human-readable record of the settings (the PNG's "parameters" text)."""
    s = settings
    lines = [s["prompt"]]
    if s["negative"]:
        lines.append(f"Negative prompt: {s['negative']}")
    lines.append(f"Steps: {s['steps']}, Guidance: {s['guidance']} (ComfyUI cfg {s['guidance'] + 1}), "
                 f"Shift: {s['shift']}, Seed: {s['seed']}, Batch index: {index}, Size: {s['width']}x{s['height']}, "
                 f"Model: {s['dit']}, Sampler: flow-matching Euler (zimage_core)")
    return "\n".join(lines)


class ProgressBar:
    """`on_step` callback: one line on stderr, redrawn per step, with seconds per step."""

    def __init__(self, width: int = 30) -> None:
        self.width, self.start = width, time.perf_counter()

    def __call__(self, i: int, n: int, _x: torch.Tensor) -> None:
        filled = self.width * i // n
        rate = (time.perf_counter() - self.start) / i
        end = "\n" if i == n else ""
        print(f"\rsampling [{'#' * filled}{'.' * (self.width - filled)}] {i}/{n} {rate:.2f}s/step", end=end,
              file=sys.stderr, flush=True)
