"""The training of the embedded shapes models keeps working (a smoke run of every stage, as
the shipped weights were made, only shorter), and the judge that measures them is right on
the world's own pictures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from serve_app.training import judge as judging
from serve_app.training import world


def test_the_judge_reads_every_attribute_of_rendered_scenes() -> None:
    assert judging.self_check(n=300) == {a: 1.0 for a in judging.ATTRIBUTES}


def test_the_judge_tells_an_outline_from_a_filled_shape() -> None:
    scene = world.Scene("square", "red", "blue", "center", "large")
    assert judging.is_outline(world.render(scene, 64, style="outline"))
    assert not judging.is_outline(world.render(scene, 64))


def test_captions_vary_and_name_what_the_scene_shows() -> None:
    rng = np.random.default_rng(0)
    scene = world.Scene("triangle", "yellow", "black", "top", "small")
    captions = {world.full_caption(scene, rng) for _ in range(50)}
    assert len(captions) >= 20  # templates vary: the model learns words, not sentences
    for text in captions:
        lower = text.lower()
        assert all(w in lower for w in ("yellow", "triangle", "black", "top")), text


def test_every_caption_word_is_one_token_of_the_shipped_tokenizer() -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(
        Path(__file__).parents[2] / "serve_app" / "trained" / "tiny-sd" / "tokenizer")
    for word in world.vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


@pytest.mark.timeout(600)
def test_a_smoke_run_trains_every_stage_into_loadable_checkpoints(tmp_path: Path) -> None:
    from diffusers import ControlNetModel, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    from serve_app.training.__main__ import STAGES, main

    assert main(["--out", str(tmp_path), "--smoke"]) == 0  # two workers of one thread
    report = json.loads((tmp_path / "report.json").read_text())
    assert tuple(report["stages"]) == STAGES
    assert (report["workers"], report["threads"]) == (2, 1)
    assert not (tmp_path / ".workers").exists()  # worker 1's copies, removed
    for stage in ("layout", "settle", "polish", "contrast", "corners"):  # continued tiny-sd
        assert json.loads((tmp_path / "tiny-sd" / f"{stage}.json").read_text())["history"]
    decoder = json.loads((tmp_path / "tiny-sd" / "decoder.json").read_text())
    assert decoder == report["stages"]["decoder"]["figures"] and "judge_shape" in decoder
    assert set(report["final"]["quality"]) == set(judging.ATTRIBUTES)
    # What ships is what from_pretrained loads, as the service loads it.
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny-sd")
    pipe.load_lora_weights(str(tmp_path / "tiny-outline-lora"), adapter_name="outline")
    assert "outline" in pipe.get_list_adapters()["unet"]
    StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "tiny-sd-inpaint")
    ControlNetModel.from_pretrained(tmp_path / "tiny-canny")


def test_the_denoiser_stages_share_one_encoded_pool_per_encoder() -> None:
    import torch

    from serve_app.training.data import encoded_pool
    from serve_app.training.models import new_vae

    torch.manual_seed(0)
    vae = new_vae()
    again = new_vae()  # what the next stage loads: equal weights, another object
    again.load_state_dict(vae.state_dict())
    pool = encoded_pool(vae, 6, seed=3, px=64)
    assert encoded_pool(again, 6, seed=3, px=64) is pool
    other_seed = encoded_pool(vae, 6, seed=4, px=64)
    assert other_seed is not pool and other_seed.scenes != pool.scenes
    with torch.no_grad():
        again.encoder.conv_in.weight.add_(0.1)  # another encoder: encoded afresh
    changed = encoded_pool(again, 6, seed=4, px=64)
    assert changed is not other_seed and changed.scenes == other_seed.scenes
    assert not torch.equal(changed.mean, other_seed.mean)


def test_the_continued_stages_train_where_they_say() -> None:
    import torch

    from serve_app.training.denoiser import (
        CORNERS_BELOW,
        HIGH_FROM,
        LAYOUT_SHARE,
        LOW_BELOW,
        POLISH_HIGH,
        POLISH_LOW,
        sample_timesteps,
    )

    top = 1 - HIGH_FROM / 1000  # the share of uniform timesteps up there
    layout = sample_timesteps(4000, torch.Generator().manual_seed(0), LAYOUT_SHARE)
    assert bool((layout >= HIGH_FROM).all()) and int(layout.max()) == 999
    mixed = sample_timesteps(4000, torch.Generator().manual_seed(0), 0.5)
    assert bool((mixed[:2000] >= HIGH_FROM).all())
    rest = float((mixed[2000:] >= HIGH_FROM).float().mean())
    assert top - 0.03 < rest < top + 0.03 and int(mixed[2000:].min()) < 10
    plain = sample_timesteps(4000, torch.Generator().manual_seed(0))
    assert top - 0.03 < float((plain >= HIGH_FROM).float().mean()) < top + 0.03
    # polish: a quarter at the top, the last third-odd below LOW_BELOW, the rest uniform.
    high, low = round(POLISH_HIGH * 4000), round(POLISH_LOW * 4000)
    polish = sample_timesteps(4000, torch.Generator().manual_seed(0), POLISH_HIGH, POLISH_LOW)
    assert bool((polish[:high] >= HIGH_FROM).all())
    assert bool((polish[4000 - low:] < LOW_BELOW).all()) and int(polish[4000 - low:].min()) < 5
    middle = polish[high:4000 - low]
    assert 0.25 < float((middle < LOW_BELOW).float().mean()) < 0.35  # uniform: 30 %
    # corners: uniform below CORNERS_BELOW, all of it.
    corners = sample_timesteps(4000, torch.Generator().manual_seed(0), below=CORNERS_BELOW)
    assert int(corners.max()) == CORNERS_BELOW - 1 and int(corners.min()) == 0
    assert 0.47 < float((corners < CORNERS_BELOW // 2).float().mean()) < 0.53


def test_the_corner_weights_fall_where_the_three_shapes_differ() -> None:
    from serve_app.training.data import shape_disagreement, shape_weights

    scene = world.Scene("square", "red", "blue", "center", "large")  # box 17.3..46.7 px
    differ = shape_disagreement(scene, 64, 4)
    assert differ.shape == (16, 16)
    # The box's corner latent pixels: a square covers them, a circle and a triangle
    # leave most of them; its middle and everything outside the box: all three agree.
    assert differ[5, 5] > 0.9 and differ[5, 10] > 0.9
    assert differ[8, 8] == 0.0 and differ[0, 0] == 0.0 and differ[15, 8] == 0.0
    # The bottom corners: the triangle's base covers them, the circle does not.
    assert 0.3 < differ[10, 5] < 0.6
    plain = shape_weights([scene], 64, 4, 4.0)[0, 0]
    boosted = shape_weights([scene], 64, 4, 4.0, corners=16.0)[0, 0]
    for w in (plain, boosted):
        assert abs(float(w.mean()) - 1.0) < 1e-5
    assert float(plain[5, 5]) == float(plain[8, 8])  # the box: one weight
    assert float(boosted[5, 5]) > 4 * float(boosted[8, 8])  # the corners: many times more


def test_rewriting_the_denoiser_makes_resume_rerun_the_stages_that_continue_it(
    tmp_path: Path
) -> None:
    from serve_app.training.run import forget_later_stages

    folder = tmp_path / "tiny-sd"
    folder.mkdir()
    for marker in ("model_index.json", "layout.json", "settle.json", "polish.json",
                   "contrast.json", "corners.json", "decoder.json"):
        (folder / marker).write_text("{}")
    forget_later_stages(tmp_path, "polish")
    assert sorted(p.name for p in folder.iterdir()) == [
        "layout.json", "model_index.json", "polish.json", "settle.json"]
    forget_later_stages(tmp_path, "settle")
    assert sorted(p.name for p in folder.iterdir()) == [
        "layout.json", "model_index.json", "settle.json"]
    forget_later_stages(tmp_path, "denoiser")
    assert sorted(p.name for p in folder.iterdir()) == ["model_index.json"]


def test_a_triplets_captions_differ_in_the_shapes_word_alone() -> None:
    from dataclasses import replace

    from serve_app.training.contrast import triplet_captions

    rng = np.random.default_rng(3)
    named, empty = 0, 0
    for _ in range(200):
        base = world.random_scene(rng)
        captions = triplet_captions([replace(base, shape=s) for s in world.SHAPES], rng)
        if captions == ["", "", ""]:  # classifier-free guidance's share: the whole triplet
            empty += 1
            continue
        masked = {re.sub(r"\b(circle|square|triangle)\b", "SHAPE", c, flags=re.I)
                  for c in captions}
        assert len(masked) == 1, captions  # the same words but the shape's
        named += all(s in c.lower() for s, c in zip(world.SHAPES, captions, strict=True))
    assert 5 <= empty <= 40 and named >= 150  # a caption may leave the shape unnamed


def test_the_low_noise_samples_get_their_neighbours_captions() -> None:
    from serve_app.training.denoiser import neighbours_captions

    captions = ["a", "b", "c", "d", "e"]
    assert neighbours_captions(captions, 3) == ["a", "b", "d", "e", "c"]
    assert neighbours_captions(captions, 1) == captions  # one sample: nobody to swap with
    assert neighbours_captions(captions, 0) == captions


def test_the_decoder_stage_moves_the_decoder_only() -> None:
    """The latent space every other stage was trained in stays put: encoder, quant_conv
    and scaling factor are the shipped ones to the bit; the decoder did learn."""
    import torch
    from diffusers import StableDiffusionPipeline

    from serve_app.training.decoder import train_decoder

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(
        Path(__file__).parents[2] / "serve_app" / "trained" / "tiny-sd")
    vae, figures = train_decoder(pipe, steps=2, batch=4, pool=4)
    before, after = pipe.vae.state_dict(), vae.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved)
    assert any(k.startswith("decoder.") for k in moved)
    assert vae.config.scaling_factor == pipe.vae.config.scaling_factor
    assert 0.0 <= figures["judge_min"] <= 1.0


def test_decoder_windows_pair_a_latent_window_with_its_pixels() -> None:
    import torch

    from serve_app.training.decoder import WINDOW, windows
    from serve_app.training.models import VAE_FACTOR

    # Each latent pixel holds its grid coordinates; each picture pixel its own, over 4.
    grid = 16
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    latents = torch.stack([ys, xs]).float()[None].repeat(3, 1, 1, 1)
    py, px = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    pictures = torch.stack([py // VAE_FACTOR, px // VAE_FACTOR]).float()[None].repeat(3, 1, 1, 1)
    boxes = [(0.0, 0.0, 10.0, 10.0), (50.0, 50.0, 64.0, 64.0), (20.0, 28.0, 40.0, 44.0)]
    z, x = windows(latents, pictures, boxes, np.random.default_rng(0))
    assert z.shape == (3, 2, WINDOW // VAE_FACTOR, WINDOW // VAE_FACTOR)
    assert x.shape == (3, 2, WINDOW, WINDOW)
    assert torch.equal(x[:, :, ::VAE_FACTOR, ::VAE_FACTOR], z)  # aligned, inside the grid
    for (x0, y0, x1, y1), window in zip(boxes, z, strict=True):  # around the shape
        assert window[1].min() * 4 <= (x0 + x1) / 2 <= (window[1].max() + 1) * 4
        assert window[0].min() * 4 <= (y0 + y1) / 2 <= (window[0].max() + 1) * 4


def test_a_drawn_latents_target_is_its_scene_drawn_crisp_where_the_denoiser_put_it() -> None:
    from PIL import ImageFilter

    from serve_app.training.decoder import drawn_target

    scene = world.Scene("square", "red", "blue", "left", "large", dx=0.02, dy=-0.01)
    # What a denoiser draws: the scene, its edges blurred, and moved 3 pixels right.
    moved = world.Scene("square", "red", "blue", "left", "large", dx=0.02 + 3 / 64, dy=-0.01)
    soft = world.render(moved, 64).filter(ImageFilter.GaussianBlur(1.5))
    assert judging.judge(soft).shape == "square"
    target = drawn_target(scene, soft)
    assert target is not None
    picture, box = target
    # The box is where it was drawn (not where the scene says), found at the blur's middle.
    assert np.allclose(box, world.box(moved, 64), atol=1.0)
    drawn, truth = (np.asarray(im, np.int16) for im in (picture, world.render(moved, 64)))
    assert np.abs(drawn - truth).any(-1).mean() < 0.01  # the same square, to a pixel's rim
    colours = {tuple(c) for c in drawn.reshape(-1, 3)}
    assert colours == {world.PALETTE["red"], world.PALETTE["blue"]}  # crisp: two colours

    # Left out: a picture in other colours, or one that plainly shows another shape.
    green = world.Scene("square", "green", "blue", "left", "large", dx=0.02, dy=-0.01)
    assert drawn_target(green, soft) is None
    triangle = world.render(world.Scene("triangle", "red", "blue", "left", "large"), 64)
    assert drawn_target(scene, triangle) is None


def test_the_fill_bands_teach_rounded_squares_square_and_squarish_circles_nothing() -> None:
    """A square drawn with corners rounded as far as a circle's fill ratio (the judge reads
    a circle) still becomes a crisp square when a square was asked; a circle drawn squarish
    (fill 0.88, just under the judge's cut) teaches nothing, so no latent on that border is
    taught to be a circle."""
    from PIL import Image, ImageDraw

    from serve_app.training.decoder import FILL_BANDS, drawn_target

    def rounded(radius: int) -> Image.Image:
        picture = Image.new("RGB", (64, 64), world.PALETTE["blue"])
        x0, y0, x1, y1 = (round(v) for v in world.box(square, 64))
        ImageDraw.Draw(picture).rounded_rectangle((x0, y0, x1 - 1, y1 - 1), radius=radius,
                                                  fill=world.PALETTE["red"])
        return picture

    square = world.Scene("square", "red", "blue", "center", "medium")
    circle = world.Scene("circle", "red", "blue", "center", "medium")
    round_square, squarish = rounded(10), rounded(7)
    assert [judging.judge(p).fill for p in (round_square, squarish)] == [0.77, 0.88]
    assert {judging.judge(p).shape for p in (round_square, squarish)} == {"circle"}
    target = drawn_target(square, round_square)
    assert target is not None and judging.judge(target[0]).shape == "square"
    assert drawn_target(circle, round_square) is not None  # a circle's fill: taught a circle
    assert drawn_target(circle, squarish) is None
    assert drawn_target(square, squarish) is not None
    assert FILL_BANDS["circle"][1] < 0.88 and FILL_BANDS["square"][0] < 0.77


def test_the_denoiser_stage_encodes_with_the_vae_every_later_stage_loads(tmp_path: Path) -> None:
    """Its VAE is the shipped one (float16 weights): the later stages, loading the saved
    pipeline, get equal encoder bytes, so they reuse its encoded pool."""
    import torch

    from serve_app.training.data import encoded_pool
    from serve_app.training.models import new_text_encoder, new_unet, new_vae
    from serve_app.training.pipeline import assemble, save
    from serve_app.training.run import FOLDERS, _base, vae_as_shipped
    from serve_app.training.tokenizer import build_tokenizer_files, load_tokenizer

    torch.manual_seed(0)
    new_vae().save_pretrained(tmp_path / FOLDERS["vae"])  # the VAE stage's float32 output
    vae = vae_as_shipped(tmp_path)
    assert vae.dtype == torch.float32
    tokenizer = load_tokenizer(build_tokenizer_files(tmp_path / FOLDERS["tokenizer"]))
    save(assemble(vae, new_text_encoder(tokenizer), tokenizer, new_unet()),
         tmp_path / FOLDERS["denoiser"])
    later = _base(tmp_path).vae
    first = encoded_pool(vae, 4, seed=5, px=64)
    assert encoded_pool(later, 4, seed=5, px=64) is first
    raw = type(vae).from_pretrained(tmp_path / FOLDERS["vae"])  # before: the float32 bytes
    assert encoded_pool(raw, 4, seed=5, px=64) is not first
