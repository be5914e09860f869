"""Z-Image Train LoRA: `zimage_core.train.train_lora` inside a ComfyUI graph.

Order of work: every input is checked first (config values, paths, captions, the training adapter's file, the
resume state's header), then images and captions are encoded (text encoder, VAE), then the DiT trains, then the
previews are decoded. A bad input is therefore a node error naming it, raised before anything long starts.

Host conventions handled here:
- ComfyUI runs nodes under `torch.inference_mode()`, so every tensor a loader made is an inference tensor, which
  autograd refuses to save for backward. Encoding and training run under `inference_mode(False)`, and the DiT's
  inference-mode parameters and buffers are replaced once by equal normal tensors (one tensor at a time, so the
  peak is one extra tensor; the shared DiT stays usable by every other node).
- Progress: ComfyUI's progress bar (one update per step, with a latent preview when a preview arrives) and a text
  line with step, loss and ETA (`PromptServer.send_progress_text`). ComfyUI's progress hook raises its interrupt
  exception itself (clearing the flag), so the hook is called inside a guard that turns the exception into a stop
  request: the trainer then writes its resumable checkpoint, and the node raises the interrupt again afterwards,
  so the run ends as "interrupted" with the files in place.
- Z-Image Train Options (optional input `options`) carries the advanced TrainConfig fields as a checked dict;
  without it they keep TrainConfig's defaults.
- Files go to a fresh run folder in models/loras: `<output_name>_00001_/<output_name>_<step:06d>.safetensors` (and
  `.state.safetensors`), the counter going up per run (nodes/lora.py's rule): a run never overwrites another's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import comfy.latent_formats
import comfy.model_management as mm
import comfy.utils
import folder_paths
import latent_preview
import torch
from torch import nn

from ..zimage_core import ImageSize
from ..zimage_core.train import BaseMode, TimestepSampling, TrainConfig, build_items, images_from_tensor, read_folder
from ..zimage_core.train.config import LRSchedule, OptimizerKind
from ..zimage_core.train.data import apply_trigger, class_caption, default_preview_prompts
from ..zimage_core.train.inputs import (
    caption_lines,
    inside,
    parse_resolutions,
    progress_line,
    prompt_lines,
    relative_name,
)
from ..zimage_core.train.loop import check_optimizer, read_adapter, read_state, train_lora
from ..zimage_core.train.lora_net import TrainTargets
from ..zimage_core.train.plot import loss_curve
from ..zimage_core.train.previews import Previews
from ..zimage_core.train.timesteps import NoiseBias
from . import _host as host
from ._hosting import with_loras
from .lora import free_path, plain_name, save_folder

NO_ADAPTER = "none"
TRAIN_OPTIONS = "ZIMAGE_TRAIN_OPTIONS"  # a dict of TrainConfig fields (Z-Image Train Options → Z-Image Train LoRA)
_MAX_SEED = 0xFFFFFFFFFFFFFFFF


class ZImageTrainLora:
    TITLE = "Z-Image Train LoRA"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Trains a Z-Image LoRA on an IMAGE batch (with captions) or on a folder of images with .txt "
                   "captions, saves it into models/loras, and outputs the DiT with the LoRA applied, so a sampler "
                   "in the same graph uses it. Cancel writes a resumable checkpoint.")
    RETURN_TYPES = (host.ZIMAGE_DIT, "STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("dit", "lora_name", "loss_curve", "previews")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit": (host.ZIMAGE_DIT, {"tooltip": "The base DiT, from Z-Image DiT Loader (no Z-Image LoRA on it)."}),
            "text_encoder": (host.ZIMAGE_TEXT_ENCODER, {"tooltip": "Encodes the captions and preview prompts."}),
            "vae": (host.ZIMAGE_VAE, {"tooltip": "Encodes the training images and decodes the previews."}),
            "captions": ("STRING", {"multiline": True, "default": "a photo of [trigger]", "tooltip": (
                "For the images input: one caption per line, one line per image in batch order, or one line for "
                "all; empty = the default caption. [trigger] becomes the trigger word. Not used with a folder.")}),
            "trigger": ("STRING", {"default": "zxq", "tooltip": "Replaces every [trigger] in the captions, the "
                                                                "default caption and the preview prompts."}),
            "default_caption": ("STRING", {"default": "", "tooltip": (
                "Used for folder images without a same-name .txt caption (empty: such an image is an error), and "
                "for the images input when captions is empty.")}),
            "resolutions": ("STRING", {"default": "512", "tooltip": (
                "Training resolutions, e.g. 512 or 512, 768, 1024 (multiples of 16): each image trains in the "
                "aspect-ratio bucket of about that many pixels squared, once per resolution.")}),
            "steps": ("INT", {"default": 1000, "min": 1, "max": 1_000_000,
                              "tooltip": "Optimizer steps (with a resume: the total, counting the resumed steps)."}),
            "rank": ("INT", {"default": 16, "min": 1, "max": 1024, "tooltip": "LoRA rank."}),
            "alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                "tooltip": "LoRA alpha (scale alpha/rank). 0 = the rank (scale 1)."}),
            "learning_rate": ("FLOAT", {"default": 0.0001, "min": 0.0, "max": 1.0, "step": 0.00001, "round": False,
                                        "tooltip": ("Learning rate (> 0); constant unless Z-Image Train Options sets a "
                                                    "schedule and warm-up.")}),
            "base_mode": ([m.value for m in BaseMode], {"default": BaseMode.BASE.value, "tooltip": (
                "base: the base Z-Image. de_turbo: a de-distilled Turbo, trained like a base. turbo_adapter: Turbo "
                "with the training adapter (below) merged while training, removed after.")}),
            "training_adapter": ([NO_ADAPTER, *folder_paths.get_filename_list("loras")], {
                "tooltip": "turbo_adapter only: the Z-Image Turbo training adapter LoRA from models/loras."}),
            "timestep_sampling": ([t.value for t in TimestepSampling], {
                "default": TimestepSampling.SHIFT.value,
                "tooltip": "How noise levels are drawn: shift (musubi, shift 3), logit_normal, uniform, weighted."}),
            "save_every": ("INT", {"default": 0, "min": 0, "max": 1_000_000,
                                   "tooltip": "Also save a checkpoint every N steps. 0 = only at the end."}),
            "keep_last": ("INT", {"default": 0, "min": 0, "max": 1000,
                                  "tooltip": "Keep only the newest N checkpoints of this run. 0 = keep all."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": _MAX_SEED, "control_after_generate": True,
                             "tooltip": "Seeds the LoRA init, noise, noise levels and batch order."}),
            "output_name": ("STRING", {"default": "zimage_lora", "tooltip": (
                "A plain name: written to models/loras/<name>_00001_/<name>_<step>.safetensors, the counter going "
                "up per run (never overwrites). Press R to see it in the LoRA lists.")}),
            "preview_prompts": ("STRING", {"multiline": True, "default": "", "tooltip": (
                "One prompt per line ([trigger] works); empty = the first training caption, and the same caption "
                "without the trigger word.")}),
            "preview_every": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip": (
                "Sample the preview prompts every N steps. 0 = only at the end; the end is always previewed.")}),
            "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 16,
                              "tooltip": "Width of the preview images and of the loss curve image."}),
            "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 16,
                               "tooltip": "Height of the preview images and of the loss curve image."}),
        }, "optional": {
            "images": ("IMAGE", {"tooltip": "Training images (a batch, e.g. from Load Image); or use folder."}),
            "folder": ("STRING", {"default": "", "tooltip": (
                "A folder inside ComfyUI's input folder (relative, no '..') with images and same-name .txt "
                "captions; instead of the images input.")}),
            "resume": ("STRING", {"default": "", "tooltip": (
                "Continue a run: a .state.safetensors checkpoint, relative to models/loras (e.g. "
                "zimage_lora_00001_/zimage_lora_000500.state.safetensors). The settings must match that run's.")}),
            "options": (TRAIN_OPTIONS, {"tooltip": (
                "Advanced settings from Z-Image Train Options (targets, optimizer, schedule, batch, memory, DOP, "
                "EMA, ...). Not connected: their defaults.")}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def train(self, dit, text_encoder, vae, images=None, folder: str = "", resume: str = "", options=None,
              unique_id=None, **widgets):
        plan = make_plan(dit, images, folder, resume, widgets, options or {})
        with torch.inference_mode(False):
            items, preview_caps = encode(plan, text_encoder, vae, images, unique_id)
            result = fit(dit, items, plan, preview_caps, unique_id)
            if result.interrupted:
                raise mm.InterruptProcessingException()
            previews = decode_previews(vae, result.previews)
        name = Path(os.path.relpath(result.last_checkpoint, plan.lora_root)).as_posix()
        trained, _ = with_loras(dit, ((result.lora.lora_file(name), 1.0),))
        curve = torch.as_tensor(loss_curve(result.losses, plan.width, plan.height)).float()[None]  # (1, H, W, 3)
        return (trained, name, curve.to(mm.intermediate_device()), previews)


class ZImageTrainOptions:
    TITLE = "Z-Image Train Options"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Advanced settings for Z-Image Train LoRA: what is trained, optimizer and schedule, batch, "
                   "noise levels, memory, DOP, differential guidance and EMA. Checked here, before any training.")
    RETURN_TYPES = (TRAIN_OPTIONS,)
    RETURN_NAMES = ("options",)
    FUNCTION = "options"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "targets": ([t.value for t in TrainTargets], {"default": TrainTargets.ATTN_FFN.value, "tooltip": (
                "attn_ffn: attention and feed-forward of the main layers. attn_ffn_adaln: + their adaLN. all: + the "
                "noise and context refiner blocks.")}),
            "optimizer": ([o.value for o in OptimizerKind], {"default": OptimizerKind.ADAMW.value, "tooltip": (
                "adamw; adamw_8bit (needs bitsandbytes, less optimizer memory); adafactor.")}),
            "lr_schedule": ([s.value for s in LRSchedule], {"default": LRSchedule.CONSTANT.value, "tooltip": (
                "constant, or cosine / linear decay to 0 at the last step (after the warm-up).")}),
            "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 1_000_000,
                                     "tooltip": "Steps of linear warm-up from 0 to the learning rate."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "Images per step (of one aspect-ratio bucket)."}),
            "grad_accumulation": ("INT", {"default": 1, "min": 1, "max": 1024,
                                          "tooltip": "Batches whose gradients add up to one optimizer step."}),
            "shift": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 100.0, "step": 0.1,
                                "tooltip": "The shift of timestep_sampling shift (musubi-tuner's 3)."}),
            "noise_bias": ([b.value for b in NoiseBias], {"default": NoiseBias.BALANCED.value, "tooltip": (
                "Lean the drawn noise levels toward high noise (composition) or low noise (detail).")}),
            "caption_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip": (
                "Probability of training an image on the empty caption.")}),
            "differential_guidance_scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1,
                                                      "tooltip": "0 = off; AI Toolkit uses 3 when on."}),
            "dop_class": ("STRING", {"default": "", "tooltip": (
                "Differential output preservation: a class word (e.g. person). The prompt with the trigger word "
                "replaced by it keeps the base model's output. Empty = off; needs the trigger in every caption.")}),
            "dop_multiplier": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                         "tooltip": "Weight of the DOP term."}),
            "ema_decay": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.9999, "step": 0.0001, "round": False,
                                    "tooltip": "0 = off; else the saved LoRA is an EMA of the weights (e.g. 0.99)."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": (
                "Recompute each block in the backward: much less activation memory, about a third slower.")}),
            "blocks_to_swap": ("INT", {"default": 0, "min": 0, "max": 29, "tooltip": (
                "Keep the last N main layers in CPU memory and copy each in when it runs (needs "
                "gradient_checkpointing). For 12-16 GB GPUs.")}),
        }}

    def options(self, lr_schedule: str, **widgets) -> tuple[dict]:
        values = {**widgets, "scheduler": lr_schedule}
        # bad values are this node's error, before any training; the trigger word is the trainer's (a stand-in here)
        config = TrainConfig(**values, trigger="trigger")
        check_optimizer(config.optimizer)
        return (values,)


@dataclass(frozen=True)
class Plan:
    """Every checked input of one training run."""

    config: TrainConfig
    resume: Path | None
    examples: tuple | None  # the folder's (image, caption) pairs, read and checked; None = the images input
    captions: tuple[str, ...]  # the images input's captions, one per image, trigger applied; () with a folder
    resolutions: tuple[int, ...]
    prompts: tuple[str, ...]  # preview prompts, trigger applied; empty = data.default_preview_prompts
    preview_every: int
    width: int
    height: int
    lora_root: Path


def make_plan(dit, images, folder: str, resume: str, w: dict, options: dict) -> Plan:
    """All cheap checks, in the order a user would fix them."""
    if dit.loras:
        raise ValueError(f"dit carries {len(dit.loras)} Z-Image LoRA(s): train on the base DiT straight from "
                         "Z-Image DiT Loader (for Turbo use base_mode turbo_adapter with the training adapter)")
    if (images is None) == (not folder.strip()):
        raise ValueError("give the training images either as the images input or as folder, not "
                         + ("both" if images is not None else "neither"))
    lora_root = save_folder("loras")
    name = plain_name(w["output_name"])
    adapter = w["training_adapter"]
    config = TrainConfig(
        base_mode=w["base_mode"], rank=w["rank"], alpha=w["alpha"] or None, steps=w["steps"],
        learning_rate=w["learning_rate"], timestep_sampling=w["timestep_sampling"], save_every=w["save_every"],
        keep_last=w["keep_last"], seed=w["seed"], trigger=w["trigger"].strip(), name=name,
        adapter_path=None if adapter == NO_ADAPTER else folder_paths.get_full_path_or_raise("loras", adapter),
        output_dir=free_path(lora_root, name, ""), **options)
    if config.base_mode is BaseMode.TURBO_ADAPTER:
        read_adapter(config)  # another model's LoRA fails here, before any encoding
    state = None
    if resume.strip():
        if not resume.strip().endswith(".state.safetensors"):
            raise ValueError(f"resume {resume!r}: give the .state.safetensors file of a checkpoint")
        state = Path(folder_paths.get_full_path_or_raise("loras", relative_name(resume, "resume")))
        done = int(read_state(state, config).meta["step"])
        if done >= config.steps:
            raise ValueError(f"resume {resume!r} is at step {done}; set steps above it to train further")
    examples = None
    if folder.strip():
        path = inside(folder_paths.get_input_directory(), folder, "folder")
        if not path.is_dir():
            raise ValueError(f"folder {folder!r}: no such folder in ComfyUI's input folder ({path})")
        examples = tuple(read_folder(path, w["default_caption"].strip() or None, config.trigger))
    ImageSize(w["width"], w["height"])  # previews and loss curve: multiples of 16
    prompts = tuple(apply_trigger(p, config.trigger, where="preview_prompts")
                    for p in prompt_lines(w["preview_prompts"]))
    captions = () if images is None else tuple(apply_trigger(c, config.trigger, where="captions")
                                               for c in caption_lines(w["captions"], len(images), w["default_caption"]))
    if config.dop_class:  # DOP needs the trigger word in every caption, to put the class word in its place
        for caption in captions or [example.caption for example in examples]:
            class_caption(caption, config.trigger, config.dop_class, where="captions")
    return Plan(config, state, examples, captions, parse_resolutions(w["resolutions"]), prompts, w["preview_every"],
                w["width"], w["height"], lora_root)


def encode(plan: Plan, text_encoder, vae, images, node_id) -> tuple[list, tuple[torch.Tensor, ...]]:
    """Training items (latents + caption features, CPU) and the features of the preview prompts, then of "" (the
    previews' negative where their sampler uses guidance)."""
    bar = Progress(1, node_id)
    te, ae = text_encoder.ready(), vae.ready()
    with torch.no_grad():
        if plan.examples is not None:
            items = build_items(plan.examples, ae, te, plan.resolutions, on_progress=bar.encoding,
                                dop_class=plan.config.dop_class, trigger=plan.config.trigger)
        else:
            items = images_from_tensor(images, plan.captions, ae, te, plan.resolutions, plan.config.trigger,
                                       on_progress=bar.encoding, dop_class=plan.config.dop_class)
        prompts = plan.prompts or default_preview_prompts(items[0].caption, plan.config.trigger)
        caps = tuple(te.encode([p])[0].cpu().clone() for p in (*prompts, ""))
    return [_normal_item(i) for i in items], caps


def fit(dit, items: list, plan: Plan, preview_caps: tuple, node_id):
    steps = plan.config.steps
    every = plan.preview_every if 0 < plan.preview_every < steps else steps
    previews = Previews(captions=preview_caps[:-1], every=every, width=plan.width, height=plan.height,
                        seed=plan.config.seed, negative=preview_caps[-1])
    core = dit.ready()
    _normal_tensors(core)
    progress = Progress(steps, node_id, dit.device)
    with torch.enable_grad():
        return train_lora(core, items, plan.config, on_step=progress.step, should_stop=progress.should_stop,
                          resume=plan.resume, empty_caption=preview_caps[-1], previews=previews,
                          on_preview=progress.preview)


def decode_previews(vae, previews: list) -> torch.Tensor:
    """Every preview (step order, prompts in order) decoded to one IMAGE batch."""
    if not previews:
        raise RuntimeError("the trainer returned no preview (it always samples one at the end)")
    ae, dev = vae.ready(), vae.device
    with torch.no_grad():
        pixels = [ae.decode(latents.to(dev)) for _, latents in previews]
    return host.pixels_to_image(torch.cat(pixels))


class Progress:
    """ComfyUI's progress bar and text for one node, and a cancel that lets the trainer save first."""

    def __init__(self, total: int, node_id, device: torch.device | None = None) -> None:
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.node_id, self.total, self.cancelled = node_id, total, False
        self.started, self.first = time.monotonic(), None
        self.previewer = latent_preview.get_previewer(device, comfy.latent_formats.Flux()) if device else None

    def encoding(self, done: int, total: int) -> None:
        self.bar.update_absolute(done, total)  # ComfyUI's hook raises on cancel: nothing to save yet
        self.text(f"encoding {done}/{total} training images")

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.first is None:  # the ETA counts this session's steps (a resume starts part-way)
            self.first = step - 1
        self.update(step)
        self.text(progress_line(step, self.total, loss, time.monotonic() - self.started, self.first))

    def preview(self, step: int, latents: torch.Tensor) -> None:
        if self.previewer is not None:
            self.update(step, self.previewer.decode_latent_to_preview_image("JPEG", latents[:1]))

    def update(self, step: int, image=None) -> None:
        try:
            self.bar.update_absolute(step, self.total, image)
        except mm.InterruptProcessingException:  # the hook cleared ComfyUI's flag: remember the request
            self.cancelled = True

    def should_stop(self) -> bool:
        return self.cancelled or mm.processing_interrupted()

    def text(self, line: str) -> None:
        if self.node_id is not None:
            from server import PromptServer

            PromptServer.instance.send_progress_text(line, self.node_id, PromptServer.instance.client_id)


def _normal_item(item):
    kept = item.preservation_features
    return replace(item, latent=item.latent.clone(), caption_features=item.caption_features.clone(),
                   preservation_features=None if kept is None else kept.clone())


def _normal_tensors(module: nn.Module) -> None:
    """Replace inference-mode parameters and buffers by equal normal tensors (autograd can save those)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_inference():
                m._parameters[name] = nn.Parameter(p.clone(), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_inference():
                m._buffers[name] = b.clone()


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (ZImageTrainLora, ZImageTrainOptions)}
