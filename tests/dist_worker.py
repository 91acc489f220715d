"""Worker for the multi-process tests: ``torchrun --nproc-per-node N tests/dist_worker.py OUT.npy [options]``.

Generates a tiny video of ``--segments`` segments; rank 0 saves the frames to OUT.npy. Run without torchrun
it is the one-process reference.

* ``--fail``: rank 1 raises in its first stage;
* ``--nccl-order``: point-to-point messages get NCCL's semantics (`nccl_order`: tags ignored, matched in
  issue order per peer, one operation at a time per pair); every rank writes the operations it issued to
  ``OUT.rank<r>.json`` and rank 0 the run's crossing edges (source rank, destination rank, kind) to
  ``OUT.edges.json``.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mmpl_fast import distributed
from mmpl_fast.engine import StageEngine
from mmpl_fast.pipeline import Pipeline

SEGMENT_FRAMES = 76  # video frames each later segment adds (the first has 81)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--fail", action="store_true")
    ap.add_argument("--nccl-order", action="store_true")
    ap.add_argument("--segments", type=int, default=3)
    args = ap.parse_args(argv)
    distributed.init_from_env("cpu")
    rank = distributed.rank()
    if args.nccl_order:
        sys.path.insert(0, str(Path(__file__).parent))
        import nccl_order

        nccl_order.install()
    if args.fail and rank == 1:

        def boom(*a, **kw):
            raise ValueError("injected failure on rank 1")

        StageEngine.run_stage = boom
    pipe = Pipeline.tiny(seed=0)
    frames = []
    num_frames = 81 + (args.segments - 1) * SEGMENT_FRAMES
    stream = pipe.stream("a red circle", num_frames=num_frames, height=32, width=32, seed=5, batch_segments=1,
                         progress=False)  # fmt: skip
    for seg in stream:
        frames.append(seg.frames)
    info = stream.info
    if args.nccl_order:
        Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(nccl_order.LOG))
    if rank == 0:
        if args.nccl_order:
            sched = info["schedule"]
            rank_of = {p.task.index: max(p.device, 0) for p in sched.placements}  # the host writer is rank 0
            edges = [(rank_of[e.src], rank_of[e.dst], e.kind) for e in sched.dag.edges
                     if rank_of[e.src] != rank_of[e.dst]]  # fmt: skip
            Path(f"{args.out}.edges.json").write_text(json.dumps(edges))
        np.save(args.out, np.concatenate(frames))


if __name__ == "__main__":
    main(sys.argv[1:])
