"""``python -m mmpl_fast.schedule``: the scheduling simulator (`mmpl_fast.scheduler.simulate`).

Prints makespan, speedup over one device, the lower bound and the policy's efficiency for a video's task DAG
on simulated devices, and writes a Gantt timeline; ``--help`` lists the flags. Same as
``python -m mmpl_fast.scheduler``.
"""

import sys

from .scheduler.simulate import main

if __name__ == "__main__":
    sys.exit(main())
