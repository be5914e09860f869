"""The Qwen3 text encoder: every layout loads strictly to the same weights, and prompts encode as diffusers does.

Locks in: the hard-coded chat template (= Qwen3's template with enable_thinking=True, no system prompt),
the layer read (raw output of layer L−2 = HF hidden_states[-2], the last layer and the final norm never
read), the 512-token cap with the template included (and its warning), padding dropped, layouts
(official shards + index + lm_head, model root, ComfyUI single file, bare Qwen3Model names, all-in-one
container, legacy scaled fp8, comfy_quant fp8, fp8 kept in memory), refusals of foreign or broken files
before any tensor data is read, tokenizer resolution, ComfyUI's bundled tokenizer giving the same ids as
a Qwen3 one, and the per-text cache. Reference: diffusers 0.42.1 `ZImagePipeline.encode_prompt` on a
transformers Qwen3Model with the same random weights (fp32, CPU). Bound: max |ours − ref| / max |ref| ≤ 1e-5.
"""

import re

import pytest
import torch
from safetensors.torch import save_file

import te_fixtures as tf
from comfy_host import HOST_DIR
from zimage_core import WeightFormat
from zimage_core.dit import Linear
from zimage_core.text_encoder import (
    MAX_TOKENS,
    NO_TOKENIZER,
    QWEN3_4B,
    TEMPLATE,
    TextEncoderConfig,
    load_text_encoder,
    load_tokenizer,
    plan_text_encoder,
    tokenize_prompt,
)
from zimage_fixtures import dequantised, manifest, rel_err

BOUND = 1e-5
COMFY_TOKENIZER = HOST_DIR / "comfy" / "text_encoders" / "qwen25_tokenizer"
PROMPT_SETS = [
    ["a photo of a cat"],
    ["the cat sat on the mat, at noon", "", "Zürich 2024: a tiny {red} fox\nin the snow"],
]


@pytest.fixture(scope="module")
def ref():
    return tf.qwen3_model(seed=3)


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    sd = tf.hf_state_dict(ref)
    d = tmp_path_factory.mktemp("te")
    tf.write_official(tf.hf_state_dict(ref, lm_head=True), d / "root")
    tf.write_tiny_tokenizer(d / "tokenizer")
    save_file(sd, d / "qwen_3_4b.safetensors")
    save_file({k.removeprefix("model."): v for k, v in sd.items()}, d / "bare.safetensors")
    save_file({**{tf.AIO_PREFIX + k: v for k, v in sd.items()},  # ComfyUI all-in-one checkpoint
               "model.diffusion_model.cap_embedder.1.weight": torch.zeros(8, 64),
               "model.diffusion_model.x_embedder.weight": torch.zeros(8, 64),
               "vae.decoder.conv_in.weight": torch.zeros(8, 16, 3, 3)}, d / "all_in_one.safetensors")
    save_file(tf.scaled_fp8_state_dict(sd), d / "scaled_fp8.safetensors")
    save_file(tf.comfy_quant_state_dict(sd), d / "comfy_quant.safetensors")
    return d


@pytest.fixture(scope="module")
def te(files):
    return load_text_encoder(files / "root", dtype=torch.float32)  # tokenizer found beside text_encoder/


@pytest.fixture(scope="module")
def diffusers_pipe(ref, te):
    from diffusers import ZImagePipeline

    return ZImagePipeline(scheduler=None, vae=None, text_encoder=ref, tokenizer=te.tokenizer, transformer=None)


def kept_weights(ref) -> dict[str, torch.Tensor]:
    """What the loaded encoder must hold: everything but the last layer and the final norm."""
    last = f"layers.{ref.config.num_hidden_layers - 1}."
    return {k: v for k, v in ref.state_dict().items() if not k.startswith(last) and k != "norm.weight"}


def test_template_is_qwen3_chat_template_with_thinking_enabled(te):
    """Breaks if TEMPLATE drifts from what diffusers' apply_chat_template(enable_thinking=True) renders."""
    for prompt in ["a cat", "", "two\nlines {x}"]:
        chat = te.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True, enable_thinking=True)
        assert chat == TEMPLATE.format(prompt) == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    thinking_off = te.tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=False)
    assert thinking_off.endswith("<think>\n\n</think>\n\n")  # the fixture's template really is Qwen3-style


@pytest.mark.parametrize("cfg", [False, True], ids=["guidance0", "cfg"])
@pytest.mark.parametrize("prompts", PROMPT_SETS, ids=["1prompt", "3prompts"])
def test_matches_diffusers_encode_prompt(te, diffusers_pipe, prompts, cfg):
    """Breaks on a wrong template, tokenization, hidden-state layer, final-norm use, or padding left in."""
    negatives = [f"blurry {i}" if i else "" for i in range(len(prompts))] if cfg else None
    pos, neg = diffusers_pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=cfg,
                                            negative_prompt=None if negatives is None else list(negatives))
    ours = te.encode(prompts) + (te.encode(negatives) if cfg else [])
    refs = pos + neg
    assert len(ours) == len(refs) == len(prompts) * (2 if cfg else 1)
    for a, b in zip(ours, refs, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float32
    err = max(rel_err(a, b) for a, b in zip(ours, refs, strict=True))
    print(f"\nTE vs diffusers encode_prompt, {len(prompts)} prompt(s), cfg={cfg}: {err:.2e}")  # pytest -s
    assert err <= BOUND


def test_long_prompt_is_cut_at_512_tokens_with_a_warning(te, diffusers_pipe):
    """Breaks if the cap excludes the template, cuts the wrong end, or passes silently."""
    prompt = "the cat " * 300
    n = len(te.tokenizer(TEMPLATE.format(prompt))["input_ids"])
    assert n > MAX_TOKENS
    with pytest.warns(UserWarning, match=rf"{n - MAX_TOKENS} .*dropped.*diffusers.*ComfyUI"):
        (ours,) = te.encode([prompt])
    (want,), _ = diffusers_pipe.encode_prompt([prompt], device="cpu", do_classifier_free_guidance=False)
    err = rel_err(ours, want)
    print(f"\nTE vs diffusers, {n}-token prompt cut to {MAX_TOKENS}: {err:.2e}")
    assert ours.shape == want.shape == (MAX_TOKENS, 64) and err <= BOUND


@pytest.mark.parametrize("rel", [
    "root", "root/text_encoder", "root/text_encoder/model.safetensors.index.json",
    "qwen_3_4b.safetensors", "bare.safetensors", "all_in_one.safetensors",
])
def test_fp32_layouts_load_bit_identical(files, ref, rel):
    """Breaks if a prefix, the lm_head, or the all-in-one's other models are mishandled."""
    te = load_text_encoder(files / rel, dtype=torch.float32, tokenizer=files / "tokenizer")
    got, want = te.model.state_dict(), kept_weights(ref)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (te.config, te.device, te.dtype) == (TextEncoderConfig.from_key_shapes(
        {k: v.shape for k, v in ref.state_dict().items()}), torch.device("cpu"), torch.float32)
    assert te.model.rotary_emb.inv_freq.device.type == "cpu"  # rebuilt, not left on meta


@pytest.mark.parametrize("name", ["scaled_fp8.safetensors", "comfy_quant.safetensors"])
def test_fp8_files_are_dequantised(files, ref, name):
    """Breaks if an fp8 scale is ignored, applied twice, or a marker / activation scale becomes a weight."""
    plan = plan_text_encoder(files / name)
    assert plan.quant.value == name.removesuffix(".safetensors")
    te = load_text_encoder(files / name, dtype=torch.float32, tokenizer=files / "tokenizer")
    stored = tf.comfy_quant_state_dict if "quant" in name else tf.scaled_fp8_state_dict
    want = {k.removeprefix("model."): v for k, v in dequantised(stored(tf.hf_state_dict(ref))).items()}
    got = te.model.state_dict()
    assert got.keys() == kept_weights(ref).keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_fp8_weight_format_keeps_float8_and_matches(files, te):
    """Breaks if WeightFormat.FP8 upcasts at load, loses the per-row scales, or quantises the embeddings."""
    prompts = PROMPT_SETS[1]
    dequant = load_text_encoder(files / "comfy_quant.safetensors", dtype=torch.float32, tokenizer=te.tokenizer)
    kept = load_text_encoder(files / "comfy_quant.safetensors", dtype=torch.float32, tokenizer=te.tokenizer,
                             weight_format=WeightFormat.FP8)
    q = kept.model.layers[0].self_attn.q_proj
    assert isinstance(q, Linear) and q.weight.dtype == torch.float8_e4m3fn and q.scale_weight.shape == (64, 1)
    assert kept.model.embed_tokens.weight.dtype == torch.float32
    exact = max(rel_err(a, b) for a, b in zip(kept.encode(prompts), dequant.encode(prompts), strict=True))
    requant = load_text_encoder(files / "root", dtype=torch.float32, weight_format=WeightFormat.FP8)
    fp8_err = max(rel_err(a, b) for a, b in zip(requant.encode(prompts), te.encode(prompts), strict=True))
    bf16 = load_text_encoder(files / "comfy_quant.safetensors", dtype=torch.bfloat16, tokenizer=te.tokenizer,
                             weight_format=WeightFormat.FP8)
    bf16_err = max(rel_err(a, b) for a, b in zip(bf16.encode(prompts), dequant.encode(prompts), strict=True))
    print(f"\nTE fp8 kept vs dequantised (fp32): {exact:.2e}; fp32 file quantised to fp8 at load vs fp32: "
          f"{fp8_err:.2e}; fp8 file in bf16 compute vs fp32: {bf16_err:.2e}")
    assert exact <= BOUND  # same fp8 values and scales, upcast per matmul instead of at load
    assert fp8_err <= 0.08  # e4m3 has 3 mantissa bits: ≤ 6 % per weight; measured 4.5e-2 at the output
    assert bf16_err <= 0.03  # bf16 activations (8 mantissa bits) through 2 layers


def test_last_layer_and_final_norm_are_validated_but_never_read(files, ref, reads):
    """Breaks if the dropped layer is streamed (memory) or if a layer other than the last is dropped."""
    plan = plan_text_encoder(files / "root")
    dropped = [info for h in plan.source.headers for k, info in h.tensors.items()
               if k.startswith("model.layers.2.") or k == "model.norm.weight"]
    assert len(plan.dropped) == 12 and all(k.startswith("layers.2.") or k == "norm.weight" for k in plan.dropped)
    load_text_encoder(files / "root", dtype=torch.float32)
    assert len(reads) == len(plan.pieces) == len(kept_weights(ref))
    assert not any(r is info for r in reads for info in dropped)


def _write(path, sd):
    save_file(sd, path)
    return path


def _qwen25(sd):
    out = {k: v for k, v in sd.items() if "_norm." not in k or "layernorm" in k}
    out.update({k.replace(".weight", ".bias"): torch.zeros(v.shape[0]) for k, v in sd.items()
                if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))})
    return out


BAD = {  # name -> (state dict from the good HF one, error pattern)
    "qwen25_biases": (_qwen25, r"Qwen2/Qwen2\.5-style text encoder \(q/k/v biases"),
    "dit": (lambda sd: {"cap_embedder.1.weight": torch.zeros(8, 64), "x_embedder.weight": torch.zeros(8, 64),
                        "layers.0.attention.qkv.weight": torch.zeros(24, 8)}, "this is a Z-Image DiT"),
    "vae": (lambda sd: {"decoder.conv_in.weight": torch.zeros(8, 16, 3, 3)}, "this is a VAE"),
    "clip": (lambda sd: {"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8)}, "CLIP"),
    "gemma": (lambda sd: {**sd, "model.layers.0.pre_feedforward_layernorm.weight": torch.ones(64)}, "Gemma"),
    "missing": (lambda sd: {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"},
                r"1 missing keys, e\.g\. \['model\.layers\.1\.mlp\.up_proj\.weight'\]"),
    "shape_in_dropped_layer": (lambda sd: {**sd, "model.layers.2.self_attn.o_proj.weight": torch.zeros(64, 32)},
                               r"shape mismatch for 1 keys.*model\.layers\.2\.self_attn\.o_proj\.weight: "
                               r"file \[64, 32\] vs model \[64, 64\]"),
    "unexpected": (lambda sd: {**sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64),
                               "visual.merger.weight": torch.zeros(4)},
                   r"2 unexpected keys.*model\.layers\.0\.self_attn\.q_proj\.bias.*visual\.merger\.weight"),
    "one_layer": (lambda sd: {k: v for k, v in sd.items() if not k.startswith(("model.layers.1.", "model.layers.2."))},
                  "1 layers; hidden_states\\[-2\\] needs at least 2"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_files_fail_clearly_before_reading_data(tmp_path, ref, reads, name):
    """Breaks if a foreign or broken file loads (or reads tensor data) instead of one error naming file and keys."""
    make, pattern = BAD[name]
    path = _write(tmp_path / f"{name}.safetensors", make(tf.hf_state_dict(ref)))
    with pytest.raises(ValueError, match=pattern) as e:
        load_text_encoder(path, dtype=torch.float32, tokenizer=tmp_path / "never_loaded")
    assert str(path) in str(e.value) and reads == []


def test_tokenizer_resolution(files, tmp_path, reads):
    """Breaks if the official root's tokenizer/ is not found, or a lone file loads without a tokenizer."""
    for rel in ("root", "root/text_encoder", "root/text_encoder/model.safetensors.index.json",
                "root/text_encoder/model-00001-of-00002.safetensors"):
        assert plan_text_encoder(files / rel).config.layers == 3
        te = load_text_encoder(files / rel, dtype=torch.float32)
        assert te.tokenizer.name_or_path == str(files / "root" / "tokenizer")
    reads.clear()
    with pytest.raises(ValueError, match=re.escape(f"qwen_3_4b.safetensors: {NO_TOKENIZER}")):
        load_text_encoder(files / "qwen_3_4b.safetensors")
    with pytest.raises(FileNotFoundError, match="no such tokenizer folder"):
        load_text_encoder(files / "qwen_3_4b.safetensors", tokenizer=tmp_path / "nope")
    with pytest.raises(ValueError, match="not a Qwen tokenizer folder"):
        load_tokenizer(tmp_path)
    assert reads == []


@pytest.fixture(scope="module")
def comfy_tokenizer():
    assert COMFY_TOKENIZER.is_dir(), f"{COMFY_TOKENIZER} missing: run scripts/setup.sh (the ComfyUI test host)"
    return load_tokenizer(COMFY_TOKENIZER)


def test_comfy_bundled_tokenizer_gives_qwen3_ids(comfy_tokenizer, tmp_path):
    """Breaks if our encoder's ids depended on the tokenizer's chat template (ComfyUI's adds a system prompt)."""
    qwen3 = load_tokenizer(tf.write_qwen3_style_tokenizer(tmp_path / "qwen3", COMFY_TOKENIZER))
    prompts = ["a photo of a cat", "", "Zürich  2024: a {red} fox,\n\tin the snow 🦊 — 東京", "user assistant"]
    for p in prompts:
        assert tokenize_prompt(comfy_tokenizer, p) == tokenize_prompt(qwen3, p)
    # ComfyUI's own ids for this prompt (COMFY_HOST.md: ZImageTokenizer)
    assert tokenize_prompt(comfy_tokenizer, "a photo of a cat") == [151644, 872, 198, 64, 6548, 315, 264, 8251,
                                                                    151645, 198, 151644, 77091, 198]
    chat = comfy_tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True)
    assert chat.startswith("<|im_start|>system\n") and chat != TEMPLATE.format("a")  # why TEMPLATE is hard-coded


def test_tokenizer_of_another_model_is_refused(files, comfy_tokenizer, reads):
    """Breaks if a tokenizer with ids beyond the embedding table is accepted (an index error at encode time)."""
    with pytest.raises(ValueError, match="151669 tokens but the text encoder's vocabulary is 288"):
        load_text_encoder(files / "qwen_3_4b.safetensors", tokenizer=comfy_tokenizer)
    assert reads == []


def test_qwen3_4b_preset_matches_the_real_key_manifest():
    """Breaks if QWEN3_4B or to_hf() disagree with the real qwen_3_4b.safetensors header (398 tensors)."""
    from transformers import Qwen3Model

    real = {k.removeprefix("model."): s for k, s in manifest("keys_te_qwen3_4b_comfy.txt").items()}
    assert len(real) == 398
    assert TextEncoderConfig.from_key_shapes(real) == QWEN3_4B
    with torch.device("meta"):
        model = Qwen3Model(QWEN3_4B.to_hf())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == real


def test_cache_skips_the_model_and_is_not_aliased(files):
    """Breaks if a cached text re-runs the model, a caller's in-place edit reaches the cache, or LRU misorders."""
    te = load_text_encoder(files / "root", dtype=torch.float32)
    te.cache_size = 2
    calls = []
    te.model.register_forward_pre_hook(lambda *_: calls.append(1))
    first = te.encode(["a cat", "the mat", "a cat"])
    assert len(calls) == 2 and torch.equal(first[0], first[2]) and first[0] is not first[2]
    first[0].zero_()
    again = te.encode(["the mat", "a cat"])
    assert len(calls) == 2 and torch.equal(again[0], first[1]) and torch.equal(again[1], first[2])
    assert not again[1].is_inference()  # usable by training code outside inference mode
    te.encode(["third"])  # evicts "the mat" (least recently used), keeps "a cat"
    te.encode(["a cat"])
    assert len(calls) == 3
    te.encode(["the mat"])
    assert len(calls) == 4
    assert len(te.encode("a cat")) == 1 and len(calls) == 4  # a bare str is one prompt
