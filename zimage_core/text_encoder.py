"""The Qwen3-4B text encoder of Z-Image (ZIMAGE_SPEC §3): prompt → one (L_i, hidden) tensor per prompt.

Layouts (told from headers): the official `text_encoder/` shards + index (HF `model.layers.…` names,
an `lm_head.weight` is ignored), a model root holding it, ComfyUI's single `qwen_3_4b.safetensors`
(the same names), a bare `Qwen3Model` file (`layers.…`), and the text encoder inside a ComfyUI
all-in-one checkpoint (`text_encoders.qwen3_4b.transformer.`). ComfyUI fp8 files (legacy
`scaled_fp8` + `<layer>.scale_weight`, newer `<layer>.weight_scale` + `<layer>.comfy_quant`) are
dequantised to `dtype`, or kept in float8 with a per-row scale under `WeightFormat.FP8`.

Output: the raw output of decoder layer L−2 (HF `hidden_states[-2]`, before the final norm), so the
last decoder layer and the final norm never run. They are validated like every key (strict, from
the headers) but not read: the model held is a `transformers.Qwen3Model` with L−1 layers and
`norm = Identity`. Prompts are wrapped in the fixed Qwen3 chat template (no system prompt; the
tokenizer's own chat_template is ignored: ComfyUI's bundled Qwen2.5 one would add a system prompt),
capped at 512 tokens including the template as diffusers does, and encoded one by one without
padding, so a prompt's embedding never depends on the prompts beside it.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checkpoint import IGNORED_LEAVES, SCALE_LEAVES, Piece, QuantFormat, check_keys, quant_format, stream_weights
from .config import WeightFormat
from .dit import Linear
from .inspection import text_encoder_config
from .keymaps import split_key
from .probe import FOREIGN_NAMES, ModelKind, classify
from .sources import Source, open_source

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Qwen3Config

TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # Qwen3 template, enable_thinking=True
MAX_TOKENS = 512  # template included (diffusers/official); ComfyUI's native encoder has no cap
NO_TOKENIZER = ("no tokenizer: pass --tokenizer FOLDER (the model's tokenizer/ folder; inside ComfyUI the host's "
                "bundled comfy/text_encoders/qwen25_tokenizer is used)")

_CONTAINER = re.compile(r"^text_encoders\.\w+\.transformer\.")  # ComfyUI all-in-one checkpoint
_FP8_TARGETS = re.compile(r"^layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
_NOT_QWEN3 = (  # exact bare key -> what a file holding it is
    ("layers.0.self_attn.k_proj.bias", "a Qwen2/Qwen2.5-style text encoder (q/k/v biases, no q_norm/k_norm)"),
    ("layers.0.pre_feedforward_layernorm.weight", "a Gemma text encoder"),
    ("text_model.encoder.layers.0.self_attn.q_proj.weight", "a CLIP text encoder"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 encoder"),
)
_KINDS = {ModelKind.ZIMAGE_DIT: "a Z-Image DiT", **FOREIGN_NAMES}


@dataclass(frozen=True)
class TextEncoderConfig:
    """A Qwen3 decoder's shape. `head_dim` is explicit: Qwen3-4B has 32 × 128 > hidden 2560."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float = 1e6
    rms_eps: float = 1e-6
    max_positions: int = 40960

    def __post_init__(self) -> None:
        if self.layers < 2:
            raise ValueError(f"TextEncoderConfig: {self.layers} layers; hidden_states[-2] needs at least 2")
        if self.heads % self.kv_heads:
            raise ValueError(f"TextEncoderConfig: {self.heads} heads is not a multiple of {self.kv_heads} kv heads")

    @classmethod
    def from_key_shapes(cls, shapes: dict[str, Sequence[int]]) -> TextEncoderConfig:
        """Infer from bare `Qwen3Model` key → shape (`layers.0.self_attn.q_norm.weight`, …)."""
        hf = text_encoder_config(shapes)
        missing = [k for k, v in hf.items() if not v]
        if missing:
            raise ValueError(f"not a Qwen3 decoder: cannot read {missing} from its keys (needs embed_tokens, "
                             "layers.0.self_attn.{q,k}_proj/q_norm, layers.0.mlp.gate_proj)")
        return cls(hidden=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                   kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"],
                   intermediate=hf["intermediate_size"], vocab=hf["vocab_size"])

    def to_hf(self, layers: int | None = None) -> Qwen3Config:
        """A `transformers.Qwen3Config` (no download); `layers` overrides the depth."""
        from transformers import Qwen3Config

        return Qwen3Config(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=layers or self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_eps,
                           rope_theta=self.rope_theta, max_position_embeddings=self.max_positions,
                           tie_word_embeddings=True, attention_bias=False, use_cache=False,
                           attn_implementation="sdpa")


QWEN3_4B = TextEncoderConfig(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728,
                             vocab=151936)


@dataclass
class TextEncoderPlan:
    source: Source
    prefix: str  # stored key = prefix + bare key
    quant: QuantFormat
    config: TextEncoderConfig
    pieces: dict[str, list[Piece]]  # bare key -> stored tensor, for the layers that run (0..L-2, embeddings)
    shapes: dict[str, tuple[int, ...]]  # every bare key of the file, validated
    scales: dict[str, Piece]  # stored key of an fp8 weight -> its scale
    dropped: list[str]  # bare keys validated but never read (last layer, final norm)
    ignored: list[str]  # stored keys with no use (lm_head, fp8 markers, activation scales)


def plan_text_encoder(path: str | Path | Source) -> TextEncoderPlan:
    """Detect the layout, map stored keys to `Qwen3Model` names, infer and check the config: headers only."""
    src = path if isinstance(path, Source) else open_source(path, component="text_encoder")
    tensors, prefix, bare, ignored, stray = _split_keys(src)
    _refuse_foreign(src, classify(tensors), bare)
    quant = quant_format(bare)
    pieces: dict[str, list[Piece]] = {}
    scales: dict[str, Piece] = {}
    for key, (header, info) in bare.items():
        module, leaf = split_key(key)
        if leaf in IGNORED_LEAVES:
            ignored.append(prefix + key)
        elif leaf in SCALE_LEAVES:
            scales[f"{prefix}{module}.weight"] = Piece(header, prefix + key, info)
        else:
            pieces[key] = [Piece(header, prefix + key, info)]
    orphans = sorted(k for k in scales if k.removeprefix(prefix) not in pieces)
    if orphans:
        raise ValueError(f"{src.path}: fp8 scales without a weight: {orphans[:5]}")
    if scales and quant is QuantFormat.NONE:
        quant = QuantFormat.SCALED_FP8  # legacy: `<layer>.scale_weight` (+ a `scaled_fp8` marker, ignored)
    shapes = {k: ps[0].info.shape for k, ps in pieces.items()}
    try:
        config = TextEncoderConfig.from_key_shapes(shapes)
    except ValueError as e:
        raise ValueError(f"{src.path}: {e}") from None
    _check_keys(src, config, shapes, prefix, stray)
    last = f"layers.{config.layers - 1}."
    dropped = sorted(k for k in pieces if k.startswith(last) or k == "norm.weight")
    run = {k: ps for k, ps in pieces.items() if k not in dropped}
    return TextEncoderPlan(src, prefix, quant, config, run, shapes, scales, dropped, sorted(ignored))


def _split_keys(src: Source) -> tuple[dict, str, dict, list[str], list[str]]:
    """(the text encoder's stored tensors, prefix, bare key -> tensor, ignored keys, keys outside the prefix).

    In an all-in-one checkpoint only the `text_encoders.<name>.transformer.` container is looked at.
    """
    tensors = src.tensors()
    container = next((m.group(0) for k in tensors if (m := _CONTAINER.match(k))), "")
    if container:
        tensors = {k: v for k, v in tensors.items() if k.startswith(container)}
    prefix = container + ("model." if any(k.startswith(f"{container}model.layers.") for k in tensors) else "")
    bare, ignored, stray = {}, [], []
    for key, value in tensors.items():
        rest = key.removeprefix(container)
        if rest == "scaled_fp8" or rest.startswith("lm_head."):
            ignored.append(key)
        elif key.startswith(prefix):
            bare[key.removeprefix(prefix)] = value
        else:
            stray.append(key)
    return tensors, prefix, bare, ignored, stray


def _refuse_foreign(src: Source, kind: ModelKind, bare: dict) -> None:
    what = next((name for key, name in _NOT_QWEN3 if key in bare), None)
    if what is None and kind is not ModelKind.TEXT_ENCODER:
        what = _KINDS.get(kind, "not a text encoder checkpoint")
    elif what is None and "layers.0.self_attn.q_norm.weight" not in bare:
        what = "a decoder without per-head q_norm/k_norm (Llama/Qwen2-style)"
    if what:
        raise ValueError(f"{src.path}: this is {what}, not a Qwen3 text encoder (Z-Image needs Qwen3-4B: keys "
                         "like model.layers.N.self_attn.q_norm.weight, no q/k/v biases)")


def _check_keys(src: Source, config: TextEncoderConfig, shapes: dict, prefix: str, stray: list[str]) -> None:
    from transformers import Qwen3Model

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Qwen3Model(config.to_hf()).state_dict().items()}
    where = f"{src.path} (Qwen3 text encoder, {config.layers} layers, hidden {config.hidden}, prefix {prefix!r})"
    check_keys(where, expected, shapes, stored=lambda k: prefix + k, stray=stray)


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The Qwen tokenizer in `folder` (tokenizer.json, or vocab.json + merges.txt), from local files only."""
    from transformers import AutoTokenizer

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such tokenizer folder")
    if not (folder / "tokenizer.json").is_file() and not all((folder / f).is_file() for f in ("vocab.json",
                                                                                               "merges.txt")):
        raise ValueError(f"{folder}: not a Qwen tokenizer folder (needs tokenizer.json or vocab.json + merges.txt)")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)


def _resolve_tokenizer(path: str | Path, tokenizer: str | PathLike | PreTrainedTokenizerBase | None
                       ) -> PreTrainedTokenizerBase:
    """An explicit folder or tokenizer, else the sibling `tokenizer/` of an official model root."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer) if isinstance(tokenizer, (str, PathLike)) else tokenizer
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    roots = ([folder] if path.is_dir() else []) + ([folder.parent] if folder.name == "text_encoder" else [])
    for root in roots:  # the model root itself, or the root above its text_encoder/ folder
        if (root / "text_encoder").is_dir() and (root / "tokenizer").is_dir():
            return load_tokenizer(root / "tokenizer")
    raise ValueError(f"{path}: {NO_TOKENIZER}")


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of `prompt` in the chat template, cut to MAX_TOKENS (with a warning) as diffusers does."""
    ids = list(tokenizer(TEMPLATE.format(prompt))["input_ids"])
    if len(ids) > MAX_TOKENS:
        warnings.warn(f"prompt is {len(ids)} tokens with the chat template; the last {len(ids) - MAX_TOKENS} "
                      f"(with the template's closing tokens) are dropped to fit the {MAX_TOKENS}-token cap. "
                      "diffusers and the official pipeline do the same; ComfyUI's native text encoder keeps the "
                      "whole prompt", stacklevel=3)
        ids = ids[:MAX_TOKENS]
    return ids


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, config: TextEncoderConfig, where: Path) -> None:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"{where}: the tokenizer lacks the Qwen chat tokens <|im_start|>/<|im_end|>; "
                         "pass the model's Qwen tokenizer")
    if len(tokenizer) > config.vocab:
        raise ValueError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the text encoder's vocabulary "
                         f"is {config.vocab}; they belong to different models")


def load_text_encoder(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                      weight_format: WeightFormat = WeightFormat.COMPUTE,
                      tokenizer: str | PathLike | PreTrainedTokenizerBase | None = None) -> TextEncoder:
    """Load a Qwen3 text encoder from any layout above, streamed, strictly; see the module docstring.

    `tokenizer`: a folder, an already loaded tokenizer, or None for the official root's `tokenizer/`.
    Every check (keys, shapes, tokenizer) runs before any weight is read. On the CPU a tensor kept as
    stored is a copy-on-write view of the file mapping.
    """
    plan = plan_text_encoder(path)
    tok = _resolve_tokenizer(path, tokenizer)
    _check_tokenizer(tok, plan.config, plan.source.path)
    from transformers import Qwen3Model
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    device = torch.device(device)
    hf = plan.config.to_hf(layers=plan.config.layers - 1)
    with torch.device("meta"):
        model = Qwen3Model(hf)
        model.norm = nn.Identity()  # hidden_states[-2] is taken before the final norm
        if weight_format is WeightFormat.FP8:
            _use_scaled_linears(model)
    fp8 = (lambda key: bool(_FP8_TARGETS.match(split_key(key)[0]))) if weight_format is WeightFormat.FP8 else None
    stream_weights(model, plan.source.headers, plan.pieces, plan.shapes, device, dtype, plan.scales, fp8)
    with torch.device(device):  # non-persistent buffers are not in the file: rebuild them where they run
        model.rotary_emb = Qwen3RotaryEmbedding(hf)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{plan.source.path}: tensors left unloaded: {left[:5]}")
    return TextEncoder(model.eval().requires_grad_(False), tok, plan.config)


def _use_scaled_linears(model: nn.Module) -> None:
    """Swap the block projections for `dit.Linear`, which holds float8 weights + `scale_weight` (on meta)."""
    for name, module in list(model.named_modules()):
        if _FP8_TARGETS.match(name):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Linear(module.in_features, module.out_features, bias=False))


class TextEncoder:
    """A loaded Qwen3 text encoder (layers 0..L−2) with its tokenizer and a small per-text cache.

    `encode` returns fresh tensors (clones of the cache), so a caller may modify them freely. The
    cache keeps the `cache_size` most recently used texts (0 keeps none).
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: TextEncoderConfig,
                 cache_size: int = 16) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """One (L_i, hidden) tensor per prompt, in the model's dtype and device (a bare str is one prompt)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        done: dict[str, torch.Tensor] = {}
        for text in dict.fromkeys(prompts):
            if text in self._cache:
                self._cache.move_to_end(text)
                done[text] = self._cache[text]
            else:
                done[text] = self._run(tokenize_prompt(self.tokenizer, text))
                self._cache[text] = done[text]
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return [done[text].clone() for text in prompts]

    @torch.inference_mode()
    def _run(self, ids: list[int]) -> torch.Tensor:
        input_ids = torch.tensor([ids], device=self.device)  # (1, L) one unpadded prompt
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state[0]  # (L, hidden)
