"""The embedded model's own wing: a procedural video world, its VAE, training and evaluation.

It uses the runtime layers (model, KV pool, layouts, sampling, pipeline) as any user would; the runtime never
imports it (a pipeline folder whose VAE is a `WorldVAE` names this package in its ``model_index.json``, and
`Pipeline.from_pretrained` imports it by that name).

* `scenes`: scenes, captions and rendering (re-exported here: ``from mmpl_fast import world;
  world.sample_scene(0)``);
* `vae`: `WorldVAE`, Wan's compression and interface on 2D convolutions;
* `train`: ``python -m mmpl_fast.train``, teacher-forcing training from scratch on a CPU;
* `evaluate`: ``python -m mmpl_fast.evaluate``, prompt adherence and drift of long videos.
"""

from .scenes import (
    BACKGROUND_COLORS,
    DIRECTIONS,
    FPS,
    MOTIONS,
    OBJECT_COLORS,
    PALETTE,
    SHAPES,
    SIZES,
    Motion,
    Scene,
    SceneObject,
    caption,
    clip,
    parse_caption,
    positions,
    render,
    sample_scene,
)

__all__ = [
    "BACKGROUND_COLORS", "DIRECTIONS", "FPS", "MOTIONS", "OBJECT_COLORS", "PALETTE", "SHAPES", "SIZES",
    "Motion", "Scene", "SceneObject", "caption", "clip", "parse_caption", "positions", "render", "sample_scene",
]  # fmt: skip
