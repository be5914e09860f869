"""LoRA nodes: thin adapters over zimage_core.lora (read every trainer's format, apply at run time, inspect, convert,
save a DiT with its LoRAs merged).

Files are written the way ComfyUI's own savers (SaveImage, SaveLoRA, CheckpointSave) write them: never over an
existing file, with a counter, `<filename>_00001_.safetensors`, `<filename>_00002_…`. A ComfyUI user expects a re-run
to add a file, not to fail on the previous run's output nor to replace it. File names are plain names: no folder
parts, so nothing is written outside the configured model folders.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..zimage_core.keymaps import DiTLayout
from ..zimage_core.lora import (
    MergedDtype,
    TargetFormat,
    convert_lora,
    read_lora,
    save_lora,
    save_merged_dit,
)
from ..zimage_core.lora.report import report_lines
from . import _host as host
from ._hosting import with_loras

_LORA_NAME = "models/loras: any Z-Image LoRA file (musubi-tuner, AI Toolkit, DiffSynth, diffusion-pipe, ComfyUI's " \
             "trainer, LyCORIS LoHa/LoKr, DoRA). A LoRA for another model (Flux, SDXL, Lumina-2) is refused with a " \
             "clear error."
_FILENAME = "A plain file name (no folders, no '..'): written as <filename>_00001_.safetensors, the counter going up " \
            "instead of overwriting, as ComfyUI's own savers do. Press R (refresh) to see it in the lists."


class ZImageLoraLoader:
    TITLE = "Z-Image LoRA"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Applies a Z-Image LoRA of any trainer's format (musubi-tuner, AI Toolkit, DiffSynth, "
                   "diffusion-pipe, ComfyUI's trainer, LyCORIS LoHa/LoKr, DoRA) to a Z-Image DiT, without changing "
                   "the base weights. Chain several; the report lists what matched.")
    RETURN_TYPES = (host.ZIMAGE_DIT, "STRING")
    RETURN_NAMES = ("dit", "report")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit": (host.ZIMAGE_DIT, {"tooltip": "From Z-Image DiT Loader or another Z-Image LoRA node (they stack)."}),
            "lora_name": (folder_paths.get_filename_list("loras"), {
                "tooltip": f"{_LORA_NAME} q/k/v and fused qkv layouts both apply exactly."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Multiplies the LoRA's change. Several LoRAs at 1.0 can overcook Turbo; "
                                              "lower each (e.g. 0.6–0.8) or turn on normalise."}),
        }, "optional": {
            "normalise": ("BOOLEAN", {"default": False, "tooltip": (
                "Bound the whole LoRA stack for Turbo: the strengths of this LoRA and of every Z-Image LoRA node "
                "before it in the chain are scaled by one common factor so that their absolute values sum to at "
                "most 1.0 (ratios and signs kept; a stack already within 1.0 is unchanged). Turbo is step-distilled "
                "and tolerates about one LoRA's worth of change. Once on, it stays on for the LoRA nodes after this "
                "one in the chain; turn it on at the last node to normalise the whole stack.")}),
        }}

    def apply(self, dit, lora_name: str, strength: float, normalise: bool = False):
        lora = read_lora(folder_paths.get_full_path_or_raise("loras", lora_name))
        hosted, reports = with_loras(dit, (*dit.loras, (lora, strength)), normalise)
        lines = [r.text() for r in reports]
        if hosted.normalise:
            asked = ", ".join(f"{s:g}" for _, s in hosted.loras)
            lines.insert(0, f"normalised stack (Σ|strength| ≤ 1): asked {asked} → applied "
                            + ", ".join(f"{s:.4g}" for _, s in hosted.applied_loras))
        return (hosted, text(lines))


class ZImageLoraInspect:
    TITLE = "Z-Image LoRA Inspect"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Reads a LoRA file and reports its format (which trainer wrote it), rank, alpha, adapter kinds, "
                   "the modules it changes, keys that name no Z-Image module, and its metadata.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "inspect"
    OUTPUT_NODE = True  # runs on its own; the report is in /history (ui text) as well as on the output

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": _LORA_NAME})}}

    def inspect(self, lora_name: str):
        report = text(report_lines(read_lora(folder_paths.get_full_path_or_raise("loras", lora_name))))
        return shown(report)


class ZImageLoraConvert:
    TITLE = "Z-Image LoRA Convert"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Converts a LoRA of any trainer's format into the layout ComfyUI's own LoRA loaders (comfy), "
                   "diffusers or musubi-tuner read, with rank and alpha kept; written beside the source in its loras "
                   "folder.")
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("lora_name", "report")
    FUNCTION = "convert"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": _LORA_NAME}),
            "to": ([t.value for t in TargetFormat], {
                "tooltip": "comfy: ComfyUI's native LoraLoader / LoraLoaderModelOnly load every key. diffusers: "
                           "ZImagePipeline.load_lora_weights (PEFT, alpha folded in). musubi: musubi-tuner / kohya."}),
            "filename": ("STRING", {"default": "zimage_converted",
                                    "tooltip": f"{_FILENAME} The target format is added: <filename>_<to>_00001_."}),
        }, "optional": {
            "lokr_rank": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": (
                "LoHa/LoKr to diffusers or musubi only (these have no LyCORIS form there): the LoRA rank of the SVD. "
                "0 = the smallest rank that keeps 99.99% of the change; the error is in the report.")}),
        }}

    def convert(self, lora_name: str, to: str, filename: str, lokr_rank: int = 0):
        to = TargetFormat(to)
        stem = f"{plain_name(filename)}_{to.value}"
        source = Path(folder_paths.get_full_path_or_raise("loras", lora_name))
        converted = convert_lora(read_lora(source), to, lokr_rank=lokr_rank or None)
        path = free_path(source.parent, stem, ".safetensors")
        save_lora(converted, path)
        name = os.path.join(os.path.dirname(lora_name), path.name)
        report = text([f"wrote {path}", *(f"{k}: {v}" for k, v in converted.metadata.items()
                                          if k.startswith("zimage_")), *converted.notes])
        return shown(report, name)


class ZImageSaveMergedDiT:
    TITLE = "Z-Image Save Merged DiT"
    CATEGORY = host.CATEGORY
    DESCRIPTION = ("Saves the DiT with the LoRAs of its Z-Image LoRA chain merged into the weights (at the strengths "
                   "they are applied with), as a ComfyUI single file or as an official sharded folder.")
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("dit_name", "report")
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit": (host.ZIMAGE_DIT, {"tooltip": "From Z-Image DiT Loader or a Z-Image LoRA node: the base weights "
                                                 "plus every LoRA of the chain are merged (native MODEL patches are "
                                                 "not part of it)."}),
            "filename": ("STRING", {"default": "zimage_merged", "tooltip": _FILENAME}),
            "layout": ([layout.value for layout in DiTLayout], {
                "tooltip": "comfy: one file in models/diffusion_models (UNETLoader and Z-Image DiT Loader take it). "
                           "diffusers: the official layout, models/diffusers/<filename>_00001_/transformer/ (config "
                           "and shards; Z-Image DiT Loader lists it as <filename>_00001_/, diffusers reads it)."}),
            "dtype": ([d.value for d in MergedDtype], {
                "tooltip": "bf16: as the official release. fp16, fp32. fp8_e4m3fn (comfy layout only): about half "
                           "the size, ComfyUI's scaled fp8 (one scale per weight), slightly lower quality."}),
        }}

    def save(self, dit, filename: str, layout: str, dtype: str):
        layout, dtype, stem = DiTLayout(layout), MergedDtype(dtype), plain_name(filename)
        loras = dit.applied_loras
        path, name = _save_merged(dit.ready(), loras, stem, layout, dtype)
        merged = [f"  {lora.name} at strength {s:.4g}" for lora, s in loras] or ["  (no LoRA: the base weights)"]
        report = text([f"wrote {path} ({layout.value} layout, {dtype.value})", "merged:", *merged])
        return shown(report, name)


def _save_merged(core, loras: list, stem: str, layout: DiTLayout, dtype: MergedDtype) -> tuple[Path, str]:
    """save_merged_dit into the model folder of `layout`; returns the path written and the DiT loader's name for it:
    a file in diffusion_models, or an official root in diffusers with the DiT in its transformer/."""
    if layout is DiTLayout.COMFY:
        path = save_merged_dit(core, loras, free_path(save_folder("diffusion_models"), stem, ".safetensors"),
                               layout, dtype)
        return path, path.name
    root = free_path(save_folder("diffusers"), stem, "")
    root.mkdir()
    try:
        return save_merged_dit(core, loras, root / "transformer", layout, dtype), f"{root.name}/"
    except BaseException:
        root.rmdir()  # save_merged_dit leaves nothing behind; neither does this
        raise


def plain_name(filename: str) -> str:
    """The user's file name, refused unless it is a plain name that stays inside the target folder."""
    name = filename.strip()
    if not name or name in (".", "..") or any(c in name for c in "/\\:") or os.path.isabs(name) or ".." in name:
        raise ValueError(f"filename {filename!r}: give a plain file name without folders or '..' (it is saved in "
                         "the model folder)")
    return name


def free_path(folder: Path, stem: str, suffix: str) -> Path:
    """`folder/<stem>_NNNNN_<suffix>` with the next free counter (ComfyUI's `get_save_image_path` rule)."""
    folder, stem, counter, _, _ = folder_paths.get_save_image_path(stem, os.path.abspath(folder))
    return Path(folder) / f"{stem}_{counter:05}_{suffix}"


def save_folder(kind: str) -> Path:
    """Where new models of `kind` go: the first configured folder that exists (created if none does)."""
    folders = [Path(p) for p in folder_paths.get_folder_paths(kind)]
    folder = next((p for p in folders if p.is_dir()), folders[0])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shown(report: str, *outputs) -> dict:
    """An output node's return (ComfyUI 0.3.75): its outputs, then `report`, and the report as ui text too, so API
    clients find it in /history and no Preview Any node is needed to get it."""
    return {"ui": {"text": [report]}, "result": (*outputs, report)}


def text(lines: list[str]) -> str:
    """Report lines as one STRING. Each line ends in two spaces, a Markdown hard break: ComfyUI's Preview Any shows
    a STRING as Markdown, which would otherwise run the lines together into one paragraph."""
    return "  \n".join(line for chunk in lines for line in chunk.splitlines())


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (ZImageLoraLoader, ZImageLoraInspect, ZImageLoraConvert,
                                                     ZImageSaveMergedDiT)}
