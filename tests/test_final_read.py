"""The launcher's read of the final parameters (`final_params`): a shard restarted near the end
may still be starting when the last worker finishes, so the store names a dead address for a
while; the read waits for the replacement instead of failing the run with a traceback."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from helpers import RUN
from tether.config import RunConfig
from tether.consistency import Mode
from tether.driver.launcher import RunFailed, final_params
from tether.store import Member
from tether.transport import Security


def _member(address: str) -> Member:
    return Member(RUN, "server", 0, 1, address, 0, "h", 0.0, 0.0, "running", {})


def _dead_address() -> str:
    """A loopback port nothing listens on: bound, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.timeout(60)
def test_the_final_read_waits_for_a_replacement_to_register(live_shard):
    shard = live_shard(Mode.ASP, workers=1, n=1000)
    config = RunConfig.of(RUN, shards=1, num_params=1000, replication="off")
    dead, calls = _dead_address(), []

    def members() -> list[Member]:  # the replacement registers on the store's third reading
        calls.append(1)
        return [_member(dead if len(calls) < 3 else shard.address)]

    flat, infos = final_params(config, members, 30, shard.security)
    assert len(calls) == 3
    np.testing.assert_array_equal(flat, shard.state.params)
    assert [i.length for i in infos] == [1000]


@pytest.mark.timeout(60)
def test_a_shard_that_never_answers_fails_the_run_naming_the_error():
    config = RunConfig.of(RUN, shards=1, num_params=10, replication="off")
    dead = _dead_address()
    with pytest.raises(
        RunFailed, match=r"could not be read from the shards within 1s.*UNAVAILABLE"
    ):
        final_params(config, lambda: [_member(dead)], 1, Security.insecure())
