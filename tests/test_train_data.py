"""Training data: folder reading, buckets, pixels, cached encoding and deterministic batches.

Locks in: captions come from same-stem .txt files (stripped, `[trigger]` substituted), a default
caption fills the gaps and without one the error lists the missing files; a missing or empty
folder, an undecodable file and a tiny image fail with the path in the message; buckets are
multiples of 16 within resolution² and keep the aspect (a square image gets res×res); pixels are
(3, H, W) in [-1, 1]; latents equal `FluxVAE.encode` of those pixels; a second `build_items` with
the same cache does no encode at all, a VAE with other weights does not reuse latents, and a
corrupted cache file is recomputed; `BucketBatches` is a pure function of (seed, epoch), never mixes
buckets, covers every item once per epoch and resumes from (epoch, position).
Breaks on any change to caption rules, bucketing, the pixel recipe, the cache keys or batch order.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import te_fixtures as tf
import vae_fixtures as vf
from zimage_core.text_encoder import load_text_encoder
from zimage_core.train import (
    BucketBatches,
    ImageCaption,
    TrainItem,
    bucket_size,
    build_items,
    collate,
    empty_caption_features,
    images_from_tensor,
    load_pixels,
    read_folder,
)
from zimage_core.train.data import default_preview_prompts
from zimage_core.vae import load_vae

RES = (64, 128)


def _image(path: Path, size: tuple[int, int], color=(200, 30, 90), mode="RGB") -> Path:
    Image.new(mode, size, color).save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    save_file(tf.hf_state_dict(tf.qwen3_model(seed=4)), root / "qwen3.safetensors")
    te = load_text_encoder(root / "qwen3.safetensors", dtype=torch.float32,
                           tokenizer=tf.write_tiny_tokenizer(root / "tokenizer"))
    vae_a = load_vae(vf.write_bfl(vf.diffusers_vae(seed=5).state_dict(), root / "a.safetensors"))
    vae_b = load_vae(vf.write_bfl(vf.diffusers_vae(seed=6).state_dict(), root / "b.safetensors"))
    return te, vae_a, vae_b


def _counting(obj, calls: list):
    inner = obj.encode

    def encode(x):
        calls.append(1)
        return inner(x)
    obj.encode = encode
    return obj


@pytest.fixture
def dataset(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    _image(d / "b.png", (96, 64))
    (d / "b.txt").write_text("  a photo of [trigger] cat \n", encoding="utf-8")
    _image(d / "a.jpg", (64, 64), color=(10, 200, 10))
    (d / "a.txt").write_text("the user", encoding="utf-8")
    (d / "notes.md").write_text("ignored")
    return d


def test_captions_trigger_and_order(dataset):
    ex = read_folder(dataset, trigger="sks")
    assert ex == [ImageCaption(dataset / "a.jpg", "the user"), ImageCaption(dataset / "b.png", "a photo of sks cat")]
    with pytest.raises(ValueError, match=r"b\.txt.*\[trigger\]"):
        read_folder(dataset)


def test_default_preview_prompts_keep_one_without_the_trigger():
    assert default_preview_prompts("a photo of sks cat", "sks") == ("a photo of sks cat", "a photo of cat")
    assert default_preview_prompts("sks, portrait", "sks") == ("sks, portrait", "portrait")
    assert default_preview_prompts("a cat", "sks") == ("a cat",)  # nothing to take out
    assert default_preview_prompts("sks", "sks") == ("sks",)  # nothing would be left
    assert default_preview_prompts("a photo of sks", None) == ("a photo of sks",)


def test_missing_caption_default_or_error(dataset):
    _image(dataset / "c.webp", (80, 80))
    with pytest.raises(ValueError, match=r"c\.webp"):
        read_folder(dataset, trigger="sks")
    ex = read_folder(dataset, default_caption="[trigger] style", trigger="sks")
    assert ex[-1] == ImageCaption(dataset / "c.webp", "sks style")


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no images"):
        read_folder(tmp_path)
    (tmp_path / "x.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"x\.png"):
        read_folder(tmp_path, default_caption="c")
    (tmp_path / "x.png").unlink()
    _image(tmp_path / "small.png", (200, 40))
    with pytest.raises(ValueError, match=r"small\.png.*tiny"):
        read_folder(tmp_path, default_caption="c")


@pytest.mark.parametrize("w,h", [(1000, 1000), (1920, 1080), (768, 1344), (300, 1200), (5000, 600)])
@pytest.mark.parametrize("res", [512, 1024])
def test_bucket_size(w, h, res):
    bw, bh = bucket_size(w, h, res)
    assert bw % 16 == 0 and bh % 16 == 0 and bw * bh <= res * res
    assert bw * bh >= 0.8 * res * res
    assert abs(bw / bh - w / h) / (w / h) < 0.1
    if w == h:
        assert (bw, bh) == (res, res)
    assert bucket_size(w, h, res) == (bw, bh)


def test_load_pixels_cover_and_crop(tmp_path):
    im = Image.new("RGB", (100, 50), (255, 255, 255))
    im.paste((0, 0, 0), (0, 0, 10, 50))  # a black strip at the left edge, cropped away
    im.save(tmp_path / "p.png")
    px = load_pixels(tmp_path / "p.png", (48, 32))
    assert px.shape == (3, 32, 48) and px.dtype == torch.float32
    assert px.min() >= -1 and px.max() <= 1 and px[:, :, 1:].min() > 0.9
    _image(tmp_path / "t.png", (64, 64), color=(0, 0, 0, 0), mode="RGBA")  # transparent → white
    assert torch.allclose(load_pixels(tmp_path / "t.png", (64, 64)), torch.ones(3, 64, 64))


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (96, 64), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 96, 32))  # white top half, stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": shown as portrait, white on the right
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    read_folder(tmp_path, default_caption="c")
    px = load_pixels(tmp_path / "r.jpg", (64, 96))
    assert px.shape == (3, 96, 64)
    assert px[:, :, 40:].mean() > 0.8 and px[:, :, :24].mean() < -0.8


def test_build_items_shapes_and_latents(dataset, models):
    te, vae, _ = models
    steps = []
    items = build_items(read_folder(dataset, trigger="sks"), vae, te, RES, on_progress=lambda i, n: steps.append(n))
    assert [(it.key, it.bucket) for it in items] == [("a.jpg@64x64", (64, 64)), ("a.jpg@128x128", (128, 128)),
                                                     ("b.png@80x48", (80, 48)), ("b.png@160x96", (160, 96))]
    assert steps == [4] * 4
    for it in items:
        assert it.latent.shape == (16, it.bucket[1] // 8, it.bucket[0] // 8) and it.latent.dtype == torch.float32
        assert it.caption_features.ndim == 2 and it.caption_features.shape[1] == tf.TINY_TE["hidden_size"]
    expected = vae.encode(load_pixels(dataset / "b.png", (80, 48))[None])[0]
    assert torch.equal(items[2].latent, expected)
    assert torch.equal(items[2].caption_features, te.encode(["a photo of sks cat"])[0])


def test_cache_reuse_identity_and_corruption(dataset, models, tmp_path):
    te, vae_a, vae_b = models
    ex = read_folder(dataset, trigger="sks")
    calls: list = []
    te_c, va_c = _counting(te, calls), _counting(vae_a, calls)
    try:
        te.cache_size, te._cache = 0, te._cache.__class__()  # no in-memory help: count real encodes
        first = build_items(ex, va_c, te_c, RES, cache_dir=tmp_path / "cache")
        assert len(calls) == 2 + 4
        calls.clear()
        again = build_items(ex, va_c, te_c, RES, cache_dir=tmp_path / "cache")
        assert calls == []
        assert all(torch.equal(x.latent, y.latent) and torch.equal(x.caption_features, y.caption_features)
                   for x, y in zip(first, again, strict=True))

        latent_files = sorted((tmp_path / "cache" / "latents").iterdir())
        assert len(latent_files) == 4 and not list((tmp_path / "cache" / "latents").glob("*.tmp"))
        latent_files[0].write_bytes(b"garbage")
        build_items(ex, va_c, te_c, RES, cache_dir=tmp_path / "cache")
        assert len(calls) == 1  # just the corrupted latent
        calls.clear()

        vb_c = _counting(vae_b, calls)
        other = build_items(ex, vb_c, te_c, RES, cache_dir=tmp_path / "cache")
        assert len(calls) == 4  # other VAE weights: every latent again, captions reused
        assert not torch.allclose(other[0].latent, first[0].latent)
    finally:
        for m in (te, vae_a, vae_b):
            m.__dict__.pop("encode", None)
        te.cache_size = 16


def test_images_from_tensor_matches_files(dataset, models):
    te, vae, _ = models
    px = torch.tensor(np.array(Image.open(dataset / "b.png")), dtype=torch.float32)[None] / 255
    items = images_from_tensor(px, ["[trigger] cat"], vae, te, RES, trigger="sks")
    files = build_items([ImageCaption(dataset / "b.png", "sks cat")], vae, te, RES)
    assert [it.key for it in items] == ["image0@80x48", "image0@160x96"]
    assert all(torch.equal(a.latent, b.latent) for a, b in zip(items, files, strict=True))
    with pytest.raises(ValueError, match="captions"):
        images_from_tensor(px.repeat(3, 1, 1, 1), ["a", "b"], vae, te, RES)
    assert torch.equal(empty_caption_features(te), te.encode([""])[0])


def _fake_items() -> list[TrainItem]:
    buckets = [(64, 64)] * 7 + [(80, 48)] * 4 + [(48, 80)]
    return [TrainItem(torch.zeros(16, b[1] // 8, b[0] // 8), torch.zeros(3, 8), "c", b, f"i{i}")
            for i, b in enumerate(buckets)]


def test_bucket_batches_deterministic_grouped_complete():
    items = _fake_items()
    a, b = BucketBatches(items, 3, seed=1), BucketBatches(items, 3, seed=1)
    assert a.epoch_batches(0) == b.epoch_batches(0)
    assert a.epoch_batches(0) != a.epoch_batches(1) or a.epoch_batches(1) != a.epoch_batches(2)
    assert a.epoch_batches(0) != BucketBatches(items, 3, seed=2).epoch_batches(0)
    for epoch in range(3):
        batches = a.epoch_batches(epoch)
        assert sorted(i for batch in batches for i in batch) == list(range(len(items)))
        assert all(len({items[i].bucket for i in batch}) == 1 and 1 <= len(batch) <= 3 for batch in batches)
    assert len(a) == 3 + 2 + 1
    stream = [[it.key for it in next(iter(a))] for _ in range(10)]
    b.load_state((1, 2))
    assert [it.key for it in b.next_batch()] == stream[len(b.epoch_batches(0)) + 2]
    assert a.state() == (1, 4)
    latents, feats = collate(a.next_batch())
    assert latents.ndim == 4 and len(feats) == latents.shape[0]
