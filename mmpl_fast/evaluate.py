"""`python -m mmpl_fast.evaluate`: the embedded model's evaluation CLI (the code lives in
`mmpl_fast.world.evaluate`)."""

import sys

from .world.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
