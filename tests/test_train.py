"""Training code: objectives against hand computations, data preparation on synthetic files, and
a few steps of each loop on tiny models (finite losses, exact resume, loadable official-layout export)."""

import copy
import io
import json
import random
import tarfile
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from latentgen import catalog
from latentgen.errors import LatentgenError
from latentgen.loader import load_model
from latentgen.schedules import make_alphas_cumprod
from latentgen.train import data, losses, runs
from latentgen.train.autoencoder import AutoencoderConfig, train_autoencoder
from latentgen.train.data import EmojiSet, ImageBatches
from latentgen.models.unet import UNetModel
from latentgen.train.ldm import LDMConfig, LDMData, LDMTrainer, grow_res_blocks, grow_transformer_depth, train_ldm

# ---- losses ---------------------------------------------------------------------------------


def test_hinge_loss_matches_hand_computation():
    real = torch.tensor([[2.0, 0.5, -1.0]])
    fake = torch.tensor([[-2.0, 0.0, 1.0]])
    # relu(1 - real) = [0, 0.5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert losses.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert losses.generator_loss(fake).item() == pytest.approx(1 / 3)


def test_adaptive_weight_matches_hand_computation():
    last = torch.tensor([1.0, -2.0], requires_grad=True)
    rec = (last * torch.tensor([3.0, 4.0])).sum()  # gradient (3, 4): norm 5
    g = (last * torch.tensor([0.0, 2.0])).sum()  # gradient (0, 2): norm 2
    weight = losses.adaptive_weight(rec, g, last, disc_weight=0.5)
    assert weight.item() == pytest.approx(0.5 * 5 / (2 + 1e-4))
    assert not weight.requires_grad
    tiny = (last * 1e-9).sum()
    assert losses.adaptive_weight(rec, tiny, last, disc_weight=1.0).item() == pytest.approx(1e4)


def test_gan_factor_switches_on_at_start():
    assert [losses.gan_factor(s, 3) for s in range(5)] == [0, 0, 0, 1, 1]


def test_kl_loss_matches_closed_form():
    mean = torch.tensor([[[[0.5]], [[-1.0]]]])
    logvar = torch.tensor([[[[0.0]], [[np.log(2.0)]]]], dtype=torch.float32)
    expected = 0.5 * ((0.25 + 1 - 1 - 0) + (1 + 2 - 1 - np.log(2.0)))
    assert losses.kl_loss(mean, logvar).item() == pytest.approx(expected, rel=1e-6)


def test_reconstruction_terms_vanish_on_identical_images_and_grow_with_blur():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    total, parts = losses.reconstruction_loss(x, x.clone())
    assert total.item() == pytest.approx(0.0, abs=1e-5)
    assert parts["ssim"] == pytest.approx(1.0, abs=1e-5)
    blurred = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    assert losses.fft_loss(x, blurred) > 0.05
    assert losses.ssim_map(x, blurred).mean() < 0.9


def test_ssim_agrees_with_the_evaluation_metric():
    from latentgen.metrics import ssim

    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 24, 24, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert losses.ssim_map(x, y).mean().item() == pytest.approx(ssim(x, y, quantize=False), abs=1e-4)


def test_q_sample_uses_the_inference_schedule():
    alphas = make_alphas_cumprod("linear", 1000, 0.00085, 0.012)
    x0, noise = torch.ones(2, 1, 1, 1), torch.full((2, 1, 1, 1), 2.0)
    t = torch.tensor([0, 999])
    out = losses.q_sample(x0, t, noise, alphas)
    expected = alphas[t].sqrt() + 2 * (1 - alphas[t]).sqrt()
    torch.testing.assert_close(out.flatten(), expected.float())


def test_discriminator_gives_patch_logits():
    disc = losses.NLayerDiscriminator(3, ndf=8, n_layers=3)
    assert disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)


# ---- data -----------------------------------------------------------------------------------


def test_masks_cover_a_bounded_varied_fraction():
    g = torch.Generator().manual_seed(0)
    masks = data.random_masks(40, 64, 48, g)
    coverage = masks.flatten(1).mean(1)
    assert masks.shape == (40, 1, 64, 48)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert coverage.min() >= data.MASK_COVERAGE[0] and coverage.max() <= data.MASK_COVERAGE[1]
    assert coverage.std() > 0.05
    again = data.random_masks(40, 64, 48, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


def test_sr_degradation_keeps_shape_range_and_content():
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    hr = torch.stack([xx, yy, xx * yy]).expand(6, 3, 64, 64).contiguous()
    low = data.degrade(hr, 4, g)
    assert low.shape == (6, 3, 16, 16)
    assert low.min() >= -1 and low.max() <= 1
    bicubic = F.interpolate(hr, size=(16, 16), mode="bicubic", antialias=True)
    assert (low - bicubic).abs().mean() < 0.06
    assert not torch.equal(low[0], low[1])  # each image draws its own degradation


def _heart_record(tones: bool = False) -> dict:
    record = {"unified": "2764-FE0F", "non_qualified": "2764", "name": "HEAVY BLACK HEART",
              "short_names": ["heart"], "category": "Smileys & Emotion", "subcategory": "heart",
              "image": "2764-fe0f.png", "has_img_twitter": True}
    if tones:
        record["skin_variations"] = {"1F3FD": {"unified": "2764-1F3FD", "image": "tone.png", "has_img_twitter": True}}
    return record


KEYWORDS = {"\u2764\ufe0f": ["red_heart", "love", "black", "heavy", "valentines"]}


def test_emoji_names_come_from_cldr_without_legacy_colours():
    info = data.describe_emoji(_heart_record(), KEYWORDS)
    assert info["name"] == "red heart"
    assert "black" not in info["keywords"] and "love" in info["keywords"]
    toned = data.describe_emoji(_heart_record(tones=True), KEYWORDS, "1F3FD")
    assert toned["name"] == "red heart, medium skin tone"


def test_only_emoji_without_a_side_are_mirrorable():
    heart = data.describe_emoji(_heart_record(), KEYWORDS)
    assert data.mirrorable(heart)
    assert data.mirrorable({**heart, "name": "cat face", "category": "animals & nature"})
    assert not data.mirrorable({**heart, "name": "flag: france", "category": "flags"})
    assert not data.mirrorable({**heart, "name": "hash key", "category": "symbols", "tile": True})
    assert not data.mirrorable({**heart, "name": "backhand index pointing left", "category": "people & body"})
    assert not data.mirrorable({**heart, "name": "person walking facing right, dark skin tone"})
    assert not data.mirrorable({**heart, "name": "three o’clock", "category": "travel & places"})


def test_a_loaded_emoji_set_knows_which_images_may_be_mirrored(tmp_path):
    heart = {**data.describe_emoji(_heart_record(), KEYWORDS), "captions": ["a heart", "red heart"]}
    flag = {**heart, "name": "flag: france", "category": "flags"}
    np.savez(tmp_path / "emoji.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / "emoji.json").write_text(json.dumps({"emoji": [heart, flag]}))
    emoji = EmojiSet.load(tmp_path)
    assert emoji.mirrors.tolist() == [True, False] and emoji.captions[0] == ["a heart", "red heart"]


def test_emoji_captions_vary_and_name_the_style():
    info = data.describe_emoji(_heart_record(), KEYWORDS)
    rng = random.Random(0)
    captions = [c for _ in range(20) for c in data.emoji_captions(info, "twemoji style", rng, 3)]
    assert len(set(captions)) >= 10
    assert all("red heart" in c or "heart" in c for c in captions)
    with_style = sum("twemoji style" in c for c in captions)
    assert 0.2 * len(captions) < with_style < 0.8 * len(captions)
    assert all(len(set(data.emoji_captions(info, "x", random.Random(s), 3))) == 3 for s in range(5))


def _disc(colour, size=16) -> np.ndarray:
    """A flat-coloured disc on white, as emoji are."""
    ys, xs = np.mgrid[:size, :size]
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    image[(ys - size / 2 + 0.5) ** 2 + (xs - size / 2 + 0.5) ** 2 < (size / 3) ** 2] = colour
    return image


def test_hue_variants_turn_one_hue_emoji_and_rewrite_their_colour_word():
    """Issue 14: colour words must bind to colours, so a red heart also appears as hearts of other
    hues, captioned with the hue measured on the new pixels; faces, animals and food keep theirs
    (hue-turned frogs and bananas taught "a frog" a mixture of colours)."""
    heart = data.describe_emoji(_heart_record(), KEYWORDS)
    red = _disc((220, 20, 30))
    assert data.measured_colour(red) == "red" and data.measured_colour(np.full((16, 16, 3), 255, np.uint8)) is None
    variants = data.hue_variants(red, heart, 3, random.Random(0))
    assert len(variants) == 3
    for image, info in variants:
        colour = info["name"].split()[0]
        assert info["name"] == f"{colour} heart" and colour != "red" and colour in data.ROTATION_COLOURS
        assert data.measured_colour(image) == colour
        assert (image[0, 0] == 255).all()  # the white background has no hue to turn
    car = {**heart, "name": "automobile", "category": "travel & places", "subcategory": "transport ground"}
    assert all(info["name"].endswith(" automobile") for _, info in data.hue_variants(red, car, 2, random.Random(0)))
    apple = {**heart, "name": "apple", "category": "food & drink", "subcategory": "food fruit"}
    frog = {**heart, "name": "frog", "category": "animals & nature", "subcategory": "animal amphibian"}
    face = {**heart, "name": "grinning face", "subcategory": "face smiling"}
    brown = {**heart, "name": "brown heart"}
    for kept in (apple, frog, face, brown):
        assert data.hue_variants(red, kept, 2, random.Random(0)) == []
    captions = data.emoji_captions({**apple, "colour": "red"}, "twemoji style", random.Random(0), 2)
    assert "red apple" in captions[0] and "red" not in captions[1]


def test_square_tiles_keep_their_hue_and_caption_it_as_the_background():
    """A keycap or a sign on a purple square is not hue-turned (a turned "yellow dotted six pointed
    star" was a yellow square, and "a yellow star" drew one); its colour is said as the tile's."""
    tile = np.full((16, 16, 3), (120, 40, 200), dtype=np.uint8)
    assert data.fills_corners(tile) and not data.fills_corners(_disc((220, 20, 30)))
    star = {**data.describe_emoji(_heart_record(), KEYWORDS), "name": "dotted six pointed star",
            "category": "symbols", "subcategory": "religion", "tile": True}
    assert data.measured_colour(tile) == "purple" and data.hue_variants(tile, star, 2, random.Random(0)) == []
    captions = data.emoji_captions({**star, "colour": "purple"}, "x", random.Random(0), 2)
    assert "dotted six pointed star on a purple square" in captions[0] and "purple" not in captions[1]


def _png(colour, alpha=255) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (8, 8), (*colour, alpha)).save(buffer, format="PNG")
    return buffer.getvalue()


def _tarball(path, members: dict) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_emoji_package_reading_composites_on_white(tmp_path):
    tgz = tmp_path / "emoji-datasource-twitter-16.0.0.tgz"
    _tarball(tgz, {"package/emoji.json": json.dumps([_heart_record(tones=True)]).encode(),
                   "package/img/twitter/64/2764-fe0f.png": _png((255, 0, 0)),
                   "package/img/twitter/64/tone.png": _png((0, 0, 0), alpha=0)})
    images, records = data.read_emoji_package(tgz, "twitter", KEYWORDS, 8, 2, random.Random(0))
    assert [r["name"] for r in records] == ["red heart", "red heart, medium skin tone"]
    assert images[0][0, 0].tolist() == [255, 0, 0]
    assert images[1][0, 0].tolist() == [255, 255, 255]  # transparent -> white background
    assert all(len(r["captions"]) == 2 and r["style"] == "twemoji style" for r in records)
    _, untoned = data.read_emoji_package(tgz, "twitter", KEYWORDS, 8, 2, random.Random(0), skin_tones=0)
    assert [r["name"] for r in untoned] == ["red heart"]


def test_an_old_package_is_named_by_the_current_table(tmp_path):
    """The 2017 Noto drawings ("blob") come from emoji-datasource 3.0.0, whose table has legacy
    names, no subcategories and no variation selectors: each drawing is found by its bare code
    points and described by the current table, and what the old package does not draw is skipped."""
    old_table = [{"unified": "2764", "name": "HEAVY BLACK HEART", "short_names": ["heart"], "category": "Symbols",
                  "image": "2764.png", "has_img_google": True},
                 {"unified": "1F600", "image": "1f600.png", "has_img_google": False}]
    tgz = tmp_path / "emoji-datasource-google-3.0.0.tgz"
    _tarball(tgz, {"package/emoji.json": json.dumps(old_table).encode(),
                   "package/img/google/64/2764.png": _png((200, 0, 0)),
                   "package/img/google/64/1f600.png": _png((250, 200, 0))})
    grinning = {**_heart_record(), "unified": "1F600", "image": "1f600.png", "subcategory": "face smiling"}
    images, records = data.read_emoji_package(tgz, "blob", KEYWORDS, 8, 2, random.Random(0),
                                              table=[_heart_record(), grinning])
    assert [(r["name"], r["subcategory"], r["image"], r["style"]) for r in records] == [
        ("red heart", "heart", "2764.png", "blob emoji style")]
    assert images[0][0, 0].tolist() == [200, 0, 0]
    with pytest.raises(LatentgenError, match="unknown emoji sets"):
        data.prepare_emoji(tmp_path / "out", sets=["apple"])


def test_a_package_without_a_table_is_read_by_its_file_names(tmp_path):
    """Fluent's 3D emoji are WebP files named by their code points, with no emoji.json: each is
    found by its bare code points (the variation selector dropped), downsized and described by
    the current table; the scoped package's tarball is named as npm pack names it."""
    image = io.BytesIO()
    Image.new("RGBA", (32, 32), (0, 150, 0, 255)).save(image, format="WEBP", lossless=True)
    tgz = tmp_path / data._tarball_name(*data.EMOJI_SETS["fluent"][:2])
    assert tgz.name == "lobehub-fluent-emoji-3d-1.1.0.tgz"
    _tarball(tgz, {"package/assets/2764-fe0f.webp": image.getvalue(), "package/README.md": b"x"})
    images, records = data.read_emoji_package(tgz, "fluent", KEYWORDS, 8, 2, random.Random(0),
                                              table=[_heart_record(tones=True)], skin_tones=None)
    assert [(r["name"], r["image"], r["style"]) for r in records] == [
        ("red heart", "2764-fe0f.webp", "fluent 3d emoji style")]
    assert images[0].shape == (8, 8, 3) and images[0][4, 4].tolist() == [0, 150, 0]


def test_emojione_reads_its_64_px_folder_only(tmp_path):
    """EmojiOne 2 ships the same names in png/, png_128x128/ and png_512x512/: only png/ (64 px)
    is read, by lowercase code points without the variation selector."""
    tgz = tmp_path / data._tarball_name(*data.EMOJI_SETS["emojione"][:2])
    assert tgz.name == "emojione-2.2.7.tgz"
    _tarball(tgz, {"package/assets/png/2764.png": _png((200, 0, 0)),
                   "package/assets/png_128x128/2764.png": _png((0, 0, 200))})
    images, records = data.read_emoji_package(tgz, "emojione", KEYWORDS, 8, 2, random.Random(0),
                                              table=[_heart_record()])
    assert [(r["name"], r["image"], r["style"]) for r in records] == [("red heart", "2764.png", "emojione style")]
    assert images[0][0, 0].tolist() == [200, 0, 0]


def test_svg_emoji_are_drawn_at_the_set_size(tmp_path):
    """Fluent's flat emoji are SVG: drawn by resvg straight at the training size, transparent
    parts on white like the bitmap sets."""
    svg = (b'<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32" viewBox="0 0 32 32">'
           b'<rect x="0" y="0" width="16" height="32" fill="#00c800"/></svg>')
    tgz = tmp_path / data._tarball_name(*data.EMOJI_SETS["fluent-flat"][:2])
    _tarball(tgz, {"package/assets/2764-fe0f.svg": svg})
    images, records = data.read_emoji_package(tgz, "fluent-flat", KEYWORDS, 8, 2, random.Random(0),
                                              table=[_heart_record()])
    assert [(r["image"], r["style"]) for r in records] == [("2764-fe0f.svg", "fluent flat emoji style")]
    assert images[0].shape == (8, 8, 3)
    assert images[0][4, 1].tolist() == [0, 200, 0] and images[0][4, 6].tolist() == [255, 255, 255]


def test_prepare_photos_is_seeded_and_documented(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(src / f"p{i}.png")
    path = data.prepare_photos(src, tmp_path / "a", size=16, count=12, scales=(0.5, 1.0), seed=3)
    again = data.prepare_photos(src, tmp_path / "b", size=16, count=12, scales=(0.5, 1.0), seed=3)
    crops = np.load(path)
    assert crops.shape == (12, 16, 16, 3) and crops.dtype == np.uint8
    assert np.array_equal(crops, np.load(again))
    manifest = json.loads((tmp_path / "a" / "photos-16.json").read_text())
    file, left, top, side, flipped = manifest["crops"][0]
    assert side in (16, 32)
    source = np.asarray(Image.open(src / file))[top:top + side, left:left + side]
    if side == 16:
        assert np.array_equal(crops[0], source[:, ::-1] if flipped else source)


def test_image_batches_flip_and_crop():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    batches = ImageBatches(images, crop=2)
    x, indices = batches.sample(16, torch.Generator().manual_seed(0))
    assert x.shape == (16, 3, 2, 2) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(data.to_tensor(data.to_uint8(x)), x)


# ---- loops ----------------------------------------------------------------------------------


def _photos(count=6, size=16) -> ImageBatches:
    g = np.random.default_rng(0)
    base = g.integers(0, 256, (count, size // 4, size // 4, 3), dtype=np.uint8)
    return ImageBatches(base.repeat(4, 1).repeat(4, 2), crop=size)


def _ae_config(kind: str, steps: int) -> AutoencoderConfig:
    return AutoencoderConfig(kind=kind, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, n_embed=16,
                             resolution=16, crop=16, batch=2, lr=1e-3, steps=steps, disc_start=2, disc_ndf=8,
                             disc_layers=2, checkpoint_every=2, device="cpu")


def _run_ae(kind, steps, run_dir):
    logs = []
    trainer = train_autoencoder(_ae_config(kind, steps), _photos(), run_dir, quiet=True,
                                on_step=lambda step, log: logs.append(log))
    return trainer, logs


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_autoencoder_resumes_exactly_and_exports_official_layout(tmp_path, kind):
    straight, logs = _run_ae(kind, 4, tmp_path / "straight")
    assert all(np.isfinite(log["loss"]) for log in logs)
    assert "d_loss" in logs[-1] and "d_loss" not in logs[0]  # the GAN joins after disc_start
    _run_ae(kind, 2, tmp_path / "resumed")
    resumed, resumed_logs = _run_ae(kind, 4, tmp_path / "resumed")
    assert resumed.step == 4
    assert [log["loss"] for log in resumed_logs] == [log["loss"] for log in logs[2:]]
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)

    export = tmp_path / "straight" / "export"
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys if "embedding" in k or "conv" in k)
    assert keys == set(straight.model.state_dict())
    assert {k.split(".")[0] for k in keys} >= {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    loaded = load_model(export)
    assert loaded.unet is None and loaded.family == f"autoencoder-{kind}"
    x = _photos().sample(2, torch.Generator().manual_seed(1))[0]
    reference = straight.model.half().float().eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.first_stage.decode(loaded.first_stage.encode(x)),
                                   reference.decode(reference.encode(x)), rtol=1e-4, atol=1e-4)


def test_vq_codebook_starts_on_encoder_outputs():
    from latentgen.train.autoencoder import Trainer

    trainer = Trainer.create(_ae_config("vq", 1), _photos())
    assert trainer.model.quantize.embedding.weight.abs().max() <= 1 / 16  # taming's start: all near the origin
    trainer.init_codebook()
    codebook = trainer.model.quantize.embedding.weight.detach()
    x = _photos().sample(6, torch.Generator().manual_seed(0))[0]
    with torch.no_grad():
        z = trainer.model.encode(x).permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    assert len(codebook.unique(dim=0)) == len(codebook)
    distances = torch.cdist(z, codebook, compute_mode="donot_use_mm_for_euclid_dist")
    assert distances.min(dim=0).values.max() < 1e-6  # every code is one of the outputs
    assert len(distances.argmin(dim=1).unique()) == len(codebook)  # and every code is used


class CountingTrainer:
    """The least `train_loop` drives: a step counter whose state is the step."""

    def __init__(self):
        self.step = 0

    def train_step(self):
        self.step += 1
        return {"loss": 1.0 / self.step}

    def state(self):
        return {"step": self.step}


def test_train_loop_stops_at_the_time_budget_with_a_checkpoint(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 20))  # every reading of the clock is 20 s later
    monkeypatch.setattr(runs, "time", SimpleNamespace(monotonic=lambda: next(clock), perf_counter=time.perf_counter))
    trainer = CountingTrainer()
    runs.train_loop(trainer, 1000, tmp_path, checkpoint_every=500, quiet=True, max_minutes=1.0)
    assert 0 < trainer.step < 10  # stopped after about a minute, far short of 1000 steps
    assert runs.load_checkpoint(tmp_path) == {"step": trainer.step}
    unlimited = CountingTrainer()
    runs.train_loop(unlimited, 30, tmp_path / "unlimited", checkpoint_every=500, quiet=True)
    assert unlimited.step == 30 and runs.load_checkpoint(tmp_path / "unlimited") == {"step": 30}


@pytest.mark.slow
def test_autoencoder_loss_decreases(tmp_path):
    config = _ae_config("kl", 30)
    config.disc_start = 1000
    logs = []
    train_autoencoder(config, _photos(2), tmp_path, quiet=True, on_step=lambda step, log: logs.append(log["l1"]))
    assert np.mean(logs[-5:]) < 0.7 * np.mean(logs[:5])


def test_decoder_only_fine_tuning_keeps_the_latent_space(tmp_path):
    """--decoder-only: the encoder (so every latent) is untouched, the decoder learns; emoji join the photos."""
    start = _run_ae("kl", 2, tmp_path / "base")[0].model
    config = replace(_ae_config("kl", 4), decoder_only=True, emoji_fraction=0.5, disc_start=1000, lr=1e-2)
    emoji = ImageBatches(np.full((3, 16, 16, 3), 200, dtype=np.uint8), crop=16)
    trainer = train_autoencoder(config, _photos(), tmp_path / "decoder", quiet=True, emoji=emoji,
                                init_from=start)
    tuned, before = trainer.model.state_dict(), start.state_dict()
    assert all(torch.equal(tuned[k], before[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert not all(torch.equal(tuned[k], before[k]) for k in before if k.startswith("decoder."))
    batch = trainer.batch()
    assert batch.shape == (2, 3, 16, 16) and torch.allclose(batch[1], torch.tensor(200 / 127.5 - 1))

    with pytest.raises(LatentgenError, match="--init-from"):
        train_autoencoder(config, _photos(), tmp_path / "no-start", quiet=True, emoji=emoji)
    with pytest.raises(LatentgenError, match="prepared emoji"):
        train_autoencoder(config, _photos(), tmp_path / "no-emoji", quiet=True, init_from=start)


class FakeTextEncoder(torch.nn.Module):
    """A deterministic stand-in for MiniLM: a context per string from its characters."""

    context_dim = 8

    def forward(self, texts):
        codes = torch.zeros(len(texts), 4, dtype=torch.long)
        for i, text in enumerate(texts):
            for j, ch in enumerate(text[:4]):
                codes[i, j] = ord(ch) % 97
        g = torch.Generator().manual_seed(0)
        table = torch.randn(97, self.context_dim, generator=g)
        return table[codes]


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory):
    run = tmp_path_factory.mktemp("ae")
    train_autoencoder(_ae_config("kl", 1), _photos(), run, quiet=True)
    return load_model(run / "export")


def _emoji(count=6, size=8) -> EmojiSet:
    images = np.random.default_rng(1).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    return EmojiSet(images, [[f"emoji {i}", f"picture {i}"] for i in range(count)])


def _ldm_config(task: str, steps: int) -> LDMConfig:
    return LDMConfig(task=task, image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(2,), num_head_channels=16, context_dim=8, batch=2, lr=1e-3,
                     steps=steps, checkpoint_every=2, emoji_fraction=0.5, device="cpu")


def _run_ldm(task, steps, run_dir, first_stage):
    logs = []
    sources = LDMData(photos=_photos() if task != "txt2img" else None,
                      emoji=_emoji() if task in ("txt2img", "sr") else None)
    trainer = train_ldm(_ldm_config(task, steps), first_stage, sources, run_dir, text_encoder=FakeTextEncoder(),
                        quiet=True, on_step=lambda step, log: logs.append(log["loss"]))
    return trainer, logs


@pytest.mark.slow
def test_txt2img_ldm_resumes_exactly_and_exports_official_layout(tmp_path, first_stage):
    straight, losses_straight = _run_ldm("txt2img", 4, tmp_path / "straight", first_stage)
    assert all(np.isfinite(losses_straight))
    _run_ldm("txt2img", 2, tmp_path / "resumed", first_stage)
    resumed, losses_resumed = _run_ldm("txt2img", 4, tmp_path / "resumed", first_stage)
    assert resumed.step == 4 and losses_resumed == losses_straight[2:]
    for key, value in straight.ema.state_dict().items():
        assert torch.equal(resumed.ema.state_dict()[key], value)
    changed = [not torch.equal(a, b) for a, b in zip(straight.unet.parameters(), straight.ema.parameters())]
    assert any(changed)  # the EMA lags the trained weights

    export = tmp_path / "straight" / "export"
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    expected = {"model.diffusion_model." + k for k in straight.ema.state_dict()}
    expected |= {"first_stage_model." + k for k in first_stage.first_stage.state_dict()}
    assert keys == expected
    config = json.loads((export / "config.json").read_text())["model"]["params"]
    assert config["cond_stage"] == "minilm" and config["conditioning_key"] == "crossattn"
    assert config["scale_factor"] == pytest.approx(straight.scale_factor) and config["scale_factor"] > 0

    loaded = load_model(export)
    assert loaded.family == "ldm-txt2img" and type(loaded.cond_stage).__name__ == "MiniLMEmbedder"
    assert loaded.spec.conditioning == "text" and loaded.scale_factor == pytest.approx(straight.scale_factor)
    torch.testing.assert_close(loaded.alphas_cumprod, straight.alphas_cumprod)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    context = FakeTextEncoder()(["a", "b"])
    reference = straight.ema.half().float().eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, t, context=context), reference(x, t, context=context),
                                   rtol=1e-4, atol=1e-4)


def test_cached_emoji_latents_are_keyed_by_the_images(tmp_path, first_stage):
    """A run folder reused with other emoji encodes them anew instead of reading stale latents."""
    def latents(emoji):
        return LDMTrainer.create(_ldm_config("txt2img", 0), first_stage, LDMData(emoji=emoji),
                                 text_encoder=FakeTextEncoder(), cache_dir=tmp_path).emoji_latents

    first, other = _emoji(), EmojiSet(_emoji().images[::-1].copy(), _emoji().captions)
    assert torch.equal(latents(first), latents(first))
    assert len(list(tmp_path.glob("emoji-latents-*.pt"))) == 1
    torch.testing.assert_close(latents(other), latents(first).flip(0))
    assert len(list(tmp_path.glob("emoji-latents-*.pt"))) == 2


def test_mirrored_emoji_are_the_flipped_images_latents_and_only_mirrorable_ones_flip(tmp_path, first_stage):
    """--mirror: row N + i holds image i flipped; a batch takes it for mirrorable images only, with
    the unflipped image's caption."""
    emoji = _emoji()
    emoji.mirrors = np.array([True, False] * 3)
    config = replace(_ldm_config("txt2img", 0), mirror=True)
    trainer = LDMTrainer.create(config, first_stage, LDMData(emoji=emoji), text_encoder=FakeTextEncoder(),
                                cache_dir=tmp_path)
    flipped = EmojiSet(emoji.images[:, :, ::-1].copy(), emoji.captions)
    plain = LDMTrainer.create(_ldm_config("txt2img", 0), first_stage, LDMData(emoji=flipped),
                              text_encoder=FakeTextEncoder())
    assert len(trainer.emoji_latents) == 12
    torch.testing.assert_close(trainer.emoji_latents[6:], plain.emoji_latents)
    rows = trainer._mirrored(torch.arange(6).repeat(20), torch.Generator().manual_seed(0))
    taken = set(zip(torch.arange(6).repeat(20).tolist(), rows.tolist()))
    assert taken == {(i, i) for i in range(6)} | {(i, i + 6) for i in (0, 2, 4)}


def test_random_views_move_the_drawing_on_white_and_keep_it_at_zero_strength():
    """--augment: a view with no scale, turn or shift is the image itself (mirrored where asked);
    a real one moves the drawing and fills what it uncovers with white."""
    x = data.emoji_at(_emoji(count=4, size=16).images, 16)
    generator = torch.Generator().manual_seed(0)
    flip = torch.tensor([False, True, False, True])
    same = data.random_views(x, generator, flip, scale=(1.0, 1.0), degrees=0.0, shift=0.0)
    torch.testing.assert_close(same[0::2], x[0::2], atol=1e-5, rtol=0)
    torch.testing.assert_close(same[1::2], x[1::2].flip(-1), atol=1e-5, rtol=0)
    small = data.random_views(x, generator, torch.zeros(4, dtype=torch.bool), scale=(0.5, 0.5), degrees=30.0)
    assert small.shape == x.shape and (small - x).abs().mean() > 0.1
    assert torch.allclose(small[:, :, 0, 0], torch.ones(4, 3), atol=1e-5)  # a corner left uncovered is white


def test_augmented_views_follow_the_mirrors_and_take_half_of_the_batch(tmp_path, first_stage):
    """--augment 2 with --mirror: rows 2N + kN + i hold view k of image i, encoded once and cached
    under their own key; a batch draws them for about half of its images, the rest as before."""
    emoji = _emoji()
    emoji.mirrors = np.array([True, False] * 3)
    config = replace(_ldm_config("txt2img", 0), mirror=True, augment=2)

    def trainer():
        return LDMTrainer.create(config, first_stage, LDMData(emoji=emoji), text_encoder=FakeTextEncoder(),
                                 cache_dir=tmp_path)

    latents = trainer().emoji_latents
    assert len(latents) == 24 and len(list(tmp_path.glob("emoji-latents-*views2-0.pt"))) == 1
    assert not torch.allclose(latents[12:18], latents[:6]) and not torch.allclose(latents[12:18], latents[18:])
    torch.testing.assert_close(trainer().emoji_latents, latents)
    indices = torch.arange(6).repeat(200)
    rows = trainer()._viewed(indices, indices, torch.Generator().manual_seed(0))
    assert ((rows - indices) % 6 == 0).all() and set(((rows - indices) // 6).tolist()) == {0, 2, 3}
    assert (rows >= 12).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_category_power_shares_draws_between_categories():
    """--category-power: a category of n images gets n ** power of the draws; 1 keeps plain uniform draws."""
    emoji = _emoji(count=40)
    emoji.categories = ["people"] * 36 + ["food"] * 4
    share = {}
    for power in (1.0, 0.5, 0.0):
        drawn = emoji.draw(20000, torch.Generator().manual_seed(0), power)
        share[power] = (drawn >= 36).float().mean().item()
        assert set(drawn[drawn >= 36].tolist()) == {36, 37, 38, 39}
    assert share[1.0] == pytest.approx(4 / 40, abs=0.01)
    assert share[0.5] == pytest.approx(2 / (2 + 6), abs=0.01)
    assert share[0.0] == pytest.approx(0.5, abs=0.01)
    uniform = torch.randint(40, (20000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(emoji.draw(20000, torch.Generator().manual_seed(0)), uniform)


def test_ldm_learning_rate_follows_warmup_and_cosine(first_stage):
    config = replace(_ldm_config("txt2img", 10), warmup=2, min_lr=0.1, channels_last=True)
    trainer = LDMTrainer.create(config, first_stage, LDMData(emoji=_emoji()), text_encoder=FakeTextEncoder())
    rates = [trainer.train_step()["lr"] for _ in range(10)]
    assert rates[0] == pytest.approx(5e-4) and rates[1] == pytest.approx(1e-3)
    assert rates[2:] == sorted(rates[2:], reverse=True) and rates[-1] > 1e-4
    assert trainer.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    constant = LDMTrainer.create(_ldm_config("txt2img", 10), first_stage, LDMData(emoji=_emoji()),
                                 text_encoder=FakeTextEncoder())
    assert {constant.train_step()["lr"] for _ in range(3)} == {1e-3}


@pytest.mark.slow
@pytest.mark.parametrize("task,family,extra", [("inpaint", "ldm-inpaint", 4), ("sr", "ldm-sr", 3)])
def test_concat_ldms_train_and_load(tmp_path, first_stage, task, family, extra):
    trainer, logs = _run_ldm(task, 2, tmp_path, first_stage)
    assert all(np.isfinite(logs))
    z0, cond = trainer.batch(2, torch.Generator().manual_seed(0))
    assert cond.concat.shape == (2, extra, 8, 8) and z0.shape == (2, 3, 8, 8)
    if task == "inpaint":
        assert set(cond.concat[:, -1].unique().tolist()) <= {0.0, 1.0}
    loaded = load_model(tmp_path / "export")
    layout = "masked-image+mask" if task == "inpaint" else "low-res-image"
    assert loaded.family == family and loaded.spec.concat == layout and loaded.cond_stage is None
    assert loaded.unet.input_blocks[0][0].in_channels == 3 + extra
    grid = trainer.samples(2)
    assert grid.shape == (6, 3, 16, 16) and torch.isfinite(grid).all()


@pytest.mark.slow
def test_ldm_fine_tunes_from_an_exported_model(tmp_path, first_stage):
    """--init-from: the UNet and its EMA start on the exported weights, with their scale factor."""
    _run_ldm("inpaint", 2, tmp_path / "base", first_stage)
    base = load_model(tmp_path / "base" / "export")
    trainer = LDMTrainer.create(_ldm_config("inpaint", 0), first_stage, LDMData(photos=_photos()))
    trainer.start_from(base)
    for key, value in base.unet.state_dict().items():
        assert torch.equal(trainer.unet.state_dict()[key], value) and torch.equal(trainer.ema.state_dict()[key], value)
    assert trainer.scale_factor == base.scale_factor and trainer.step == 0

    other = copy.deepcopy(base)
    with torch.no_grad():
        other.first_stage.decoder.conv_out.weight.add_(1)
    trainer.start_from(other)  # a fine-tuned decoder renders the same latent space
    with torch.no_grad():
        other.first_stage.encoder.conv_in.weight.add_(1)
    with pytest.raises(LatentgenError, match="another latent space"):
        trainer.start_from(other)
    wider = LDMTrainer.create(replace(_ldm_config("inpaint", 0), model_channels=64), first_stage,
                             LDMData(photos=_photos()))
    with pytest.raises(LatentgenError, match="another UNet architecture"):
        wider.start_from(base)


GROWTHS = {  # a larger UNet's parameters, how it grows from the smaller one, and two weights of a new block:
    # its output projection, which starts at zero, and an inner layer, which keeps its initialisation
    "transformer-depth-2": ({"transformer_depth": 2}, grow_transformer_depth,
                            lambda unet: unet.middle_block[1].transformer_blocks[1].ff.net[2].weight,
                            lambda unet: unet.middle_block[1].transformer_blocks[1].attn2.to_q.weight),
    "res-blocks-2": ({"num_res_blocks": 2}, lambda unet, state: grow_res_blocks(unet, state, levels=3),
                     lambda unet: unet.output_blocks[1][0].out_layers[3].weight,  # the 4 x 4 level's second
                     lambda unet: unet.output_blocks[1][0].in_layers[2].weight),
    "res-blocks-3": ({"num_res_blocks": 3}, lambda unet, state: grow_res_blocks(unet, state, levels=3),
                     lambda unet: unet.output_blocks[5][1].proj_out.weight,  # the 8 x 8 level's third
                     lambda unet: unet.output_blocks[5][1].proj_in.weight),
}


@pytest.mark.parametrize("case", GROWTHS)
def test_grown_unet_starts_as_the_smaller_model(case):
    """--transformer-depth or --num-res-blocks above --init-from's: the trained blocks are kept (and
    renumbered), the new ones are zero-output residuals (a new output block's skip convolution drops
    the repeated skip it is fed), so the grown UNet computes what the smaller one did and then trains
    the new blocks."""
    larger, grow, new_weight, inner_weight = GROWTHS[case]
    params = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                  num_res_blocks=1, channel_mult=[1, 2, 2], num_head_channels=16, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=24)
    torch.manual_seed(0)
    small = UNetModel(**params)
    with torch.no_grad():
        for parameter in small.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # trained: no zero-initialised projections left
    grown = UNetModel(**{**params, **larger})
    state = small.state_dict()
    grow(grown, state)
    grown.load_state_dict(state)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, context=context), small(x, t, context=context))
    assert not new_weight(grown).any() and inner_weight(grown).any()
    grown(x, t, context=context).square().mean().backward()
    assert new_weight(grown).grad.abs().sum() > 0


@pytest.mark.slow
def test_v_prediction_zero_snr_min_snr_ldm_trains_exports_and_samples(tmp_path, first_stage):
    """The recipe issue 14 calls for: v targets on a zero-terminal-SNR schedule, Min-SNR-gamma
    weights, an EMA with a half-life; the export says so and loads as such."""
    config = replace(_ldm_config("txt2img", 3), parameterization="v", zero_terminal_snr=True, min_snr_gamma=5.0,
                     ema_half_life=100)
    sources = LDMData(emoji=_emoji())
    trainer = train_ldm(config, first_stage, sources, tmp_path / "v", text_encoder=FakeTextEncoder(), quiet=True)
    assert trainer.alphas_cumprod[-1] == 2.0**-24
    exported = json.loads((tmp_path / "v" / "export" / "config.json").read_text())["model"]["params"]
    assert exported["parameterization"] == "v" and exported["zero_terminal_snr"] is True
    assert len(exported["preview_projection"]) == 3 + 1  # latent channels + bias, for previews
    loaded = load_model(tmp_path / "v" / "export")
    assert loaded.parameterization == "v" and loaded.spec.schedule.zero_terminal_snr
    from latentgen import tasks
    from latentgen.guidance import Conditioning

    context = torch.randn(1, 77, 8)  # the fake text encoder's width (the export names MiniLM)
    z = tasks._sample(tasks.prepare(loaded, "cpu", "fp32"), Conditioning(context=context), None,
                      tasks.Sampling(steps=3), torch.randn(1, 3, 8, 8), None, None)
    assert torch.isfinite(z).all()  # trailing DDIM from pure noise, v outputs
    weights = losses.min_snr_weights(torch.tensor([0.5, 0.99, 1e-4]), 5.0, "v")
    torch.testing.assert_close(weights, torch.tensor([1 / 2, 5 / 100, (1e-4 / (1 - 1e-4)) / (1 / (1 - 1e-4))]))
    with pytest.raises(LatentgenError, match="needs v-prediction"):
        train_ldm(replace(config, parameterization="eps"), first_stage, sources, tmp_path / "eps",
                  text_encoder=FakeTextEncoder(), quiet=True)


def test_min_snr_plus_one_keeps_the_noisiest_steps_weighted(first_stage):
    """Min-SNR's v weight min(SNR, 5) / (SNR + 1) vanishes towards pure noise; clamping SNR + 1
    instead keeps the plain v-loss weight 1 there and still caps the low-noise steps."""
    alpha = torch.tensor([2.0**-24, 0.05, 0.5, 0.8, 0.99])
    snr = alpha / (1 - alpha)
    torch.testing.assert_close(losses.min_snr_weights(alpha, 5.0, "v"), snr.clamp(max=5) / (snr + 1))
    assert losses.min_snr_weights(alpha, 5.0, "v")[0] < 1e-6
    torch.testing.assert_close(losses.min_snr_weights(alpha, 5.0, "v", plus_one=True),
                               torch.tensor([1.0, 1.0, 1.0, 1.0, 5 / 100]))
    with pytest.raises(LatentgenError, match=r"SNR \+ 1 needs v-prediction"):
        LDMTrainer.create(replace(_ldm_config("txt2img", 1), min_snr_gamma=5.0, min_snr_plus_one=True), first_stage,
                          LDMData(emoji=_emoji()), text_encoder=FakeTextEncoder())


def test_bf16_precision_runs_the_unet_in_bf16_on_fp32_master_weights(first_stage):
    """--precision bf16 autocasts the UNet on CPU too (issue 14: avx512_bf16); the weights stay fp32."""
    trainer = LDMTrainer.create(replace(_ldm_config("inpaint", 1), precision="bf16"), first_stage,
                                LDMData(photos=_photos()))
    dtypes = []
    trainer.unet.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    assert np.isfinite(trainer.train_step()["loss"])
    assert dtypes == [torch.bfloat16] and all(p.dtype == torch.float32 for p in trainer.unet.parameters())


@pytest.mark.slow
def test_ldm_on_a_bundled_first_stage_names_it_instead_of_storing_a_copy(tmp_path, first_stage, monkeypatch):
    """weights/ holds each bundled autoencoder once: an LDM trained on one exports `first_stage:
    NAME` and only its UNet, and loads the named autoencoder's tensors."""
    weights = tmp_path / "weights"
    first_stage_folder = weights / "tiny-ae"
    runs.export_folder(first_stage_folder, first_stage.first_stage.state_dict(),
                       {"model": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                  "params": first_stage.params["first_stage_config"]["params"]}})
    monkeypatch.setenv("LATENTGEN_WEIGHTS", str(weights))
    assert catalog.bundled_name(first_stage_folder) == "tiny-ae" and catalog.bundled_name(tmp_path) is None
    bundled = load_model("tiny-ae")
    trainer = train_ldm(_ldm_config("inpaint", 1), bundled, LDMData(photos=_photos()), tmp_path / "run",
                        quiet=True, first_stage_name=catalog.bundled_name(first_stage_folder))
    export = tmp_path / "run" / "export"
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        assert all(key.startswith("model.diffusion_model.") for key in f.keys())
    params = json.loads((export / "config.json").read_text())["model"]["params"]
    assert params["first_stage"] == "tiny-ae" and "first_stage_config" not in params
    loaded = load_model(export)
    assert loaded.spec.factor == trainer.first_stage_spec.factor and loaded.family == "ldm-inpaint"
    for key, value in first_stage.first_stage.state_dict().items():
        assert torch.equal(loaded.first_stage.state_dict()[key], value.to(loaded.first_stage.state_dict()[key].dtype))

    both = tmp_path / "both"
    tensors = {f"model.diffusion_model.{k}": v for k, v in trainer.ema.state_dict().items()}
    tensors.update({f"first_stage_model.{k}": v for k, v in bundled.first_stage.state_dict().items()})
    runs.export_folder(both, tensors, json.loads((export / "config.json").read_text()))
    with pytest.raises(LatentgenError, match="names first_stage 'tiny-ae' and also stores"):
        load_model(both)
    monkeypatch.setenv("LATENTGEN_WEIGHTS", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(LatentgenError, match="bundled model 'tiny-ae' is not installed"):
        load_model(export)
