"""`python -m zimage_core train CONFIG.toml`: headless LoRA training (`zimage_core.train`) from one TOML file.

    rank = 16                       # top level: TrainConfig fields (config.py), unknown keys → error
    steps = 2000
    output_dir = "out"
    name = "zxq"
    trigger = "zxq"
    # ema_decay = 0.999             # save an EMA of the LoRA weights (train/ema.py)
    # dop_class = "man"             # DOP: keep "man" prompts as they were (the trigger replaced by the class word)

    [models]                        # as `generate`'s options
    dit = "z_image_base.safetensors"
    text_encoder = "qwen_3_4b.safetensors"
    vae = "ae.safetensors"
    # tokenizer = "tokenizer"       # optional: default, the model root's tokenizer/

    [data]
    folder = "photos"               # images + same-name .txt captions
    # default_caption = "a photo of [trigger]"
    # resolutions = [512, 768, 1024]
    # cache_dir = "cache"           # latents and caption features, reused across runs

    [previews]                      # optional: sample these prompts during training
    prompts = ["a photo of [trigger]", "a photo of a dog"]   # keep one without the trigger word
    every = 250                     # steps between previews (and one at the end)
    # width = 512, height = 512, seed = 0
    # sample_steps = 8, guidance = 0.0   # default: the settings of the model the LoRA is for (previews.py)

Relative paths (models, data, output_dir, adapter_path) are relative to the TOML file's folder. Everything is
checked (TOML, keys, files, folder) before a model loads. Captions are encoded, then the text encoder and VAE
are freed, then the DiT loads and trains. One line per step (`--log-every`) on stdout: `step N/M loss X lr Y`.
Ctrl-C stops after the current step and saves a checkpoint (a second Ctrl-C aborts at once); exit status 130
then, 0 when all steps ran. The last lines name the LoRA and its resume state. Bad input exits 2 (cli.py).
With [previews] the VAE stays loaded and each preview is written as `<output_dir>/previews/<name>_<step>_<i>.png`;
every run ends with its loss curve, `<output_dir>/<name>_loss.png`. The step lines carry an ETA.

Several processes (train/distributed.py): `torchrun --nproc_per_node N -m zimage_core train CONFIG.toml`; gloo on
the CPU, nccl with one GPU per process (`--device cuda` is LOCAL_RANK's GPU). `batch_size` is per process, so
N processes at batch b train as one process at batch N·b. Rank 0 encodes (and caches) first, prints and saves.
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .cli_generate import Dtype, pick_device, pick_dtype

if TYPE_CHECKING:
    from .train.config import TrainConfig

MODEL_KEYS = {"dit": True, "text_encoder": True, "vae": True, "tokenizer": False}  # name → required
DATA_KEYS = {"folder": True, "default_caption": False, "resolutions": False, "cache_dir": False}
PREVIEW_KEYS = {"prompts": True, "every": True, "width": False, "height": False, "seed": False, "sample_steps": False,
                "guidance": False}
DEFAULT_RESOLUTIONS = (512, 768, 1024)
INTERRUPTED = 130  # the shell's status for SIGINT


def add_train(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "train", help="train a Z-Image LoRA from a TOML config (headless)",
        description="Train a LoRA. CONFIG.toml: TrainConfig options at the top level, plus [models] (dit, "
        "text_encoder, vae, tokenizer) and [data] (folder, default_caption, resolutions, cache_dir) tables; "
        "relative paths are relative to the TOML's folder. Ctrl-C stops after the step and saves.",
    )
    p.add_argument("config", help="the run's .toml file")
    p.add_argument("--resume", help="continue from a <name>_<step>.state.safetensors file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", type=Dtype, choices=list(Dtype), default=Dtype.AUTO, metavar="{auto,bf16,fp16,fp32}",
                   help="DiT and text encoder dtype (auto: bf16 on CUDA, fp32 elsewhere)")
    p.add_argument("--log-every", type=int, default=1, metavar="K", help="a progress line every K steps (default 1)")
    p.set_defaults(run=run_train)


# ---- the TOML ----------------------------------------------------------------------------------------

def read_run(path: str | Path) -> tuple[TrainConfig, dict, dict]:
    """CONFIG.toml → (TrainConfig, models table, data table), paths resolved; every error names the file.
    The [previews] table, checked, comes back as data["previews"] (None without one)."""
    import tomllib

    from .train.config import TrainConfig

    path = Path(path)
    try:
        with open(path, "rb") as fh:
            values = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    base = path.resolve().parent
    models = _table(path, values.pop("models", None), "models", MODEL_KEYS | {"dit_weights": False})
    from .config import WeightFormat  # dit_weights = "fp8": block Linear weights kept float8 (checkpoint.py)

    weights = str(models.pop("dit_weights", "default"))
    by_name = {w.value: w for w in WeightFormat} | {w.name.lower(): w for w in WeightFormat}
    if weights.lower() not in by_name:
        raise ValueError(f"{path}: [models] dit_weights must be default or fp8, got {weights!r}")
    models["dit_weights"] = by_name[weights.lower()]
    data = _table(path, values.pop("data", None), "data", DATA_KEYS)
    previews = values.pop("previews", None)
    for key in ("output_dir", "adapter_path"):
        if isinstance(values.get(key), str):
            values[key] = str(base / values[key])
    try:
        config = TrainConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    for key, value in list(models.items()) + list(data.items()):
        if key in ("folder", "cache_dir", *MODEL_KEYS):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{path}: {key} must be a path (a non-empty string), got {value!r}")
            (models if key in MODEL_KEYS else data)[key] = base / value
    for key in ("dit", "text_encoder", "vae", "tokenizer"):
        if key in models and not models[key].exists():
            raise FileNotFoundError(f"{path}: [models] {key} {models[key]} does not exist")
    if not data["folder"].is_dir():
        raise FileNotFoundError(f"{path}: [data] folder {data['folder']} does not exist (or is not a folder)")
    res = data.get("resolutions", list(DEFAULT_RESOLUTIONS))
    if (not isinstance(res, list) or not res
            or any(isinstance(r, bool) or not isinstance(r, int) or r < 16 or r % 16 for r in res)):
        raise ValueError(f"{path}: [data] resolutions must be a non-empty list of multiples of 16, got {res!r}")
    data["resolutions"] = tuple(res)
    caption = data.get("default_caption")
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f"{path}: [data] default_caption must be a string, got {caption!r}")
    data["previews"] = None if previews is None else _preview_table(path, previews, config.trigger)
    return config, models, data


def _preview_table(path: Path, table: object, trigger: str) -> dict:
    """[previews]: prompts (non-empty strings, `[trigger]` replaced), every ≥ 1, sizes multiples of 16, seed ≥ 0,
    and the optional sampler overrides sample_steps / guidance."""
    from .train.data import apply_trigger

    values = _table(path, table, "previews", PREVIEW_KEYS)
    prompts = values["prompts"]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{path}: [previews] prompts must be a non-empty list of prompts, got {prompts!r}")
    prompts = [apply_trigger(p, trigger, where=f"{path}: [previews] prompt {i}") for i, p in enumerate(prompts)]
    out = {"width": 512, "height": 512, "seed": 0} | values | {"prompts": prompts}
    for key, lo, step in (("every", 1, 1), ("width", 16, 16), ("height", 16, 16), ("seed", 0, 1),
                          ("sample_steps", 1, 1)):
        v = out.get(key, lo)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or v % step:
            what = f"a multiple of {step} ≥ {lo}" if step > 1 else f"an integer ≥ {lo}"
            raise ValueError(f"{path}: [previews] {key} must be {what}, got {v!r}")
    guidance = out.get("guidance", 0.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance < float("inf"):
        raise ValueError(f"{path}: [previews] guidance must be a number ≥ 0, got {guidance!r}")
    return out


def _previews(table: dict, config: TrainConfig, te, cache_dir: Path | None):
    """The run's `Previews`: the prompts encoded (and "" when the sampler uses guidance) before te is freed."""
    import dataclasses

    from .train import empty_caption_features
    from .train.previews import Previews, preview_sampler

    overrides = {"steps": table.get("sample_steps"), "guidance": table.get("guidance")}
    sampler = dataclasses.replace(preview_sampler(config.base_mode), **{k: v for k, v in overrides.items()
                                                                         if v is not None})
    if config.trigger and all(config.trigger in p for p in table["prompts"]):
        print(f"warning: every preview prompt has the trigger word {config.trigger!r}; one without it shows what "
              "the LoRA does to the rest of the model", file=sys.stderr)
    captions = tuple(c.cpu() for c in te.encode(table["prompts"]))
    negative = empty_caption_features(te, cache_dir) if sampler.guidance > 0 else None
    return Previews(captions, table["every"], table["width"], table["height"], table["seed"], sampler, negative)


def _preview_saver(vae, config: TrainConfig):
    """on_preview: decode the latents with the VAE and write `<output_dir>/previews/<name>_<step>_<i>.png`."""
    from .pipeline import to_unit_range
    from .png import save_png

    folder = config.output_dir / "previews"

    def save(step: int, latents: torch.Tensor) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            images = to_unit_range(vae.decode(latents.to(next(vae.parameters()).device)))
        for i, image in enumerate(images):
            save_png(folder / f"{config.name}_{step:06d}_{i}.png", image)
    return save


def _table(path: Path, table: object, name: str, keys: dict[str, bool]) -> dict:
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise ValueError(f"{path}: {name} must be a table ([{name}]), got {table!r}")
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise ValueError(f"{path}: unknown option(s) in [{name}]: {', '.join(unknown)} "
                         f"(known: {', '.join(keys)})")
    missing = [k for k, required in keys.items() if required and k not in table]
    if missing:
        raise ValueError(f"{path}: [{name}] needs {', '.join(missing)}")
    return dict(table)


# ---- the run -----------------------------------------------------------------------------------------

class StopFlag:
    """SIGINT handler: the first Ctrl-C asks the loop to stop after its step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, _signum, _frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: stopping after this step and saving (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __bool__(self) -> bool:
        return self.requested


def run_train(args: argparse.Namespace) -> int:
    from .checkpoint import load_dit
    from .text_encoder import load_text_encoder
    from .train import build_items, empty_caption_features, read_folder, train_lora
    from .train.distributed import join_process_group, rank_device
    from .train.inputs import duration
    from .vae import load_vae

    if args.log_every < 1:
        raise ValueError(f"--log-every {args.log_every}: expected ≥ 1")
    config, models, data = read_run(args.config)
    resume = Path(args.resume) if args.resume else None
    if resume is not None and not resume.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such file")
    examples = read_folder(data["folder"], data.get("default_caption"), trigger=config.trigger)
    device = rank_device(pick_device(args.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = join_process_group(device)  # torchrun: one process per device, batch_size per process
    dtype = torch.bfloat16 if args.dtype is Dtype.AUTO and device.type == "cuda" else (
        torch.float32 if args.dtype is Dtype.AUTO else pick_dtype(args.dtype, device))

    t0 = time.perf_counter()
    if not world.is_main:
        world.barrier()  # rank 0 encodes first and fills the cache; the other ranks then read it
    te = load_text_encoder(models["text_encoder"], device, dtype, tokenizer=models.get("tokenizer"))
    vae = load_vae(models["vae"], device)
    items = build_items(examples, vae, te, resolutions=data["resolutions"], cache_dir=data.get("cache_dir"),
                        dop_class=config.dop_class, trigger=config.trigger)
    empty = empty_caption_features(te, data.get("cache_dir")) if config.caption_dropout > 0 else None
    previews = _previews(data["previews"], config, te, data.get("cache_dir")) if data["previews"] else None
    if world.is_main:
        world.barrier()
    del te
    vae = vae if previews is not None else None  # kept only to decode the previews
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"encoded {len(examples)} images → {len(items)} items in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    dit = load_dit(models["dit"], device, dtype, weight_format=models["dit_weights"])
    print(f"loaded the DiT on {device} ({str(dtype).removeprefix('torch.')}); training {config.steps} steps, "
          f"rank {config.rank}", file=sys.stderr, flush=True)

    stop = StopFlag()
    start, every, first = time.perf_counter(), args.log_every, []

    def on_step(step: int, loss: float, lr: float) -> None:
        first[:] = first or [step]  # a resumed run starts past step 1
        if world.is_main and (step % every == 0 or step == config.steps or stop):
            took = time.perf_counter() - start
            eta = took / (step - first[0] + 1) * (config.steps - step)
            print(f"step {step}/{config.steps} loss {loss:.4f} lr {lr:.3g} ({took:.1f}s, eta {duration(eta)})",
                  flush=True)

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers: main thread only
    previous = signal.signal(signal.SIGINT, stop) if main_thread else None
    try:
        result = train_lora(dit, items, config, on_step=on_step, should_stop=lambda: bool(stop), resume=resume,
                            empty_caption=empty, previews=previews,
                            on_preview=_preview_saver(vae, config) if previews is not None and world.is_main else None)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    lora = result.last_checkpoint
    state = lora.with_name(lora.name.removesuffix(".safetensors") + ".state.safetensors")
    if result.interrupted:
        print(f"interrupted at step {result.steps_done}/{config.steps}; resume with --resume {state}",
              file=sys.stderr)
    if world.is_main:
        from .png import save_png
        from .train.plot import loss_curve

        curve = save_png(config.output_dir / f"{config.name}_loss.png", loss_curve(result.losses).permute(2, 0, 1))
        print(f"loss curve: {curve}")
        print(f"lora: {lora}")
        print(f"state: {state}")
    return INTERRUPTED if result.interrupted else 0
