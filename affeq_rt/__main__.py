"""``python -m affeq_rt``: the affeq-rt command line."""

import sys

from .cli.main import main

sys.exit(main())
