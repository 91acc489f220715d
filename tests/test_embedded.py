"""The shipped embedded model: it is there, small, safe to load, and a short generation shows what was asked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmpl_fast import embedded
from mmpl_fast.world.evaluate import detect


def test_the_embedded_model_ships_as_safetensors_under_20_mb():
    assert embedded.available(), f"no embedded model in {embedded.ASSET}"
    files = [f for f in embedded.ASSET.rglob("*") if f.is_file()]
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert {f.parent.name for f in weights} == {"transformer", "vae", "text_encoder"}
    assert all(f.suffix in (".safetensors", ".json") for f in files), files  # nothing to unpickle
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20
    index = json.loads((embedded.ASSET / "model_index.json").read_text())
    assert index["mmpl_fast"]["kind"] == "world" and index["vae"] == ["mmpl_fast", "WorldVAE"]


@pytest.fixture(scope="module")
def pipe():
    return embedded.load_pipeline("cpu")


@pytest.mark.parametrize(
    "prompt,color,background",
    [("a large red circle bouncing on a black background", "red", "black"),
     ("a large blue square moving right on a white background", "blue", "white")],
)  # fmt: skip
def test_a_short_generation_shows_the_prompted_colours(pipe, prompt, color, background):
    frames = pipe(prompt=prompt, num_frames=81, seed=0, progress=False, profile=False).frames[0]
    assert frames.shape == (81, 64, 64, 3)
    reports = [detect(np.asarray(f)) for f in frames[::4]]
    assert np.mean([r.background == background for r in reports]) >= 0.8
    assert np.mean([r.find(color) is not None for r in reports]) >= 0.7
