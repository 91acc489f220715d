"""The default model of `python -m mmpl_fast.generate`: weights shipped inside the package.

Until trained weights ship (``mmpl_fast/assets/embedded.safetensors``), this falls back to the random
``tiny`` preset, with a warning that says so: the video then shows noise, but every stage of the real
code path runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .pipeline import Pipeline

ASSET = Path(__file__).parent / "assets" / "embedded.safetensors"


def load_pipeline(device: torch.device | str = "cpu") -> Pipeline:
    if ASSET.exists():  # pragma: no cover - trained weights do not ship yet
        raise NotImplementedError(f"{ASSET}: loading trained embedded weights is not implemented yet")
    print(
        "warning: no trained embedded model ships yet; using the random 'tiny' preset (the video will be noise). "
        "Pass --model for real weights.",
        file=sys.stderr,
    )
    return Pipeline.tiny(seed=0, device=device)
