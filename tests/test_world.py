"""The procedural world: deterministic from a seed, captions that say what is drawn, motions valid for any length."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from mmpl_fast import world
from mmpl_fast.tiny import tiny_tokenizer
from mmpl_fast.world.train import TEXT_LEN


def palette_counts(frames: np.ndarray) -> dict[str, int]:
    """Pixels exactly equal to each palette colour (anti-aliased edges match none)."""
    flat = frames.reshape(-1, 3)
    return {name: int((flat == np.array(rgb, np.uint8)).all(1).sum()) for name, rgb in world.PALETTE.items()}


def test_same_seed_same_scene_and_frames():
    for seed in (0, 7, 123456):
        a, b = world.sample_scene(seed), world.sample_scene(seed)
        assert a == b and world.caption(a) == world.caption(b)
        assert np.array_equal(world.render(a, 12, 32, 48), world.render(b, 12, 32, 48))
    scenes = {world.caption(world.sample_scene(s)) for s in range(50)}
    assert len(scenes) >= 45  # seeds give different scenes
    f1, c1 = world.clip(5, 9, 32, 32)
    f2, c2 = world.clip(5, 9, 32, 32)
    assert c1 == c2 and np.array_equal(f1, f2)


def test_any_window_equals_the_same_frames_of_a_long_render():
    scene = world.sample_scene(3)
    full = world.render(scene, 960, 32, 32)  # 60 s at 16 fps
    assert full.shape == (960, 32, 32, 3) and full.dtype == np.uint8
    assert np.array_equal(world.render(scene, 16, 32, 32, start=900), full[900:916])
    assert np.array_equal(world.render(scene, 5, 32, 32, start=0, chunk=2), full[:5])


def test_captions_round_trip_and_use_only_tokenizer_words():
    tok = tiny_tokenizer()
    unk = tok.convert_tokens_to_ids("<unk>")
    seen = {"shape": set(), "motion": set(), "count": set(), "size": set()}
    for seed in range(300):
        scene = world.sample_scene(seed)
        text = world.caption(scene)
        background, objects = world.parse_caption(text)
        assert background == scene.background
        assert objects == [{"size": o.size, "color": o.color, "shape": o.shape, "motion": o.motion.words}
                           for o in scene.objects]  # fmt: skip
        ids = tok(text).input_ids
        assert unk not in ids, text
        assert len(ids) <= TEXT_LEN, text  # the training text length holds every caption untruncated
        seen["count"].add(len(objects))
        for o in scene.objects:
            seen["shape"].add(o.shape)
            seen["motion"].add(o.motion.kind)
            seen["size"].add(o.size)
    assert seen == {"shape": set(world.SHAPES), "motion": set(world.MOTIONS), "count": {1, 2, 3},
                    "size": set(world.SIZES)}  # fmt: skip


@pytest.mark.parametrize("antialias", [True, False])
def test_rendered_colours_are_the_captions_colours(antialias):
    for seed in range(40):
        scene = world.sample_scene(seed)
        background, objects = world.parse_caption(world.caption(scene))
        frames = world.render(scene, 6, 48, 64, start=7 * seed, antialias=antialias)
        counts = palette_counts(frames)
        assert max(counts, key=counts.get) == background
        for o in objects:
            assert counts[o["color"]] >= 6 * 4, (seed, o)  # every shape is visible
        shown = {name for name, n in counts.items() if n >= 4}
        assert shown == {background, *(o["color"] for o in objects)}, seed


def test_bouncing_and_circling_stay_inside_and_straight_wraps():
    times = np.arange(60 * world.FPS) / world.FPS
    kinds = set()
    for seed in range(120):
        for obj in world.sample_scene(seed).objects:
            for aspect in (1.0, 16 / 9, 0.75):
                a, b = (aspect, 1.0) if aspect >= 1 else (1.0, 1 / aspect)
                x, y = world.positions(obj, times, aspect)
                if obj.motion.kind == "straight":
                    assert (x >= 0).all() and (x < a).all() and (y >= 0).all() and (y < b).all()
                    continue
                e = obj.extent - 1e-9
                assert (x >= e).all() and (x <= a - e).all() and (y >= e).all() and (y <= b - e).all(), obj
                if obj.motion.kind == "bouncing":  # it reaches the walls and comes back: a reflection
                    steps = np.diff(x)
                    assert (steps > 0).any() and (steps < 0).any()
                kinds.add(obj.motion.kind)
    assert kinds == {"bouncing", "circling"}
    # a straight shape keeps its area on screen while it wraps around the edges
    motion = world.Motion("straight", 0.5, 0.5, direction="right", speed=0.2)
    scene = world.Scene("black", (world.SceneObject("square", "red", "large", motion),))
    frames = world.render(scene, 160, 32, 32, antialias=False)
    area = (frames == np.array(world.PALETTE["red"], np.uint8)).all(-1).sum((1, 2))
    assert area.min() >= 0.85 * area.max()
    left_edge = (frames[:, :, 0] == np.array(world.PALETTE["red"], np.uint8)).all(-1).any(1)
    right_edge = (frames[:, :, -1] == np.array(world.PALETTE["red"], np.uint8)).all(-1).any(1)
    assert (left_edge & right_edge).any()  # split across the edge at some frame


def test_circling_is_periodic():
    motion = world.Motion("circling", 0.5, 0.5, radius=0.2, period=4.0, phase=1.0)
    obj = world.SceneObject("circle", "red", "small", motion)
    x, y = world.positions(obj, np.array([1.25, 5.25, 41.25]), 1.0)
    assert np.allclose(x, x[0]) and np.allclose(y, y[0])
    assert math.isclose(math.hypot(x[0] - 0.5, y[0] - 0.5), 0.2, rel_tol=1e-9)


def test_a_minute_of_video_is_cheap():
    start = time.perf_counter()
    frames = world.render(world.sample_scene(11), 960, 64, 64)
    assert frames.shape == (960, 64, 64, 3)
    assert time.perf_counter() - start < 10


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="seed"):
        world.sample_scene(-1)
    with pytest.raises(TypeError, match="seed"):
        world.sample_scene(1.5)
    with pytest.raises(ValueError, match="max_objects"):
        world.sample_scene(0, max_objects=4)
    scene = world.sample_scene(0)
    with pytest.raises(ValueError, match="num_frames"):
        world.render(scene, 0, 32, 32)
    with pytest.raises(ValueError, match="height"):
        world.render(scene, 1, 0, 32)
    with pytest.raises(ValueError, match="fps"):
        world.render(scene, 1, 32, 32, fps=0)
    with pytest.raises(TypeError, match="scene"):
        world.render("a red circle", 1, 32, 32)
    m = world.Motion("bouncing", 0.5, 0.5, speed=0.1, angle=0.7)
    with pytest.raises(ValueError, match="differ"):
        world.Scene(
            "black",
            (
                world.SceneObject("circle", "red", "small", m),
                world.SceneObject("square", "red", "large", m),
            ),
        )
    with pytest.raises(ValueError, match="background"):
        world.Scene("black", (world.SceneObject("circle", "black", "small", m),))
    with pytest.raises(ValueError, match="shape"):
        world.SceneObject("hexagon", "red", "small", m)
    with pytest.raises(ValueError, match="direction"):
        world.Motion("straight", 0.5, 0.5, direction="sideways")
    with pytest.raises(ValueError, match="background"):
        world.parse_caption("a red circle")
    with pytest.raises(ValueError, match="clause"):
        world.parse_caption("a red circle on a black background")


# ------------------------------------------------------------------------------ evaluation metrics (evaluate.py)
def test_detector_names_every_shape_colour_and_size():
    from mmpl_fast.world import evaluate

    for shape in world.SHAPES:
        for size in world.SIZES:
            motion = world.Motion("circling", 0.5, 0.5, radius=0.15, period=4.0)
            scene = world.Scene("white", (world.SceneObject(shape, "blue", size, motion),))
            for frame in world.render(scene, 8, 64, 64, start=3):
                report = evaluate.detect(frame)
                assert report.background == "white" and len(report.objects) == 1
                (obj,) = report.objects
                assert (obj.color, obj.shape) == ("blue", shape), (size, obj)


def test_ground_truth_scores_full_adherence_and_no_drift():
    from mmpl_fast.world import evaluate
    from mmpl_fast.world.train import HELDOUT_SEED

    for k in range(3):
        scene = world.sample_scene(HELDOUT_SEED + k)
        rows = evaluate.video_metrics(world.render(scene, 161, 64, 64), world.caption(scene))
        assert len(rows) == 11 and rows[-1]["time"] == 10.0
        assert np.mean([r["adherence"] for r in rows]) >= 0.95
        for r in rows:
            assert r["background_drift"] == 0 and r["color_drift"] < 0.05 and r["size_drift"] < 0.2
            assert r["count_drift"] == 0


def test_metrics_see_a_wrong_caption_and_drift():
    from mmpl_fast.world import evaluate

    motion = world.Motion("bouncing", 0.3, 0.4, speed=0.2, angle=0.6)
    a = world.Scene("black", (world.SceneObject("square", "red", "large", motion),))
    wrong = "a large green circle bouncing on a white background"
    assert evaluate.adherence(evaluate.detect(world.render(a, 1, 64, 64)[0]), wrong) == 0
    half = "a large red circle bouncing on a black background"  # right colours, wrong shape
    assert evaluate.adherence(evaluate.detect(world.render(a, 1, 64, 64)[0]), half) == pytest.approx(2 / 3)
    report = evaluate.detect(world.render(a, 1, 64, 64)[0])
    # a red square under a caption naming a red circle: the square is a shape nobody asked for
    assert evaluate.checks(report, half) == {"background_ok": 1.0, "color_found": 1.0, "shape_ok": 0.0,
                                             "no_unprompted": 0.0}  # fmt: skip
    assert evaluate.checks(report, wrong) == {"background_ok": 0.0, "color_found": 0.0, "shape_ok": 0.0,
                                              "no_unprompted": 0.0}  # fmt: skip
    right = "a large red square bouncing on a black background"
    assert evaluate.checks(report, right) == dict.fromkeys(evaluate.CHECKS, 1.0)
    # the second half of the video changes background, shape colour and size: every drift metric sees it
    b = world.Scene("gray", (world.SceneObject("square", "orange", "small", motion),))
    frames = np.concatenate([world.render(a, 96, 64, 64), world.render(b, 96, 64, 64, start=96)])
    rows = evaluate.video_metrics(frames, world.caption(a))
    first, last = rows[0], rows[-1]
    assert first["adherence"] == 1 and last["adherence"] < 0.5
    assert first["background_drift"] == 0 and last["background_drift"] > 0.2
    assert last["color_drift"] == 1 and last["size_drift"] == 1  # the red square is gone
    assert last["count_drift"] == 0  # still one shape


def test_no_unprompted_objects_passes_ground_truth():
    """Rendered clips of the evaluation's 8 held-out scenes (20 s each): >= 98 % of frames show nothing the
    caption does not name (16 scenes at 60 s: 98.5 %, see the module doc of `evaluate`)."""
    from mmpl_fast.world import evaluate
    from mmpl_fast.world.train import HELDOUT_SEED

    scores = []
    for k in range(8):
        scene = world.sample_scene(HELDOUT_SEED + k)
        rows = evaluate.video_metrics(world.render(scene, 321, 64, 64), world.caption(scene))
        scores += [r["no_unprompted"] for r in rows]
    assert np.mean(scores) >= 0.98


@pytest.mark.parametrize("k", [0, 3])
def test_no_unprompted_objects_fails_on_an_added_object(k):
    """The same clip with one more shape (a colour and a shape the caption does not name) fails the check in
    (almost) every frame, while the caption's own checks still pass: only this check sees it."""
    from mmpl_fast.world import evaluate
    from mmpl_fast.world.train import HELDOUT_SEED

    scene = world.sample_scene(HELDOUT_SEED + k)
    prompt = world.caption(scene)
    color = next(c for c in world.OBJECT_COLORS if c not in {scene.background, *(o.color for o in scene.objects)})
    shape = next(s for s in world.SHAPES if s not in {o.shape for o in scene.objects})
    motion = world.Motion("circling", 0.5, 0.5, radius=0.2, period=5.0)
    extra = world.SceneObject(shape, color, "large", motion)
    frames = world.render(world.Scene(scene.background, (extra, *scene.objects)), 161, 64, 64)  # drawn behind
    rows = evaluate.video_metrics(frames, prompt)
    assert np.mean([r["no_unprompted"] for r in rows]) <= 0.1
    assert np.mean([r["background_ok"] for r in rows]) == 1 and np.mean([r["color_found"] for r in rows]) >= 0.95
    seen = {(d.color, d.shape) for f in frames[::8] for d in evaluate.unprompted(evaluate.detect(f), prompt)}
    assert (color, shape) in seen
    clean = evaluate.video_metrics(world.render(scene, 161, 64, 64), prompt)
    assert np.mean([r["no_unprompted"] for r in clean]) >= 0.95


def test_evaluate_cli_writes_csv_summary_and_plot(tmp_path, capsys):
    from mmpl_fast.world import evaluate

    out = tmp_path / "eval"
    flags = ["--ground-truth", "--prompts", "1", "--seconds", "3", "--height", "32", "--width", "32"]
    assert evaluate.main([*flags, "--out", str(out), "--quiet"]) == 0
    for name in ("rows.csv", "summary.csv", "summary.json", "metrics.png"):
        assert (out / name).is_file(), name
    assert "mmpl_over_ar_end_drift" in capsys.readouterr().out
    truth = json.loads((out / "summary.json").read_text())["mmpl"]["checks"]
    assert truth["background_ok"] == 1 and truth["color_found"] > 0.9
    with pytest.raises(SystemExit):
        evaluate.main([*flags, "--modes", "spiral", "--out", str(out)])
    assert "--modes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main([*flags[1:], "--through-vae", "--out", str(out)])
    assert "needs --ground-truth" in capsys.readouterr().err
    # through the shipped VAE: the same clips after its encode + decode, measured the same way
    assert evaluate.main([*flags, "--through-vae", "--modes", "mmpl", "--out", str(out / "vae"), "--quiet"]) == 0
    capsys.readouterr()
    assert set(json.loads((out / "vae" / "summary.json").read_text())["mmpl"]["checks"]) == set(evaluate.CHECKS)
    # the training scenes (for the held-out vs training gap): scene seeds from 0, not from HELDOUT_SEED
    assert evaluate.main([*flags, "--training-scenes", "--modes", "mmpl", "--out", str(out / "train")]) == 0
    capsys.readouterr()
    scenes = {line.split(",")[1] for line in (out / "train" / "rows.csv").read_text().splitlines()[1:]}
    assert scenes == {"0"}


def test_evaluate_docs_flag_rewrites_the_readme_figures(tmp_path, capsys):
    """--docs DIR: the plot (one panel per `PLOTTED` metric, mmpl and ar) and the summary land in DIR under the
    names the README shows; a missing DIR is refused before any video is made."""
    import imageio.v3 as iio

    from mmpl_fast.world import evaluate

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "eval_metrics.png").write_bytes(b"old")
    flags = ["--ground-truth", "--prompts", "1", "--seconds", "2", "--height", "32", "--width", "32", "--quiet"]
    assert evaluate.main([*flags, "--out", str(tmp_path / "eval"), "--docs", str(docs)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"wrote {docs / 'eval_metrics.png'}")
    image = iio.imread(docs / "eval_metrics.png")
    assert image.shape[1] == round(3.6 * len(evaluate.PLOTTED) * 100) and image.shape[0] == 320
    assert (docs / "eval_metrics.png").read_bytes() == (tmp_path / "eval" / "metrics.png").read_bytes()
    summary = json.loads((docs / "eval_summary.json").read_text())
    assert set(summary) >= {"mmpl", "ar"} and summary["mmpl"]["checks"]["no_unprompted"] == 1.0
    assert "no_unprompted" in evaluate.PLOTTED
    with pytest.raises(SystemExit) as e:
        evaluate.main([*flags, "--out", str(tmp_path / "eval2"), "--docs", str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "--docs" in capsys.readouterr().err
    assert not (tmp_path / "eval2").exists()


def test_through_vae_returns_the_reconstruction():
    from mmpl_fast.embedded import load_pipeline
    from mmpl_fast.world import evaluate

    frames = world.render(world.sample_scene(3), 9, 32, 32)
    vae = load_pipeline().vae
    out = evaluate._through_vae(vae, frames)
    assert out.shape == frames.shape and out.dtype == np.float32
    err = np.abs(out - frames / 255.0)
    assert 0 < err.mean() < 0.1  # changed by the VAE, but a reconstruction of the clip
