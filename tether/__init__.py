"""Tether: a fault-tolerant parameter server for distributed SGD.

The installed namespace maps the repository's top-level folders: `tether.proto` (proto/),
`tether.server` (server/), `tether.worker` (worker/), `tether.consistency` (consistency/),
`tether.chaos` (chaos/); `tether.store`, the CLI and the launcher live in tether/.
"""

__version__ = "0.1.0"
