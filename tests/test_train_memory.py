"""The trainer's memory options on a tiny 4-layer DiT, CPU, fp32 compute, fixed seeds.

Locks in:
- gradient checkpointing (`ZImageDiT.gradient_checkpointing`) gives the same loss and LoRA gradients as without
  (tolerance 0: bit for bit on the CPU), and under no_grad the same output; it keeps ≥ 4× fewer activation
  bytes for the backward (measured: the distinct storages autograd saves during the forward, weights excluded,
  through `torch.autograd.graph.saved_tensors_hooks`; deterministic, no allocator needed);
- block swap (`zimage_core.offload`): the hooks load and evict the swapped layers in forward order, and again in
  reverse for the recomputation in the backward; loss and gradients equal the unswapped run bit for bit
  (compute device = CPU, so the copies are re-wrapped tensors); autograd saves the temporary copies, never the
  resting parameters (the bug `.data` swapping would have); a weight replaced from outside for a while (how
  previews take the merged training adapter out) is used and left in place; on exit every parameter is the same
  object on its device with the same bits, and no hook is left; n out of range, or a trainable swapped weight,
  is refused;
- fp8 base weights (`load_dit(..., WeightFormat.FP8)`): training with the ostris adapter merged (TURBO_ADAPTER)
  and checkpointing + swap lowers the loss, and the float8 weights and their scales are bit-identical after;
- a 5-step run with checkpointing + swap produces the same LoRA and losses as a plain run, these options stay
  out of the resume fingerprint, TOML booleans are read, and the CLI parses `[models] dit_weights = "fp8"`.
Untested here (no GPU): pinned-memory non_blocking copies and the device memory actually freed on CUDA/MPS.
Breaks on: a checkpointed block that recomputes differently, an eviction hook that does not run when the
recomputation stops early, swapping `.data` under autograd, a swap that overwrites an outside replacement, a
swap or flag left installed after training.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_fixtures import Fmt, write_lora
from train_fixtures import eval_loss, make_items, state_hash
from zimage_core import load_dit
from zimage_core.config import WeightFormat
from zimage_core.lora import ApplyMode, apply_loras, read_lora
from zimage_core.offload import BlockSwap, swap_blocks
from zimage_core.train.config import BaseMode, TrainConfig
from zimage_core.train.loop import train_lora
from zimage_core.train.lora_net import TrainableLora, TrainTargets
from zimage_core.train.loss import flow_matching_loss
from zimage_core.train.timesteps import TimestepSampling
from zimage_fixtures import TINY, comfy_state_dict, diffusers_dit

CFG4 = TINY | {"n_layers": 4, "dim": 128, "n_heads": 1, "n_kv_heads": 1}  # one head of 128: the real RoPE split


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny ops, one thread


@pytest.fixture(scope="module")
def dit_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("memory") / "dit4.safetensors"
    overrides = {k: CFG4[k] for k in ("n_layers", "dim", "n_heads", "n_kv_heads")}
    save_file(comfy_state_dict(diffusers_dit(seed=5, **overrides).state_dict()), path)
    return path


@pytest.fixture()
def dit(dit_path):
    return load_dit(dit_path, "cpu", torch.float32)


def batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    caps = [torch.randn(5, 64, generator=g), torch.randn(9, 64, generator=g)]  # different lengths: a key mask
    return x0, noise, torch.tensor([0.3, 0.7]), caps


def random_lora(dit) -> TrainableLora:
    """A LoRA on every target (refiners too) with up ≠ 0, so every pair gets a gradient."""
    lora = TrainableLora(dit, 4, 4.0, TrainTargets.ALL, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in sorted(lora.named_parameters()):
            if name.endswith(".up"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return lora


def loss_and_grads(dit, lora, saved: dict | None = None):
    """Loss and LoRA gradients of one batch; `saved` collects the storages autograd saves (weights excluded)."""
    weights = {t.untyped_storage().data_ptr() for t in [*dit.parameters(), *dit.buffers(), *lora.parameters()]}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if saved is not None and t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    lora.zero_grad(set_to_none=True)
    with lora.attached():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = flow_matching_loss(dit, *batch())
        loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in lora.named_parameters()}


def assert_same(a, b) -> None:
    assert torch.equal(a[0], b[0]), f"loss {a[0].item()} vs {b[0].item()}"
    assert a[1].keys() == b[1].keys()
    worst = max((a[1][k] - b[1][k]).abs().max().item() for k in a[1])
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1]), f"LoRA gradients differ by up to {worst:.3g}"


def test_gradient_checkpointing_same_result_fewer_saved_bytes(dit):
    lora = random_lora(dit)
    saved_plain, saved_ckpt = {}, {}
    plain = loss_and_grads(dit, lora, saved_plain)
    dit.gradient_checkpointing = True
    ckpt = loss_and_grads(dit, lora, saved_ckpt)
    plain_b, ckpt_b = sum(saved_plain.values()), sum(saved_ckpt.values())
    print(f"saved for backward: {plain_b / 2**20:.2f} MiB in {len(saved_plain)} storages without checkpointing, "
          f"{ckpt_b / 2**20:.2f} MiB in {len(saved_ckpt)} with ({plain_b / ckpt_b:.1f}x less)")
    assert_same(ckpt, plain)
    assert all(g.abs().sum() > 0 for g in plain[1].values())
    assert ckpt_b * 4 <= plain_b
    x0, noise, sigmas, caps = batch()
    with torch.no_grad():
        on = dit(x0, 1 - sigmas, caps)
        dit.gradient_checkpointing = False
        off = dit(x0, 1 - sigmas, caps)
    assert torch.equal(on, off)
    assert not any("checkpointing" in k for k in dit.state_dict())


def test_block_swap_hooks_results_and_restoration(dit):
    lora = random_lora(dit)
    before = state_hash(dit)
    params = dict(dit.named_parameters())
    plain = loss_and_grads(dit, lora)
    x0, _, sigmas, caps = batch()
    out_proj = dit.layers[3].attention.out
    replaced_ref = replaced_forward(dit, out_proj, x0, 1 - sigmas, caps)
    moves = []
    dit.gradient_checkpointing = True
    with swap_blocks(dit, 3, on_move=lambda i, loaded: moves.append((i, loaded))) as swap:
        resting = {id(p) for i in swap.indices for p in [*dit.layers[i].parameters(), *dit.layers[i].buffers()]}
        swapped = loss_and_grads(dit, lora)
        assert moves == [
            (1, True), (1, False), (2, True), (2, False), (3, True), (3, False),  # forward
            (3, True), (3, False), (2, True), (2, False), (1, True), (1, False)]  # recomputed in the backward
        assert_same(swapped, plain)
        moves.clear()
        with torch.no_grad():
            dit(x0, 1 - sigmas, caps)
        assert moves == [(1, True), (1, False), (2, True), (2, False), (3, True), (3, False)]
        # a weight replaced from outside for a while (previews take the merged adapter out so) is used as it is
        assert torch.equal(replaced_forward(dit, out_proj, x0, 1 - sigmas, caps), replaced_ref)
        # without checkpointing autograd saves the block's weights: the temporary copies, not the resting objects
        dit.gradient_checkpointing = False
        saved = []
        with lora.attached(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = flow_matching_loss(dit, *batch())
        known = {id(p) for p in [*params.values(), *lora.parameters()]}
        temporaries = [t for t in saved if isinstance(t, torch.nn.Parameter) and id(t) not in known]
        assert not [t for t in saved if id(t) in resting], "autograd saved a resting (CPU) weight"
        assert temporaries, "no swapped-in weight was saved: the check above tests nothing"
        loss.backward()
    assert state_hash(dit) == before
    assert dict(dit.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in dit.named_parameters()), "a parameter object was replaced"
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in dit.layers), "a hook was left installed"


def replaced_forward(dit, linear, *inputs) -> torch.Tensor:
    """The DiT's output with `linear.weight` replaced by a halved copy for the call (checked to stay in place)."""
    kept = linear.weight
    linear.weight = torch.nn.Parameter(kept.detach() * 0.5, requires_grad=False)
    replacement = linear.weight
    try:
        with torch.no_grad():
            out = dit(*inputs)
        assert linear.weight is replacement
        return out
    finally:
        linear.weight = kept


def test_block_swap_refuses_bad_counts_and_trainable_weights(dit, tmp_path):
    for n in (4, -1, True, 1.5):
        with pytest.raises(ValueError, match=r"blocks_to_swap must be an integer from 0 to 3 for this DiT \(4 layers"):
            BlockSwap(dit, n)
    dit.layers[3].ffn_norm1.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"frozen, but layers\.3\.ffn_norm1\.weight requires grad"):
        BlockSwap(dit, 2).install()
    dit.layers[3].ffn_norm1.weight.requires_grad_(False)
    with swap_blocks(dit, 0) as swap:  # 0: nothing swapped, no hooks
        assert swap.indices == [] and not any(b._forward_pre_hooks for b in dit.layers)
    with pytest.raises(ValueError, match="blocks_to_swap must be an integer ≥ 0"):
        TrainConfig(blocks_to_swap=-1)
    with pytest.raises(ValueError, match="blocks_to_swap 2 needs gradient_checkpointing = true"):
        TrainConfig(blocks_to_swap=2)
    with pytest.raises(ValueError, match="gradient_checkpointing must be true or false, got 1"):
        TrainConfig(gradient_checkpointing=1)
    calls = []
    too_many = TrainConfig(blocks_to_swap=4, gradient_checkpointing=True, output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="blocks_to_swap 4: this DiT has 4 layers, at most 3"):
        train_lora(dit, make_items(), too_many, on_step=lambda *a: calls.append(a))
    assert calls == [] and not (tmp_path / "out").exists()


def config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(rank=8, steps=5, learning_rate=2e-3, timestep_sampling=TimestepSampling.UNIFORM, seed=7,
                output_dir=tmp_path / "out", name="t", targets=TrainTargets.ALL, batch_size=2)
    return TrainConfig(**(base | kw))


def test_fp8_base_trains_with_the_adapter_and_stays_bit_identical(dit_path, tmp_path):
    dit = load_dit(dit_path, "cpu", torch.float32, weight_format=WeightFormat.FP8)
    assert dit.layers[3].attention.qkv.weight.dtype == torch.float8_e4m3fn
    assert dit.layers[3].attention.qkv.scale_weight is not None
    adapter_path = write_lora(Fmt.OSTRIS_ADAPTER, tmp_path / "adapter.safetensors", seed=3, cfg=CFG4).path
    adapter = read_lora(adapter_path)
    items = make_items()
    cfg = config(tmp_path, base_mode=BaseMode.TURBO_ADAPTER, adapter_path=adapter_path, steps=40,
                 learning_rate=5e-3, gradient_checkpointing=True, blocks_to_swap=2)
    before_hash = state_hash(dit)

    def loss_with_adapter(lora=None) -> float:
        applied = apply_loras(dit, [(adapter, 1.0)], ApplyMode.MERGED)
        try:
            return eval_loss(dit, items, lora)
        finally:
            applied.remove()

    before = loss_with_adapter()
    result = train_lora(dit, items, cfg)
    after = loss_with_adapter(result.lora)
    print(f"fp8 base + adapter, checkpointing + swap 2: eval loss {before:.4f} → {after:.4f} "
          f"({1 - after / before:.0%} lower) in {result.steps_done} steps")
    assert after <= 0.7 * before
    assert state_hash(dit) == before_hash, "an fp8 weight or scale changed (trained, or the adapter left merged)"
    assert dit.layers[3].attention.qkv.weight.dtype == torch.float8_e4m3fn and not dit.gradient_checkpointing


def test_checkpointing_and_swap_train_the_same_lora_as_a_plain_run(dit, tmp_path):
    items = make_items()
    before_hash = state_hash(dit)
    plain_cfg = config(tmp_path / "a")
    memory_cfg = config(tmp_path / "b", gradient_checkpointing=True, blocks_to_swap=3)
    assert memory_cfg.fingerprint() == plain_cfg.fingerprint(), "memory options must not block a resume"
    plain = train_lora(dit, items, plain_cfg)
    low = train_lora(dit, items, memory_cfg)
    a, b = dict(plain.lora.named_parameters()), dict(low.lora.named_parameters())
    equal = sum(torch.equal(a[k], b[k]) for k in a)
    print(f"5 steps, checkpointing + 3 of 4 layers swapped vs plain: {equal}/{len(a)} LoRA tensors bit-identical, "
          f"losses {low.losses} vs {plain.losses}")
    assert a.keys() == b.keys() and equal == len(a)
    assert low.losses == plain.losses and low.steps_done == 5
    assert any(p.abs().sum() > 0 for k, p in a.items() if k.endswith(".up")), "the LoRA never moved"
    assert state_hash(dit) == before_hash and not dit.gradient_checkpointing
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in dit.layers)
    assert not any(p.requires_grad for p in dit.parameters())


def test_toml_booleans_and_the_cli_fp8_option(tmp_path):
    from zimage_core.cli_train import read_run

    toml = tmp_path / "run.toml"
    for name in ("dit.safetensors", "te.safetensors", "vae.safetensors"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "photos").mkdir()
    tables = ('\n[models]\ndit = "dit.safetensors"\ntext_encoder = "te.safetensors"\nvae = "vae.safetensors"\n'
              '{weights}\n[data]\nfolder = "photos"\n')
    fp8 = tables.format(weights='dit_weights = "fp8"')
    toml.write_text("gradient_checkpointing = true\nblocks_to_swap = 2\n" + fp8)
    cfg, models, _ = read_run(toml)
    assert cfg.gradient_checkpointing is True and cfg.blocks_to_swap == 2
    assert models["dit_weights"] is WeightFormat.FP8
    toml.write_text(tables.format(weights=""))
    assert read_run(toml)[1]["dit_weights"] is WeightFormat.COMPUTE
    toml.write_text(tables.format(weights='dit_weights = "int4"'))
    with pytest.raises(ValueError, match=r"\[models\] dit_weights must be default or fp8, got 'int4'"):
        read_run(toml)
    toml.write_text('gradient_checkpointing = "yes"\n' + tables.format(weights=""))
    with pytest.raises(ValueError, match="gradient_checkpointing must be true or false, got 'yes'"):
        read_run(toml)
