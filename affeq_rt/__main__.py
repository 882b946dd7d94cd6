"""``python -m affeq_rt``: the affeq-rt command line."""

import sys

from affeq_rt.cli.main import main

sys.exit(main())
