"""Our DiT equals the two references on the same random weights (fp32, CPU).

Locks in the whole forward: sandwich norms, tanh-gated modulation, pad-to-32 with learned pad tokens,
3-axis RoPE (θ 256, axes 32/48/48), caption positions, batches whose captions differ in length
(7 and 45 tokens: neither a multiple of 32), non-square images, the final layer and the output sign.
References: diffusers 0.42.1 `ZImageTransformer2DModel`, loaded from the official sharded layout by
our loader; ComfyUI 0.3.75's native `NextDiT` (the real host), loaded from a ComfyUI-layout file.
Bound: max |ours − ref| / max |ref| ≤ 1e-5.
"""

import re

import pytest
import torch
from safetensors.torch import save_file

from comfy_host import import_comfy
from zimage_core import load_dit
from zimage_fixtures import TINY, comfy_state_dict, diffusers_dit, diffusers_forward, inputs, rel_err, write_sharded

BOUND = 1e-5
CASES = [  # batch, caption lengths, latent height, latent width
    (1, [7], 16, 16),
    (1, [45], 12, 20),
    (2, [7, 45], 16, 16),
    (2, [45, 7], 12, 20),
    (2, [32, 33], 24, 8),
]


@pytest.fixture(scope="module")
def diffusers_pair(tmp_path_factory):
    ref = diffusers_dit(seed=0)
    folder = write_sharded(ref.state_dict(), tmp_path_factory.mktemp("official"), n_shards=3)
    return ref, load_dit(folder, dtype=torch.float32)


@pytest.mark.parametrize("batch,cap_lens,height,width", CASES)
def test_matches_diffusers(diffusers_pair, batch, cap_lens, height, width):
    ref, ours = diffusers_pair
    x, t, caps = inputs(batch, cap_lens, height, width)
    with torch.no_grad():
        got = ours(x, t, caps)
    err = rel_err(got, diffusers_forward(ref, x, t, caps))
    print(f"\nvs diffusers: batch {batch}, captions {cap_lens}, latent {height}x{width}: {err:.2e}")  # pytest -s
    assert err <= BOUND


def test_batch_items_are_independent(diffusers_pair):
    """Cross-item padding is masked: an item's output does not depend on its batch neighbour."""
    _, ours = diffusers_pair
    x, t, caps = inputs(2, [7, 45], 16, 16)
    with torch.no_grad():
        both = ours(x, t, caps)
        alone = ours(x[:1], t[:1], caps[:1])
    assert rel_err(both[:1], alone) <= BOUND


def comfy_nextdit(comfy):
    """ComfyUI's NextDiT at the tiny size, built as its model detection builds Z-Image (dim 3840 there)."""
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT

    return NextDiT(patch_size=2, in_channels=16, dim=TINY["dim"], n_layers=TINY["n_layers"],
                   n_refiner_layers=TINY["n_refiner_layers"], n_heads=TINY["n_heads"], n_kv_heads=TINY["n_heads"],
                   multiple_of=2, ffn_dim_multiplier=8 / 3, norm_eps=1e-5, qk_norm=True,
                   cap_feat_dim=TINY["cap_feat_dim"], axes_dims=TINY["axes_dims"], axes_lens=TINY["axes_lens"],
                   rope_theta=256.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
                   operations=comfy.ops.disable_weight_init).eval()


@pytest.fixture(scope="module")
def comfy_pair(tmp_path_factory):
    ref = comfy_nextdit(import_comfy())
    # Same random weights as the diffusers reference where shapes agree; ComfyUI's own t_embedder
    # width (min(dim, 1024)) gets its own random values.
    sd = comfy_state_dict(diffusers_dit(seed=3).state_dict())
    g = torch.Generator().manual_seed(4)
    for k, v in ref.state_dict().items():
        if k.startswith("t_embedder"):
            sd[k] = torch.randn(v.shape, generator=g) / (v.shape[1] ** 0.5 if v.ndim == 2 else 10)
    ref.load_state_dict(sd, strict=True)
    path = tmp_path_factory.mktemp("comfy") / "z_image_tiny.safetensors"
    save_file(sd, path)
    return ref, load_dit(path, dtype=torch.float32)


@pytest.mark.parametrize("batch,cap_lens,height,width", [
    (1, [7], 16, 16), (1, [45], 12, 20), (2, [7, 7], 24, 8), (2, [45, 45], 12, 20)])
def test_matches_comfyui_nextdit(comfy_pair, batch, cap_lens, height, width):
    ref, ours = comfy_pair
    x, t, caps = inputs(batch, cap_lens, height, width, seed=5)
    with torch.no_grad():
        # ComfyUI batches equal-length captions and passes σ = 1 − t; it returns −v.
        want = -ref(x, 1 - t, torch.stack(caps), num_tokens=cap_lens[0])
        got = ours(x, t, caps)
    err = rel_err(got, want)
    print(f"\nvs ComfyUI NextDiT: batch {batch}, captions {cap_lens}, latent {height}x{width}: {err:.2e}")
    assert err <= BOUND


@pytest.mark.parametrize("x_shape,cap_lens,message", [
    ((1, 16, 15, 16), [7], "even H"),
    ((1, 4, 16, 16), [7], "(B, 16"),
    ((2, 16, 16, 16), [7], "1 caption feature tensors for a batch of 2"),
    ((1, 16, 16, 16), [0], "at least one token"),
    ((1, 16, 16, 16), [1535], "RoPE range"),
    ((1, 16, 1026, 16), [7], "RoPE range"),
])
def test_bad_forward_inputs_are_named(diffusers_pair, x_shape, cap_lens, message):
    _, ours = diffusers_pair
    caps = [torch.zeros(n, TINY["cap_feat_dim"]) for n in cap_lens]
    with pytest.raises(ValueError, match=re.escape(message)):
        ours(torch.zeros(x_shape), torch.zeros(x_shape[0]), caps)


def test_inference_and_autograd_paths_agree(diffusers_pair):
    """Without autograd the DiT updates its own temporaries in place; with autograd it must not.
    Both give the same numbers, backward runs, and the caller's tensors are never modified."""
    _, ours = diffusers_pair
    x, t, caps = inputs(2, [7, 45], 16, 16)
    x_before, caps_before = x.clone(), [c.clone() for c in caps]
    with torch.inference_mode():
        fast = ours(x, t, caps)
    assert torch.equal(x, x_before) and all(torch.equal(a, b) for a, b in zip(caps, caps_before, strict=True))
    x_grad = x.clone().requires_grad_(True)
    with torch.enable_grad():
        slow = ours(x_grad, t, caps)
        slow.square().mean().backward()
    assert rel_err(fast, slow.detach()) <= 1e-6
    assert x_grad.grad is not None and torch.isfinite(x_grad.grad).all() and x_grad.grad.abs().sum() > 0
