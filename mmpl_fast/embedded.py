"""The default model of `python -m mmpl_fast.generate`: a pipeline folder shipped inside the package.

``mmpl_fast/assets/embedded/`` holds the embedded model trained on the procedural world (`mmpl_fast.world`) by
`python -m mmpl_fast.train` (the command is in the README): the ``embedded`` DiT preset, a `WorldVAE` and a
word-level umT5 text encoder, all safetensors, loaded through `Pipeline.from_pretrained` like real weights.
If the folder is missing (a source checkout before training), the random ``tiny`` preset stands in, with a
warning that says so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .pipeline import Pipeline

ASSET = Path(__file__).parent / "assets" / "embedded"


def available() -> bool:
    return (ASSET / "model_index.json").is_file()


def load_pipeline(
    device: torch.device | str = "cpu",
    kind: str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    offload: bool = False,
) -> Pipeline:
    """The embedded pipeline on `device` (the random tiny one, with a warning, when no weights ship); `kind`
    overrides its sampling defaults' kind; `torch_dtype` and `offload` as `Pipeline.from_pretrained`'s (default
    dtype: bfloat16 on CUDA, float32 on a CPU)."""
    if available():
        return Pipeline.from_pretrained(ASSET, device=device, kind=kind, torch_dtype=torch_dtype, offload=offload)
    print(
        f"warning: no embedded model in {ASSET}; using the random 'tiny' preset (the video will be noise). "
        "Train it with the command in the README, or pass --model for real weights.",
        file=sys.stderr,
    )
    pipe = Pipeline.tiny(seed=0, device=device, torch_dtype=torch_dtype)
    pipe.kind = kind or pipe.kind
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    return pipe
