"""LoRA tensor keys → (canonical DiT target, adapter leaf), for every trainer's naming (ZIMAGE_SPEC §6).

A key is `<container prefix><module path><adapter leaf>`:
- container prefixes: `diffusion_model.`, `model.diffusion_model.`, `transformer.`, `base_model.model.`,
  none (DiffSynth), or the kohya forms `lora_unet_` / `lycoris_` whose module path has `_` for `.`;
- module paths in either DiT naming (official/diffusers `attention.to_q`, `to_out.0`, `all_x_embedder.2-1`,
  or ComfyUI's `attention.qkv`, `attention.out`, `x_embedder`): both resolve through the one key-map table,
  `keymaps.to_canonical`, so q/k/v land on row blocks of the fused qkv;
- adapter leaves: PEFT `lora_A`/`lora_B` (`.default`), kohya `lora_down`/`lora_up`/`lora_mid`, `alpha`,
  ComfyUI's `diff`/`diff_b`, LyCORIS `hada_*`/`lokr_*`, DoRA `dora_scale`/`lora_magnitude_vector`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..keymaps import BLOCK_PREFIXES, DiTLayout, Target, to_canonical

DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.", "unet.")
KOHYA_PREFIXES = ("lora_unet_", "lycoris_")

# Leaf → the role of the tensor in its adapter. Longest patterns first (they are tried in order).
_LEAVES = [
    (r"lora_A(?:\.default)?\.weight", "down"), (r"lora_B(?:\.default)?\.weight", "up"),
    (r"lora_down\.weight", "down"), (r"lora_up\.weight", "up"), (r"lora_mid\.weight", "mid"),
    (r"lora\.down\.weight", "down"), (r"lora\.up\.weight", "up"),
    (r"lora_magnitude_vector(?:\.default)?(?:\.weight)?", "dora_scale"), (r"dora_scale", "dora_scale"),
    (r"hada_w1_a", "w1a"), (r"hada_w1_b", "w1b"), (r"hada_w2_a", "w2a"), (r"hada_w2_b", "w2b"),
    (r"hada_t1", "t1"), (r"hada_t2", "t2"),
    (r"lokr_w1_a", "w1_a"), (r"lokr_w1_b", "w1_b"), (r"lokr_w2_a", "w2_a"), (r"lokr_w2_b", "w2_b"),
    (r"lokr_w1", "w1"), (r"lokr_w2", "w2"), (r"lokr_t2", "t2"),
    (r"alpha", "alpha"), (r"diff_b", "diff_b"), (r"diff", "diff"),
]
_LEAF = re.compile(r"^(.+?)[._](" + "|".join(p for p, _ in _LEAVES) + r")$")
_ROLE = [(re.compile(rf"^(?:{p})$"), role) for p, role in _LEAVES]

# Module paths inside a block and at the top level, in both namings, for resolving kohya `_` names.
_BLOCK_MODULES = ("attention.qkv", "attention.out", "attention.to_q", "attention.to_k", "attention.to_v",
                  "attention.to_out.0", "attention.q_norm", "attention.k_norm", "attention.norm_q", "attention.norm_k",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0", "attention_norm1",
                  "attention_norm2", "ffn_norm1", "ffn_norm2")
_TOP_MODULES = ("x_embedder", "all_x_embedder.2-1", "final_layer.linear", "final_layer.adaLN_modulation.1",
                "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1", "cap_embedder.0",
                "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2")
_KOHYA_BLOCK = re.compile(rf"^({'|'.join(BLOCK_PREFIXES)})_(\d+)_(.+)$")
_KOHYA_INNER = {m.replace(".", "_"): m for m in _BLOCK_MODULES}
_KOHYA_TOP = {m.replace(".", "_"): m for m in _TOP_MODULES}


@dataclass(frozen=True)
class ParsedKey:
    key: str
    group: str  # the key without its leaf: every tensor of one module's adapter shares it
    module: str  # the module path as written, dotted (in the file's own naming)
    target: Target  # canonical module and row block
    role: str  # "down", "up", "alpha", "w1a", …
    prefix: str


def parse_key(key: str) -> ParsedKey | None:
    """The target and role of one LoRA tensor key, or None if it names no Z-Image DiT module."""
    prefix = next((p for p in KOHYA_PREFIXES + DOTTED_PREFIXES if key.startswith(p)), "")
    m = _LEAF.match(key[len(prefix):])
    if not m:
        return None
    path, leaf = m.groups()
    role = next(r for pattern, r in _ROLE if pattern.match(leaf))
    module = _kohya_module(path) if prefix in KOHYA_PREFIXES else path
    if module is None or not _known(module):
        return None
    target = to_canonical(module, DiTLayout.DIFFUSERS)  # ComfyUI names pass through the diffusers table unchanged
    return ParsedKey(key, key[:len(prefix) + len(path)], module, target, role, prefix)


def _kohya_module(path: str) -> str | None:
    """'layers_0_attention_to_out_0' → 'layers.0.attention.to_out.0' (a fixed table, not `_` → `.`: names such as
    `feed_forward` and `adaLN_modulation` have underscores of their own)."""
    if m := _KOHYA_BLOCK.match(path):
        block, index, inner = m.groups()
        return f"{block}.{index}.{_KOHYA_INNER[inner]}" if inner in _KOHYA_INNER else None
    return _KOHYA_TOP.get(path)


def _known(module: str) -> bool:
    parts = module.split(".")
    if parts[0] in BLOCK_PREFIXES and len(parts) > 2 and parts[1].isdigit():
        return ".".join(parts[2:]) in _BLOCK_MODULES
    return module in _TOP_MODULES
