"""Worker of bench_multiprocess: ``[torchrun --nproc-per-node N] dist_worker.py OUT.json SEGMENTS [POLICY]``.

Generates a tiny video (random tiny components, 64x64) and, on rank 0, writes the wall time of the generation
(after loading and a warm-up call, both untimed) and a checksum of the frames to OUT.json.
"""

import json
import sys
import time

import numpy as np

from mmpl_fast import distributed
from mmpl_fast.chain import ChainPlan
from mmpl_fast.layouts import mmpl
from mmpl_fast.pipeline import Pipeline


def main(out: str, segments: int, policy: str) -> None:
    distributed.init_from_env("cpu")
    pipe = Pipeline.tiny(seed=0)
    kw = dict(height=64, width=64, seed=5, progress=False, profile=False, policy=policy)
    pipe("a red circle", num_frames=81, **kw)  # warm-up (both ranks take part)
    t0 = time.perf_counter()
    frames = pipe("a red circle", num_frames=ChainPlan(mmpl()).video_frames(segments), **kw).frames
    seconds = time.perf_counter() - t0
    if distributed.rank() == 0:
        result = {"seconds": seconds, "frames": int(frames.shape[1]), "checksum": float(np.asarray(frames).sum())}
        with open(out, "w") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "adaptive")
