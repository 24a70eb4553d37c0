"""`python -m tether` is the `tether` command (the launcher starts its children this way)."""

import sys

from tether.cli import main

sys.exit(main())
