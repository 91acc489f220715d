"""`python -m mmpl_fast.train`: the embedded model's training CLI (the code lives in `mmpl_fast.world.train`)."""

import sys

from .world.train import main

if __name__ == "__main__":
    sys.exit(main())
