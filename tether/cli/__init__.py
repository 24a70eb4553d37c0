"""The `tether` command line, the thin top layer: `main.py` dispatches, one module per command."""
