"""`python -m tarflow_hf ...` is the `tarflow-hf` command."""

import sys

from tarflow_hf.commands import main

sys.exit(main())
