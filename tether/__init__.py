"""Tether: a fault-tolerant parameter server for distributed SGD.

The installed namespace maps the repository's top-level folders: `tether.proto` (proto/),
`tether.server` (server/), `tether.worker` (worker/), `tether.consistency` (consistency/),
`tether.chaos` (chaos/). tether/ holds the foundations (config, wire, retry, exit codes, the
store), the built-in tasks, the member-side heartbeat, the run driver, developer tools and the
command line. The layers and what each module holds: docs/DESIGN.md §15.
"""

__version__ = "0.1.0"
