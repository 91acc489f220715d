"""``python -m mmpl_fast.scheduler``: the scheduling simulator (see `simulate`)."""

import sys

from .simulate import main

sys.exit(main())
