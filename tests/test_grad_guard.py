"""The gradient-norm guard (DESIGN §10, server/guard.py): off by default; once on, a shard refuses
a push far above the median of its recent accepted ones, changes nothing when it does, and
changes no bit of a BSP run that it never refuses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from helpers import RUN
from tether.cli.main import main
from tether.config import GradientGuard, OptimizerConfig, RunConfig
from tether.consistency import Consistency, Mode
from tether.server.codec import recover
from tether.server.guard import NormGuard, l2_norm
from tether.server.host import ShardHost
from tether.server.main import add_services, create_server, pool_size, shard_spec
from tether.server.servicer import ShardServicer
from tether.server.state import (
    Ack,
    Code,
    PushHeader,
    Reject,
    ShardSpec,
    ShardState,
    split_ranges,
)
from tether.store.base import ShardLog
from tether.transport import Security
from tether.worker.client import ShardClient

pytestmark = pytest.mark.timeout(60)

N = 50
ON = GradientGuard(factor=10.0)


def make_state(mode=Mode.ASP, workers=2, guard=ON, n=N, offset=0, shard_id=0, init=None):
    consistency = Consistency(mode, 1 if mode is Mode.SSP else 0)
    spec = ShardSpec(
        RUN, shard_id, offset, n, workers, consistency, OptimizerConfig("adam", lr=0.01),
        guard=guard,
    )  # fmt: skip
    params = np.linspace(-1, 1, n, dtype=np.float32) if init is None else init
    return ShardState(spec, params)


def grad(seed: int, scale: float = 1.0, n: int = N) -> np.ndarray:
    g = np.random.default_rng(seed).standard_normal(n) * scale
    return g.astype(np.float32)


def push(state: ShardState, w: int, g: np.ndarray) -> Ack | Reject:
    clock = state.workers[w].clock
    h = PushHeader(RUN, w, clock, clock, state.version, state.epoch, state.spec.length)
    result = state.push(h, g, 0.0)
    state.validate()
    return result


def fingerprint(state: ShardState):
    return (
        state.params.tobytes(),
        state.version,
        tuple(state.clocks.items()),
        tuple((w, e.last_seq) for w, e in state.workers.items()),
        tuple(sorted(state.pending)),
        repr(state.optimizer.state_arrays()),
        state.stats.pushes_accepted,
        state.revision,
        len(state.log.unlogged),
        tuple(state.guard.norms),
    )


def warm_up(state: ShardState, pushes: int, workers: int = 2) -> None:
    for i in range(pushes):
        assert isinstance(push(state, i % workers, grad(i)), Ack)


# ---- the core ----------------------------------------------------------------------------------


def test_the_guard_is_off_by_default_and_judges_nothing() -> None:
    assert RunConfig("r").gradient_guard == GradientGuard() and GradientGuard().factor is None
    state = make_state(guard=GradientGuard())
    warm_up(state, 20)
    assert isinstance(push(state, 0, grad(99, scale=1e6)), Ack)
    assert not state.guard.norms and state.report().pushes_rejected_norm == 0


@pytest.mark.parametrize("mode", [Mode.ASP, Mode.SSP, Mode.BSP])
def test_a_push_far_above_the_median_is_refused_and_changes_nothing(mode: Mode) -> None:
    state = make_state(mode)
    warm_up(state, 12)  # BSP: six clocks of two workers
    median = float(np.median(state.guard.norms))
    before = fingerprint(state)
    result = push(state, 0, grad(7, scale=1000.0))
    assert isinstance(result, Reject) and result.code is Code.INVALID_ARGUMENT
    assert "exceeds 10× the median" in result.message and "on shard 0" in result.message
    assert f"{median:.3g}" in result.message and "last 12 accepted pushes" in result.message
    assert "worker 0 at clock 6" in result.message
    assert fingerprint(state) == before
    assert state.report().pushes_rejected_norm == 1
    # A sane redo of the same clock is accepted afterwards.
    assert isinstance(push(state, 0, grad(8)), Ack)


def test_pushes_within_the_factor_are_accepted() -> None:
    state = make_state()
    warm_up(state, 10)
    median = float(np.median(state.guard.norms))
    g = grad(3)
    g *= np.float32(9.0 * median / l2_norm(g))  # 9× the median: within 10×
    assert isinstance(push(state, 0, g), Ack)
    assert state.guard.rejected == 0


def test_nothing_is_refused_before_the_warm_up_count() -> None:
    state = make_state()
    warm_up(state, ON.warmup - 1)
    assert isinstance(push(state, 1, grad(5, scale=1e6)), Ack)  # only 7 accepted before
    assert isinstance(push(state, 0, grad(6, scale=1e9)), Reject)  # 8 now: judged


def test_only_the_last_window_of_accepted_pushes_counts() -> None:
    guard = NormGuard(ON, 0)
    for _ in range(ON.window):
        guard.accepted(1.0)
    assert guard.check(500.0, "worker 0") is not None
    for _ in range(ON.window // 2):
        guard.accepted(100.0)
    assert guard.median() == pytest.approx(50.5)  # half old, half new
    for _ in range(ON.window // 2):
        guard.accepted(100.0)
    assert guard.median() == 100.0 and guard.check(500.0, "worker 0") is None
    assert guard.rejected == 1


def test_a_median_of_zero_refuses_nothing() -> None:
    state = make_state()
    for i in range(10):
        assert isinstance(push(state, i % 2, np.zeros(N, np.float32)), Ack)
    assert isinstance(push(state, 0, grad(1)), Ack)


def test_refused_pushes_are_never_recorded_and_duplicates_are_not_judged() -> None:
    state = make_state()
    warm_up(state, 10)
    h = PushHeader(RUN, 0, 4, 4, state.version, state.epoch, N)  # worker 0's last push
    again = state.push(h, grad(99, scale=1e6), 0.0)  # a retry: acknowledged, never read
    state.validate()
    assert isinstance(again, Ack) and again.duplicate and state.guard.rejected == 0
    norms = tuple(state.guard.norms)
    assert isinstance(push(state, 0, grad(98, scale=1e6)), Reject)
    assert tuple(state.guard.norms) == norms


def test_the_norm_accumulates_in_float64_across_blocks() -> None:
    g = np.random.default_rng(1).standard_normal(200_003).astype(np.float32) * np.float32(3)
    assert l2_norm(g) == pytest.approx(float(np.linalg.norm(g.astype(np.float64))), rel=1e-12)
    big = np.full(10, 3e38, np.float32)  # its float32 square would overflow
    assert l2_norm(big) == pytest.approx(3e38 * np.sqrt(10), rel=1e-6)
    assert l2_norm(np.zeros(0, np.float32)) == 0.0


def test_the_window_is_not_state_the_log_keeps() -> None:
    """Replaying the log does not touch the guard; a rebuilt shard starts with an empty window."""
    policy = RunConfig.of("r", replication="async").replication_policy
    spec = ShardSpec(
        RUN, 0, 0, N, 1, Consistency(Mode.ASP), OptimizerConfig("sgd", lr=0.1),
        replication=policy, guard=ON,
    )  # fmt: skip
    state = ShardState(spec, np.zeros(N, np.float32))
    for i in range(10):
        assert isinstance(push(state, 0, grad(i)), Ack)
    entries = state.log_batch()
    assert "guard" not in repr(entries[-1].meta) and len(entries) == 10
    log = ShardLog(base=None, entries=entries, last_epoch=1)
    again = recover(spec, 2, log, lambda: np.zeros(N, np.float32))
    again.validate()
    assert again.params.tobytes() == state.params.tobytes() and again.version == 10
    assert not again.guard.norms and again.guard.rejected == 0


def test_a_guard_of_a_shard_validates_its_window() -> None:
    guard = NormGuard(ON, 0)
    guard.accepted(1.0)
    guard.validate()
    guard.norms.append(float("nan"))
    with pytest.raises(AssertionError):
        guard.validate()


# ---- BSP results are bit-identical when nothing is refused ------------------------------------


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_bsp_params_are_bit_identical_with_the_guard_on_when_nothing_is_refused(
    optimizer: str,
) -> None:
    total, workers, steps = 257, 3, 25
    init = np.random.default_rng(5).standard_normal(total).astype(np.float32)
    rng = np.random.default_rng(9)
    grads = {
        (w, c): (rng.standard_normal(total) * (1 + c % 4)).astype(np.float32)
        for c in range(steps)
        for w in range(workers)
    }
    digests = []
    for guard in (GradientGuard(), GradientGuard(factor=4.0)):
        parts = []
        for sid, (off, n) in enumerate(split_ranges(total, 2)):
            spec = ShardSpec(
                RUN, sid, off, n, workers, Consistency(Mode.BSP),
                OptimizerConfig(optimizer, lr=0.05), guard=guard,
            )  # fmt: skip
            state = ShardState(spec, init[off : off + n])
            for c in range(steps):
                for w in range(workers):
                    h = PushHeader(RUN, w, c, c, state.version, 1, n)
                    assert isinstance(state.push(h, grads[w, c][off : off + n].copy(), 0.0), Ack)
                    state.validate()
            assert state.guard.rejected == 0
            assert len(state.guard.norms) == (ON.window if guard.factor else 0)
            parts.append(state.params)
        digests.append(np.concatenate(parts).tobytes())
    assert digests[0] == digests[1]


# ---- over gRPC ---------------------------------------------------------------------------------


@pytest.fixture
def guarded_shard() -> Iterator[tuple[ShardState, ShardClient]]:
    state = make_state(Mode.ASP, workers=1, n=1000)
    server, port = create_server(
        "127.0.0.1:0", max_workers=pool_size(1), security=Security.insecure()
    )
    add_services(server, ShardServicer(ShardHost(state), wait_timeout_s=10.0))
    server.start()
    client = ShardClient(
        f"127.0.0.1:{port}", RUN, security=Security.insecure(), chunk_bytes=1 << 12
    )
    try:
        yield state, client
    finally:
        client.close()
        server.stop(grace=None)


def test_a_refused_push_is_invalid_argument_naming_the_factor(guarded_shard) -> None:
    state, client = guarded_shard
    for c in range(10):
        client.push(grad(c, n=1000), worker_id=0, clock=c, seq=c, read_version=c, epoch=1)
    before = (state.version, state.params.tobytes(), state.clocks)
    with pytest.raises(grpc.RpcError) as refused:
        client.push(
            grad(50, scale=1000.0, n=1000), worker_id=0, clock=10, seq=10, read_version=10,
            epoch=1,
        )  # fmt: skip
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds 10× the median" in refused.value.details()
    assert "--reject-grad-norm" in refused.value.details()
    assert (state.version, state.params.tobytes(), state.clocks) == before
    assert client.info().version == 10 and state.report().pushes_rejected_norm == 1


# ---- the setting -------------------------------------------------------------------------------


def test_the_setting_is_stored_only_when_on_and_reads_back() -> None:
    off = RunConfig.of("r")
    assert "reject_grad_norm" not in off.to_dict() and off.reject_grad_norm is None
    assert RunConfig.of("r", reject_grad_norm=0).gradient_guard == GradientGuard()
    on = RunConfig.of("r", reject_grad_norm=10)
    assert on.to_dict()["reject_grad_norm"] == 10 and on.gradient_guard.factor == 10
    assert RunConfig.from_dict(on.to_dict()) == on
    assert shard_spec(RunConfig.of("r", num_params=10, reject_grad_norm=5), 1).guard.factor == 5


@pytest.mark.parametrize("bad", [1, 0.5, -3, float("inf"), float("nan")])
def test_a_bad_factor_is_refused_naming_the_flag(bad: float) -> None:
    with pytest.raises(ValueError, match="--reject-grad-norm must be a finite factor > 1"):
        RunConfig.of("r", reject_grad_norm=bad)


def test_the_command_line_refuses_a_bad_factor_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "r"
    argv = ["launch", "--model", "logreg", "--reject-grad-norm", "0.5", "--run-dir", str(run_dir)]
    assert main(argv) == 2
    assert "--reject-grad-norm must be a finite factor > 1" in capsys.readouterr().err
    assert not run_dir.exists()


# ---- whole runs (slow) -------------------------------------------------------------------------

LINE_TASK = """
import jax.numpy as jnp
import numpy as np


class Line:
    def __init__(self, bug_at=None):
        self.bug_at = bug_at  # from this clock on, worker 1's targets are a million times off

    def init(self, key):
        return {"w": jnp.zeros((6,), jnp.float32)}

    def loss(self, params, batch):
        x, y = batch
        return jnp.mean((x @ params["w"] - y) ** 2)

    def batch(self, ctx, clock):
        rng = np.random.default_rng([ctx.seed, ctx.worker_id, clock])
        x = rng.standard_normal((16, 6)).astype(np.float32)
        y = x.sum(axis=1)
        if self.bug_at is not None and ctx.worker_id == 1 and clock >= self.bug_at:
            y = y * np.float32(1e6)
        return x, y


task = Line()
buggy = Line(bug_at=12)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_bsp_run_is_bit_identical_with_the_guard_on_and_a_buggy_worker_fails_it(
    tether_cli, tmp_path: Path
) -> None:
    (tmp_path / "line.py").write_text(LINE_TASK)
    common = ["launch", "--json", "--steps", "30", "--optimizer", "sgd", "--lr", "0.05"]
    runs = {
        "off": tether_cli(*common, "--task", "line.py:task", "--run-dir", "off"),
        "on": tether_cli(
            *common, "--task", "line.py:task", "--reject-grad-norm", "10", "--run-dir", "on"
        ),
    }
    summaries = {name: run.json() for name, run in runs.items()}
    assert summaries["on"]["params_sha256"] == summaries["off"]["params_sha256"]
    assert summaries["on"]["pushes_accepted"] == 2 * 2 * 30  # two shards, nothing refused
    # A worker whose gradients go wild is refused by the guard and fails the run, naming it.
    failed = tether_cli(
        *common, "--task", "line.py:buggy", "--reject-grad-norm", "10", "--max-restarts", "0",
        "--run-dir", "buggy",
    )  # fmt: skip
    rc, _, err = failed.finish()
    assert rc == 1, err[-3000:]
    assert "worker 1 exited with code 1" in err, err[-3000:]
    assert "worker 1 failed at clock 12: INVALID_ARGUMENT: gradient norm" in err, err[-3000:]
    assert "exceeds 10× the median" in err, err[-3000:]
