"""What each feature *means*, on the trained shapes models as shipped (`config/models.yaml`'s
`tiny-sd`, its inpainting model, its `outline` LoRA and `tiny-canny` ControlNet), through
the replica's own code path (ModelRunner), judged by pixel analysis
(`serve_app.training.judge`).

Everything is seeded, so each figure is exact on a given machine; the floors below sit a
little under what the shipped weights measure (README: "The embedded model: trained here"), so
a change that breaks a feature's meaning fails while rounding differences between CPUs do
not.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from serve_app.generation.runner import ModelRunner
from serve_app.messages import ControlInput, GenerationTask, HiresFix, JobType
from serve_app.registry import ModelSpec, Registry
from serve_app.settings import Settings
from serve_app.training import judge as judging
from serve_app.training import world
from serve_app.training.evaluate import quality_grid
from tests.support.generation import input_image, tiny_settings

# A handful of prompts as a person writes them, with what they ask for.
PROMPTS: list[tuple[str, dict[str, str]]] = [
    ("a red circle on a blue background",
     {"colour": "red", "shape": "circle", "background": "blue"}),
    ("a small yellow triangle at the top on a black background",
     {"colour": "yellow", "shape": "triangle", "background": "black", "position": "top",
      "size": "small"}),
    ("large green square in the middle, white background",
     {"colour": "green", "shape": "square", "background": "white", "position": "center",
      "size": "large"}),
    ("a purple circle on the right, orange background",
     {"colour": "purple", "shape": "circle", "background": "orange", "position": "right"}),
    ("white triangle on the left on a red background",
     {"colour": "white", "shape": "triangle", "background": "red", "position": "left"}),
    ("a blue square at the bottom on a yellow background",
     {"colour": "blue", "shape": "square", "background": "yellow", "position": "bottom"}),
]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory)


@pytest.fixture(scope="module")
def spec(registry: Registry) -> ModelSpec:
    found = registry.get("tiny-sd")
    assert found is not None and found.source == "trained"
    return found


@pytest.fixture(scope="module")
def runner(spec: ModelSpec, settings: Settings) -> ModelRunner:
    return ModelRunner(spec, settings)


@pytest.fixture(scope="module")
def inpaint_runner(registry: Registry, settings: Settings) -> ModelRunner:
    found = registry.get("tiny-sd-inpaint")
    assert found is not None
    return ModelRunner(found, settings)


def task(spec: ModelSpec, prompt: str, seed: int, **fields: object) -> GenerationTask:
    """A job at the model's defaults (what a request that names only a prompt gets)."""
    d = spec.defaults
    base: dict[str, object] = dict(
        job_id=f"job-{seed}", mode=JobType.TEXT2IMG, prompt=prompt, negative_prompt="",
        width=d.width, height=d.height, steps=d.steps, guidance_scale=d.guidance_scale,
        seed=seed, sampler=d.sampler)
    base.update(fields)
    return GenerationTask(**base)  # type: ignore[arg-type]


def image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def draw(runner: ModelRunner, tasks: Sequence[GenerationTask]) -> list[Image.Image]:
    return [image(r.images[0]) for r in runner.generate_batch(list(tasks))]


# -- text conditioning ---------------------------------------------------------------------

# Prompts of the quality grid (every attribute named, phrasings varied), medium and large
# shapes (small ones it draws mostly round: README, "The embedded model").
GRID = [(p, t) for p, t in quality_grid(40, seed=7) if t["size"] != "small"][:12]


def colours_right(images: Sequence[Image.Image], truths: Sequence[dict[str, str]]) -> int:
    """How many images show the asked background and shape colour."""
    return sum((v.background, v.colour) == (t["background"], t["colour"])
               for v, t in zip(map(judging.judge, images), truths, strict=True))


def all_right(images: Sequence[Image.Image], truths: Sequence[dict[str, str]]) -> int:
    """How many images show every attribute asked (colours, place, size, shape)."""
    return sum(judging.judge(im).attributes() == t
               for im, t in zip(images, truths, strict=True))


def test_the_model_draws_the_colours_sizes_and_places_it_is_asked_for(
    runner: ModelRunner, spec: ModelSpec
) -> None:
    images = draw(runner, [task(spec, p, i) for i, (p, _) in enumerate(GRID)])
    truths = [t for _, t in GRID]
    shown = [judging.judge(im) for im in images]

    def right(attribute: str) -> int:
        return sum(getattr(v, attribute) == t[attribute]
                   for v, t in zip(shown, truths, strict=True))

    # Measured on the shipped weights (shapes-6): 12 of 12 for every attribute.
    assert right("background") >= 11
    assert colours_right(images, truths) >= 11
    assert all(v.colour is not None for v in shown)  # a shape is drawn, not a flat picture
    assert right("size") >= 11
    assert right("position") >= 11
    assert right("shape") >= 11


@pytest.mark.parametrize("position", sorted(world.POSITIONS))
def test_the_shape_goes_where_it_is_asked(
    runner: ModelRunner, spec: ModelSpec, position: str
) -> None:
    words = {"left": "on the left", "right": "on the right", "top": "at the top",
             "bottom": "at the bottom", "center": "in the middle"}[position]
    prompts = [f"a {colour} circle {words} on a {background} background"
               for colour, background in (("red", "blue"), ("yellow", "black"),
                                          ("white", "green"), ("orange", "purple"))]
    shown = [judging.judge(im).position
             for im in draw(runner, [task(spec, p, i) for i, p in enumerate(prompts)])]
    assert shown.count(position) >= 3, shown


# How many of `test_each_shape_word_draws_its_shape`'s six must come out as asked: measured
# 6 circles, 6 triangles and 4 squares (the large ones and one medium; the others get
# rounded corners, which the judge counts as circles). shapes-5 drew 2 squares, shapes-4
# none.
SHAPE_FLOOR = {"circle": 5, "square": 3, "triangle": 5}


@pytest.mark.parametrize("shape", world.SHAPES)
def test_each_shape_word_draws_its_shape(runner: ModelRunner, spec: ModelSpec, shape: str
                                          ) -> None:
    prompts = [f"a {size} {colour} {shape} {words} on a {background} background"
               for size, colour, words, background in (
                   ("large", "red", "in the middle", "blue"),
                   ("medium", "yellow", "on the left", "black"),
                   ("large", "white", "at the top", "green"),
                   ("medium", "orange", "on the right", "purple"),
                   ("large", "blue", "at the bottom", "white"),
                   ("medium", "green", "in the middle", "red"))]
    shown = [judging.judge(im).shape
             for im in draw(runner, [task(spec, p, i) for i, p in enumerate(prompts)])]
    assert shown.count(shape) >= SHAPE_FLOOR[shape], shown


def test_the_same_prompt_with_other_words_for_it_draws_the_same_thing(
    runner: ModelRunner, spec: ModelSpec
) -> None:
    phrasings = ["a red circle on a blue background", "red circle, blue background",
                 "on a blue background, a red circle", "a circle, red, on blue background"]
    images = draw(runner, [task(spec, p, 3) for p in phrasings])
    shown = [judging.judge(im).attributes() for im in images]
    assert [(s["colour"], s["background"]) for s in shown] == [("red", "blue")] * len(phrasings)


# -- negative prompt, guidance --------------------------------------------------------------


def test_a_negative_prompt_moves_the_shape_colour_away_from_it(
    runner: ModelRunner, spec: ModelSpec
) -> None:
    prompt = "a circle on a black background"  # no colour asked: the model picks
    plain = draw(runner, [task(spec, prompt, s) for s in range(12)])
    colours = [judging.judge(im).colour for im in plain]
    common = max(set(colours) - {None}, key=colours.count)
    steered = draw(runner, [task(spec, prompt, s, negative_prompt=common) for s in range(12)])
    after = [judging.judge(im).colour for im in steered]
    assert after.count(common) < colours.count(common) / 2, (common, colours, after)


def test_adherence_rises_from_guidance_one_to_the_default(
    runner: ModelRunner, spec: ModelSpec
) -> None:
    # 36 prompts: the model follows its captions well even unguided. As measured
    # (`shapes-7`): every attribute right in 26 images at guidance 1, 31 at the default 3;
    # both colours right in 34 and 36 (`shapes-6`, before the decoder learned from
    # text-to-image latents: 26 and 33), too near the ceiling to tell the two apart.
    grid = [(p, t) for p, t in quality_grid(108, seed=7) if t["size"] != "small"][:36]
    truths = [t for _, t in grid]
    unguided = draw(runner, [task(spec, p, i, guidance_scale=1.0)
                             for i, (p, _) in enumerate(grid)])
    guided = draw(runner, [task(spec, p, i) for i, (p, _) in enumerate(grid)])
    assert spec.defaults.guidance_scale > 1.0
    assert all_right(guided, truths) >= all_right(unguided, truths) + 3
    assert colours_right(guided, truths) >= colours_right(unguided, truths)


# -- samplers -------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpm++_2m", "dpm++_2m_karras",
                                     "unipc", "heun", "lms", "plms"])
def test_every_sampler_reaches_the_asked_colours_at_the_default_steps(
    runner: ModelRunner, spec: ModelSpec, sampler: str
) -> None:
    assert sampler in spec.samplers
    images = draw(runner, [task(spec, p, i, sampler=sampler) for i, (p, _) in enumerate(GRID)])
    assert colours_right(images, [t for _, t in GRID]) >= 9  # 9 to 11 of 12 measured


# -- img2img ---------------------------------------------------------------------------------


def test_img2img_keeps_the_layout_at_low_strength_and_follows_the_prompt_at_high(
    runner: ModelRunner, spec: ModelSpec
) -> None:
    scene = world.Scene("circle", "red", "blue", "left", "large")
    init = input_image(world.render(scene, spec.defaults.width))
    prompt = "a green square at the right on a yellow background"
    low, high = (
        draw(runner, [task(spec, prompt, s, mode=JobType.IMG2IMG, init_image=init,
                           strength=strength) for s in range(4)])
        for strength in (0.2, 1.0))
    for im in low:
        kept = judging.judge(im)
        assert (kept.background, kept.position) == ("blue", "left")
    followed = [judging.judge(im).attributes() for im in high]
    right = [(v["background"], v["colour"]) == ("yellow", "green") for v in followed]
    assert sum(right) >= 3, followed


# -- inpainting ------------------------------------------------------------------------------


def test_inpainting_paints_the_prompt_inside_the_mask_and_keeps_the_rest(
    inpaint_runner: ModelRunner, spec: ModelSpec
) -> None:
    model = inpaint_runner
    px = spec.defaults.width
    scene = world.Scene("square", "red", "blue", "center", "large")
    original = world.render(scene, px)
    mask = np.zeros((px, px), np.uint8)
    x0, y0, x1, y1 = (int(v) for v in world.box(scene, px))
    mask[y0 - 4:y1 + 4, x0 - 4:x1 + 4] = 255
    tasks = [task(spec, "a yellow square on a blue background", s, mode=JobType.INPAINT,
                  init_image=input_image(original),
                  mask_image=input_image(Image.fromarray(mask, "L"))) for s in range(4)]
    outs = draw(model, tasks)
    outside = np.ones((px, px), bool)
    outside[y0 - 8:y1 + 8, x0 - 8:x1 + 8] = False  # the mask and its blended rim
    before = judging.nearest_colour(np.asarray(original).reshape(-1, 3))
    colours = []
    for out in outs:
        after = judging.nearest_colour(np.asarray(out).reshape(-1, 3))
        assert (after == before)[outside.reshape(-1)].mean() >= 0.95
        inside = np.asarray(out)[y0 + 2:y1 - 2, x0 + 2:x1 - 2].reshape(-1, 3)
        votes = list(judging.nearest_colour(inside))
        colours.append(world.COLOURS[max(set(votes), key=votes.count)])
    assert colours.count("yellow") >= 3, colours


# -- LoRA ------------------------------------------------------------------------------------


def test_the_outline_lora_at_scale_zero_is_the_base_model_and_at_one_changes_it(
    runner: ModelRunner, spec: ModelSpec
) -> None:
    # The shipped LoRA has not learned the outline style yet (README: 9 % of its images are
    # outlines, 0 % at scale 0): what is asserted is what a LoRA scale means.
    prompts = [p for p, _ in PROMPTS]
    base = [task(spec, p, i) for i, p in enumerate(prompts)]
    plain = [r.images[0] for r in runner.generate_batch(base)]
    zero = [r.images[0] for r in runner.generate_batch(
        [dataclasses.replace(t, loras=(("outline", 0.0),)) for t in base])]
    one = [r.images[0] for r in runner.generate_batch(
        [dataclasses.replace(t, loras=(("outline", 1.0),)) for t in base])]
    assert zero == plain
    assert not any(judging.is_outline(image(b)) for b in plain)
    assert all(a != b for a, b in zip(one, plain, strict=True))
    # The style changes how the shape is drawn, not the picture the prompt asked for.
    shown = [judging.judge(image(b)) for b in one]
    assert sum(s.background == t["background"] for s, (_, t) in zip(shown, PROMPTS,
                                                                    strict=True)) >= 5


# -- ControlNet ------------------------------------------------------------------------------


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def test_the_shape_follows_the_control_image_edges(runner: ModelRunner, spec: ModelSpec) -> None:
    px = spec.defaults.width
    rng = np.random.default_rng(5)
    scenes = [world.wide_scene(rng) for _ in range(6)]
    ious, ious_without = [], []
    for i, scene in enumerate(scenes):
        prompt = f"a {scene.colour} {scene.shape} on a {scene.background} background"
        control = ControlInput(model="tiny-canny", preprocess="canny",
                               image=input_image(world.render(scene, px)))
        steered = draw(runner, [task(spec, prompt, i, control=control)])[0]
        free = draw(runner, [task(spec, prompt, i)])[0]
        truth = world.box(scene, px)
        for out, into in ((steered, ious), (free, ious_without)):
            found = judging.bounding_box(out)
            into.append(0.0 if found is None else _iou(found, truth))
    assert np.mean(ious) >= 0.45, ious  # 0.50 measured; 0.07 on the grid without it
    assert np.mean(ious) > np.mean(ious_without) + 0.2, (ious, ious_without)


# -- latent previews -------------------------------------------------------------------------


def test_a_late_preview_shows_the_final_image_colours(runner: ModelRunner, spec: ModelSpec) -> None:
    got: list[tuple[int, int, dict[str, bytes]]] = []
    t = task(spec, "a yellow circle on a purple background", 2, preview_every=4)
    final = image(runner.generate(t, on_preview=lambda s, n, th: got.append((s, n, th)))
                  .images[0])
    step, total, thumbs = got[-1]
    assert step >= total * 3 // 4
    late = image(thumbs[t.job_id]).resize(final.size)
    shown, previewed = judging.judge(final), judging.judge(late)
    assert (shown.background, shown.colour) == ("purple", "yellow")
    assert (previewed.background, previewed.colour) == (shown.background, shown.colour)


# -- batching --------------------------------------------------------------------------------


def test_a_batch_of_trained_model_jobs_is_byte_identical_to_each_alone(
    runner: ModelRunner, spec: ModelSpec
) -> None:
    tasks = [task(spec, p, 40 + i) for i, (p, _) in enumerate(PROMPTS[:4])]
    batched = [r.images[0] for r in runner.generate_batch(tasks)]
    alone = [runner.generate(t).images[0] for t in tasks]
    assert batched == alone


# -- hires fix -------------------------------------------------------------------------------


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_a_hires_image_keeps_the_first_pass_picture_at_twice_the_size(
    runner: ModelRunner, spec: ModelSpec, upscaler: str
) -> None:
    # Denoising strength 0.4: the model was trained at 64 px only, and at 128 px a second
    # pass from 0.5 up starts redrawing small shapes as several blobs (measured, latent /
    # lanczos: the layout kept 4 / 5 of 6 times at 0.5, 5 / 6 at 0.4).
    d = spec.defaults
    fix = HiresFix(width=2 * d.width, height=2 * d.height, upscaler=upscaler, steps=d.steps,
                   denoising_strength=0.4, sampler=d.sampler)
    tasks = [task(spec, p, i) for i, (p, _) in enumerate(GRID[:6])]
    first = draw(runner, tasks)
    big = draw(runner, [dataclasses.replace(t, hires=fix) for t in tasks])
    assert all(im.size == (2 * d.width, 2 * d.height) for im in big)
    pairs = list(zip(map(judging.judge, first), map(judging.judge, big), strict=True))
    kept = [(a.background, a.position) == (b.background, b.position) for a, b in pairs]
    assert sum(kept) >= 4, pairs
    # The second pass runs with the prompt too: a shape colour the first pass missed may
    # move to the asked one; any other colour is a change.
    coloured = [b.colour in (a.colour, truth["colour"])
                for (a, b), (_, truth) in zip(pairs, GRID, strict=False)]
    assert sum(coloured) >= 5, pairs
