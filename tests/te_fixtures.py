"""Tiny random Qwen3 text encoders in every real layout, and tiny Qwen tokenizers, written by the tests.

The reference weights come from a `transformers.Qwen3Model`; the layouts follow ZIMAGE_SPEC §3 (HF
`model.` names, bare `Qwen3Model` names, ComfyUI's all-in-one container, ComfyUI fp8) and are
written here independently of `zimage_core.text_encoder`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from zimage_fixtures import write_shards

# hidden 64 = the tiny DiT's cap_feat_dim (zimage_fixtures.TINY); 3 layers, so one layer runs after L−2.
TINY_TE = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
               intermediate_size=128, vocab_size=288)
AIO_PREFIX = "text_encoders.qwen3_4b.transformer."

# The behaviour of Qwen3's chat template for plain messages, written compactly: no system prompt unless
# one is given, and the empty think block only when enable_thinking is False.
QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A few byte-level BPE merges so that the tiny tokenizer really merges ("Ġ" is a space).
_MERGES = [("Ġ", "a"), ("a", "t"), ("Ġ", "c"), ("Ġc", "at"), ("u", "s"), ("us", "e"), ("use", "r"), ("Ġ", "t"),
           ("h", "e"), ("Ġt", "he")]


def qwen3_model(seed: int = 0, **overrides):
    """A transformers Qwen3Model (fp32) with every parameter random: norms ≈ 1, matrices ~ N(0, 1/fan_in)."""
    from transformers import Qwen3Config, Qwen3Model

    cfg = Qwen3Config(**{**TINY_TE, **overrides}, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    model = Qwen3Model(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name == "embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


def hf_state_dict(model, lm_head: bool = False) -> dict[str, torch.Tensor]:
    """Qwen3ForCausalLM / ComfyUI `qwen_3_4b.safetensors` names: `model.` + the Qwen3Model names."""
    sd = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if lm_head:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    return sd


def write_official(sd: dict[str, torch.Tensor], root: Path, n_shards: int = 2) -> Path:
    """The diffusers model root: root/text_encoder/model-0000i-of-0000n.safetensors + index, root/tokenizer/."""
    te = write_shards(sd, Path(root) / "text_encoder", "model", n_shards)
    (te / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}))
    write_tiny_tokenizer(Path(root) / "tokenizer")
    return Path(root)


_FP8_TARGET = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


def scaled_fp8_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Legacy ComfyUI scaled fp8: top-level `scaled_fp8` marker, scalar `<layer>.scale_weight` (W = W8 · scale)."""
    out = dict(sd)
    for k in [k for k in sd if _FP8_TARGET.search(k)]:
        scale = sd[k].abs().max().float() / 448.0
        out[k] = (sd[k].float() / scale).to(torch.float8_e4m3fn)
        out[k.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        out[k.removesuffix("weight") + "scale_input"] = torch.ones(())
    out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    return out


def comfy_quant_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Newer ComfyUI quant layout: `<layer>.weight_scale` + `<layer>.comfy_quant` (uint8 JSON)."""
    out = dict(sd)
    blob = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    for k in [k for k in sd if _FP8_TARGET.search(k)]:
        scale = sd[k].abs().max().float() / 448.0
        out[k] = (sd[k].float() / scale).to(torch.float8_e4m3fn)
        out[k.removesuffix("weight") + "weight_scale"] = scale.reshape(())
        out[k.removesuffix("weight") + "comfy_quant"] = blob.clone()
    return out


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte 0..255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def _tokenizer_config(added: dict[int, str], template: str) -> dict:
    return {
        "tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
        "model_max_length": 131072, "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, t in added.items()},
        "chat_template": template,
    }


def write_tiny_tokenizer(folder: Path) -> Path:
    """A byte-level BPE Qwen2Tokenizer of 269 tokens (vocab.json + merges.txt + a Qwen3-style config)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = _byte_alphabet() + [a + b for a, b in _MERGES]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))
    added = {len(tokens) + i: t for i, t in enumerate(SPECIALS)}
    (folder / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(added, QWEN3_STYLE_TEMPLATE)))
    return folder


# Qwen3's added tokens (tokenizer_config.json of the Qwen3 release); 151643..151664 as in Qwen2.5.
_QWEN3_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
                "<tool_response>", "</tool_response>", "<think>", "</think>"]


def write_qwen3_style_tokenizer(folder: Path, bpe_from: Path) -> Path:
    """A Qwen3-configured tokenizer: the real Qwen BPE files of `bpe_from` (linked), Qwen3's added tokens
    and a Qwen3-style chat template."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).symlink_to(Path(bpe_from).resolve() / name)
    added = {151643 + i: t for i, t in enumerate(_QWEN3_ADDED)}
    (folder / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(added, QWEN3_STYLE_TEMPLATE)))
    return folder
