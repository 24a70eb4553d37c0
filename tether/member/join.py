"""How a member joins a run, whoever started it (DESIGN §12): it waits for the run to exist,
and publishes an address the others can dial.

A scheduler may start members before the job that creates the run has finished, so a member
waits for the run (up to a deadline) instead of failing. The address a member listens on is not
always one it can be reached at: `0.0.0.0:7000` binds every interface but names none, and behind
NAT or in a pod the reachable name is known only to the scheduler. `--advertise HOST[:PORT]` is
that name; without it, a wildcard listen address advertises this host's name.
"""

from __future__ import annotations

import socket
import sys

from tether.retry import PollTimeout, poll_until
from tether.store import RunRecord, Store, UnknownRun

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
# How long a member waits for its run to be created by default (`--wait-for-run`).
DEFAULT_RUN_WAIT_S = 300.0


def split_host_port(text: str, what: str) -> tuple[str, int | None]:
    """`HOST[:PORT]` (an IPv6 host in brackets: `[::1]:7000`) -> (host, port or None)."""
    port_text: str | None
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        host, port_text = f"[{inner}]", rest[1:] if rest.startswith(":") else None
        ok = bool(bracket and inner) and (rest == "" or port_text is not None)
    else:
        host, colon, port_text = text.partition(":")
        port_text = port_text if colon else None
        ok = bool(host) and text.count(":") <= 1
    if not ok:
        raise ValueError(f"{what} expects HOST[:PORT] (IPv6 in brackets); got {text!r}")
    if port_text is None:
        return host, None
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{what} expects a port 0..65535 after the host; got {text!r}")
    return host, int(port_text)


def advertised_address(listen: str, port: int, advertise: str | None) -> str:
    """The `host:port` a member publishes, given what it listens on and the port it bound."""
    if advertise:
        host, advertised_port = split_host_port(advertise, "--advertise")
        if advertised_port == 0:
            raise ValueError(f"--advertise {advertise!r}: port 0 cannot be dialled; omit the port")
        return f"{host}:{advertised_port if advertised_port is not None else port}"
    host = listen.rsplit(":", 1)[0]
    if host in WILDCARD_HOSTS:
        host = socket.gethostname()
    return f"{host}:{port}"


def wait_for_run(store: Store, run_id: str, timeout_s: float, who: str) -> RunRecord:
    """The run's record, once it exists; `UnknownRun` if it was not created within `timeout_s`.

    A member that has to wait says so once on stderr (as `who`), so a mistyped `--run` is not
    mistaken for a hang."""

    def created() -> RunRecord | None:
        try:
            return store.get_run(run_id)
        except UnknownRun:
            return None

    record = created()
    if record is not None:
        return record
    if timeout_s > 0:
        print(
            f"{who}: run {run_id} is not in the store yet; waiting up to {timeout_s:.0f} s for "
            "it to be created (--wait-for-run)",
            file=sys.stderr,
            flush=True,
        )
    try:
        record = poll_until(created, timeout_s, f"run {run_id} to be created", interval_s=0.25)
    except PollTimeout:
        store.get_run(run_id)  # raises UnknownRun, which names the run and the store
        raise
    assert record is not None
    return record
