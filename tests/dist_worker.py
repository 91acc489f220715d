"""Worker for the multi-process tests: `torchrun --nproc-per-node 2 tests/dist_worker.py OUT.npz [fail]`.

Generates a tiny 3-segment video; rank 0 saves the frames. With `fail`, rank 1 raises in its first stage.
"""

import sys

import numpy as np

from mmpl_fast import distributed
from mmpl_fast.engine import StageEngine
from mmpl_fast.pipeline import Pipeline


def main(out: str, fail: bool) -> None:
    distributed.init_from_env("cpu")
    if fail and distributed.rank() == 1:

        def boom(*args, **kwargs):
            raise ValueError("injected failure on rank 1")

        StageEngine.run_stage = boom
    pipe = Pipeline.tiny(seed=0)
    frames = []
    for seg in pipe.stream("a red circle", num_frames=81 + 2 * 76, height=32, width=32, seed=5, batch_segments=1,
                           progress=False):  # fmt: skip
        frames.append(seg.frames)
    if distributed.rank() == 0:
        np.save(out, np.concatenate(frames))


if __name__ == "__main__":
    main(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "fail")
