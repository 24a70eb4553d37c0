"""`python -m tether` is the `tether` command (the launcher starts its children this way)."""

import sys

from tether.cli.main import main

sys.exit(main())
