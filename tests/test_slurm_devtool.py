"""The loopback Slurm of `tether.devtools.slurm` is a real cluster: steps land on distinct nodes,
run side by side inside `salloc` and `sbatch` allocations, a lost node ends its steps and new
steps start on the nodes left, and stopping it leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import wait_until
from tether.devtools.slurm import LoopbackSlurm, available
from tether.retry import poll_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(available() is not None, reason=str(available())),
]
# Pins one task on one node as its own step, never waiting for the CPUs other steps hold.
STEP = ["srun", "--nodes=1", "--ntasks=1", "--overlap"]
UNFINISHED = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED")


@pytest.fixture
def slurm(tmp_path: Path) -> Iterator[LoopbackSlurm]:
    with LoopbackSlurm(tmp_path / "slurm", nodes=3, cpus_per_node=2) as cluster:
        yield cluster


@pytest.fixture
def allocation(slurm: LoopbackSlurm) -> Iterator[str]:
    """A job holding all three nodes, with no shell, that outlives the loss of a node."""
    out = subprocess.run(
        ["salloc", "--nodes=3", "--no-kill", "--no-shell", "--job-name=held"],
        env=slurm.env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    match = re.search(r"Granted job allocation (\d+)", out.stderr)
    assert match, out.stderr
    yield match.group(1)
    subprocess.run(["scancel", match.group(1)], env=slurm.env, timeout=60)


def _alive(pid: int, start: int | None = None) -> bool:
    """Whether `pid` runs (a zombie does not), and is the process that started at `start`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] not in "ZX" and (start is None or int(fields[19]) == start)


def _start(cmd: list[str], slurm: LoopbackSlurm) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=slurm.env,
        start_new_session=True,
    )  # fmt: skip


def _end(proc: subprocess.Popen[str], timeout_s: float = 120) -> tuple[str, str]:
    """Its output once it has ended by itself; killed (with its group) if it has not."""
    try:
        return proc.communicate(timeout=timeout_s)
    finally:
        _kill(proc)


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


@pytest.mark.timeout(240)
def test_a_step_of_three_tasks_runs_one_on_each_node(slurm: LoopbackSlurm) -> None:
    out = slurm.run(
        "srun", "--nodes=3", "--ntasks=3", "bash", "-c", "echo $SLURMD_NODENAME $SLURM_PROCID"
    )
    tasks = [line.split() for line in out.splitlines()]
    assert sorted(node for node, _ in tasks) == ["n1", "n2", "n3"]
    assert sorted(rank for _, rank in tasks) == ["0", "1", "2"]
    for name in slurm.node_names:  # --nodelist pins a step on a node
        assert slurm.run(*STEP, f"--nodelist={name}", "printenv", "SLURMD_NODENAME") == f"{name}\n"


@pytest.mark.timeout(240)
def test_five_steps_run_at_once_inside_salloc_on_three_nodes_of_two_cpus(
    slurm: LoopbackSlurm, tmp_path: Path
) -> None:
    # Each step says where it runs, then holds until told to go: all five must run together.
    script = tmp_path / "members.sh"
    script.write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        nodes=(n1 n2 n3 n1 n2)
        for i in 0 1 2 3 4; do
            {" ".join(STEP)} --nodelist=${{nodes[$i]}} bash -c \\
                'echo $SLURMD_NODENAME > {tmp_path}/started.'$i'
                 until [ -e {tmp_path}/go ]; do sleep 0.05; done' &
        done
        wait
        """)
    )
    script.chmod(0o755)
    alloc = _start(["salloc", "--nodes=3", "--exclusive", "--quiet", str(script)], slurm)
    started = [tmp_path / f"started.{i}" for i in range(5)]
    wait_until(lambda: all(p.exists() for p in started), 120, "five steps running at once")
    (tmp_path / "go").touch()
    out, err = _end(alloc)
    assert alloc.returncode == 0, err
    assert [p.read_text().strip() for p in started] == ["n1", "n2", "n3", "n1", "n2"]


@pytest.mark.timeout(240)
def test_sbatch_script_starts_its_steps(slurm: LoopbackSlurm, tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    job = slurm.run(
        "sbatch", "--parsable", "--nodes=3", "--ntasks=3", f"--output={out}", f"--chdir={tmp_path}",
        "--wrap", "srun bash -c 'echo step $SLURMD_NODENAME $SLURM_PROCID'",
    ).strip()  # fmt: skip

    def finished() -> str:
        info = slurm.run("scontrol", "show", "job", job, "--oneliner")
        state = re.search(r"JobState=(\S+)", info)
        return state.group(1) if state and state.group(1) not in UNFINISHED else ""

    state = poll_until(finished, 120, f"job {job} to finish", interval_s=0.1)
    assert state == "COMPLETED", out.read_text()
    lines = sorted(line for line in out.read_text().splitlines() if line.startswith("step"))
    assert [line.split()[1] for line in lines] == ["n1", "n2", "n3"]


@pytest.mark.timeout(300)
def test_a_lost_node_ends_its_step_and_a_new_step_runs_elsewhere(
    slurm: LoopbackSlurm, allocation: str
) -> None:
    # The task reports its pid and that of a child it leaves running in the background.
    step = _start(
        [*STEP, f"--jobid={allocation}", "--nodelist=n2", "bash", "-c",
         "sleep 600 & echo $$ $!; wait"],
        slurm,
    )  # fmt: skip
    assert step.stdout is not None
    pids = [int(p) for p in step.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    slurm.kill_node("n2")  # marks it DOWN, as an admin would, and waits for the controller
    _, err = _end(step)
    # Slurm 22.05's srun exits 0 here: it marks the lost node's tasks ended with no status
    assert "Node failure on n2" in err
    assert not any(_alive(p) for p in pids)
    assert "DOWN" in slurm.node_states()["n2"]
    job = slurm.run("squeue", "--noheader", f"--jobs={allocation}", "--format=%T %N")
    assert job.split() == ["RUNNING", "n[1,3]"]  # --no-kill: the job goes on without n2

    again = slurm.run(*STEP, f"--jobid={allocation}", "--exclude=n2", "printenv", "SLURMD_NODENAME")
    assert again.strip() in ("n1", "n3")
    pinned = subprocess.run(
        [*STEP, f"--jobid={allocation}", "--nodelist=n2", "true"],
        env=slurm.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert pinned.returncode != 0 and "not available" in pinned.stderr

    slurm.restart_node("n2")  # back in service (ReturnToService=2), free for new jobs
    assert slurm.run(*STEP, "--nodelist=n2", "printenv", "SLURMD_NODENAME") == "n2\n"


@pytest.mark.timeout(300)
def test_the_controller_notices_a_lost_node_by_itself(tmp_path: Path) -> None:
    with LoopbackSlurm(tmp_path / "slurm", nodes=2, slurmd_timeout_s=2) as slurm:
        step = _start([*STEP, "--nodelist=n1", "bash", "-c", "echo up; exec sleep 600"], slurm)
        assert step.stdout is not None and step.stdout.readline() == "up\n"
        slurm.kill_node("n1", mark_down=False)  # waits until SlurmdTimeout has run out
        _, err = _end(step)
        assert "Node failure on n1" in err
        assert slurm.node_states()["n1"].startswith("DOWN")


@pytest.mark.timeout(240)
def test_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    slurm = LoopbackSlurm(tmp_path / "slurm", nodes=2).start()
    try:
        step = _start([*STEP, "bash", "-c", "sleep 600 & echo $$ $!; wait"], slurm)
        # salloc runs its command in a process group of its own, not killed with salloc's
        alloc = _start(["salloc", "--nodes=1", "bash", "-c", "echo $$; exec sleep 600"], slurm)
        assert step.stdout is not None and alloc.stdout is not None
        task_pids = [int(p) for p in step.stdout.readline().split()]
        task_pids.append(int(alloc.stdout.readline()))
        procs = slurm.processes()
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid, _ in procs}
        assert {"munged", "slurmctld", "slurmd", "slurmstepd", "sleep"} <= names
        assert set(task_pids) <= {pid for pid, _ in procs}
    finally:
        slurm.stop()
    _kill(step)  # this srun and salloc would wait for ever for the controller that is gone
    _kill(alloc)
    assert not [pid for pid, start in procs if _alive(pid, start)]
    assert slurm.processes() == set()
    slurm.stop()  # again: nothing left to do
