"""The task API (DESIGN §11): loading a task by spec, its flat layout, the worker's step taken
with respect to the parameter tree, and `tether.launch`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tether
from helpers import REPO
from tether.driver.api import spec_of
from tether.tasks.api import TaskContext
from tether.tasks.load import absolute_spec, load_task, split_spec
from tether.tasks.runtime import Layout, TaskRuntime

# A task as a user writes one: nested dict parameters, a loss with metrics, numpy batches.
USER_TASK = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import tether

    class TwoLayer(tether.Task):
        def init(self, key):
            k1, k2 = jax.random.split(key)
            return {
                "hidden": {"w": jax.random.normal(k1, (6, 16)) * 0.3, "b": jnp.zeros(16)},
                "out": {"w": jax.random.normal(k2, (16,)) * 0.3, "b": jnp.zeros(())},
            }

        def loss(self, params, batch):
            x, y = batch["x"], batch["y"]
            h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
            err = h @ params["out"]["w"] + params["out"]["b"] - y
            return jnp.mean(err ** 2), {"max_error": jnp.max(jnp.abs(err))}

        def batch(self, ctx, clock):
            rng = np.random.default_rng([ctx.seed, ctx.worker_id, clock])
            x = rng.standard_normal((ctx.batch_size, 6), dtype=np.float32)
            return {"x": x, "y": np.sin(x.sum(axis=1)).astype(np.float32)}

    task = TwoLayer()

    def make():
        return TwoLayer()
    """
)


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_task.py"
    path.write_text(USER_TASK)
    return path


def ctx(worker_id: int = 0, batch_size: int = 8) -> TaskContext:
    return TaskContext(seed=1, worker_id=worker_id, num_workers=2, batch_size=batch_size, steps=5)


# -- loading -------------------------------------------------------------------------------------


def test_a_file_spec_loads_an_instance_a_class_or_a_factory(task_file: Path) -> None:
    for name in ("task", "TwoLayer", "make"):
        task = load_task(f"{task_file}:{name}")
        assert type(task).__name__ == "TwoLayer"
        assert isinstance(task, tether.Task)


def test_a_module_spec_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "mytasks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "reg.py").write_text(USER_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert type(load_task("mytasks.reg:task")).__name__ == "TwoLayer"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", "expected path/to/file.py:NAME or package.module:NAME"),
        ("file.py:", "expected path/to/file.py:NAME"),
        ("file.py:not-a-name", "expected path/to/file.py:NAME"),
        ("/nonexistent/t.py:task", "no such file"),
        ("no_such_module_xyz:task", "cannot import 'no_such_module_xyz'"),
        ("json:JSONDecoder", "is not a task: it lacks init, loss, batch"),
        ("json:dumps", r"calling dumps\(\) failed: TypeError"),
    ],
)
def test_bad_specs_get_one_sentence(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_task(spec)


def test_a_missing_name_is_named(task_file: Path) -> None:
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_task(f"{task_file}:nope")


def test_a_relative_file_spec_becomes_absolute(
    task_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(task_file.parent)
    assert absolute_spec("user_task.py:task") == f"{task_file}:task"
    assert absolute_spec("pkg.mod:task") == "pkg.mod:task"
    assert split_spec(f"{task_file}:task") == (str(task_file), "task")


def test_spec_of_finds_where_a_task_object_is_bound(task_file: Path) -> None:
    task = load_task(f"{task_file}:task")
    assert spec_of(task) == f"{task_file}:task"
    assert spec_of("x.py:t") == "x.py:t"

    class Local(tether.Task):
        pass

    with pytest.raises(ValueError, match="bind it to a name in a .py file or module"):
        spec_of(Local())


# -- layout --------------------------------------------------------------------------------------


def test_the_flat_order_is_the_tree_leaf_order_and_views_share_memory() -> None:
    tree = {"b": np.zeros((2, 3), np.float32), "a": np.zeros(4, np.float32)}
    layout = Layout.of(tree)
    assert [(x.path, x.offset, x.size) for x in layout.leaves] == [("['a']", 0, 4), ("['b']", 4, 6)]
    flat = np.arange(10, dtype=np.float32)
    views = layout.views(flat)
    np.testing.assert_array_equal(views["a"], [0, 1, 2, 3])
    flat[4] = 99.0  # a pull landing in the buffer shows through the tree: no copy
    assert views["b"][0, 0] == 99.0
    out = np.zeros(5, np.float32)  # a shard's range [3, 8)
    layout.write({"a": np.full(4, 1.0), "b": np.full((2, 3), 2.0)}, out, 3, 8)
    np.testing.assert_array_equal(out, [1, 2, 2, 2, 2])


@pytest.mark.parametrize(
    "leaf, message",
    [
        (np.zeros(3, np.int32), r"parameter \['p'\] has dtype int32; parameters must be float"),
        (np.zeros(3, np.float16), r"parameter \['p'\] is float16, and the wire carries float32"),
        (jnp.zeros(3, jnp.bfloat16), r"parameter \['p'\] is bfloat16, and the wire carries"),
        ("text", r"parameter \['p'\] is a str, not an array"),
    ],
)
def test_leaves_the_wire_cannot_carry_are_refused(leaf: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Layout.of({"p": leaf, "ok": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="no arrays"):
        Layout.of({})


# -- the worker's step ---------------------------------------------------------------------------


def test_the_step_is_the_tree_gradient_written_flat(task_file: Path) -> None:
    task = load_task(f"{task_file}:task")
    runtime = TaskRuntime(task)
    flat = runtime.init_flat(3)
    assert runtime.num_params == 6 * 16 + 16 + 16 + 1 == flat.size
    batch = task.batch(ctx(), 0)
    step = runtime.step(flat, batch)
    params = jax.tree_util.tree_map(jnp.asarray, runtime.layout.views(flat.copy()))
    (loss, aux), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch)
    expected = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads)])
    np.testing.assert_allclose(step.grad.to_array(), expected, rtol=1e-6, atol=1e-7)
    assert step.loss == pytest.approx(float(loss), rel=1e-6)
    assert step.metrics == {"max_error": pytest.approx(float(aux["max_error"]), rel=1e-6)}
    # Deterministic; the pieces are the leaves themselves, in flat order, with no joined copy.
    again = runtime.step(flat, batch)
    assert again.grad.to_array().tobytes() == step.grad.to_array().tobytes()
    sizes = [p.size for p in step.grad.pieces]
    assert sizes == [x.size for x in runtime.layout.leaves]
    assert not any(p.flags.owndata for p in step.grad.pieces)  # views of XLA's buffers


def test_init_slices_are_the_whole_vector_cut(task_file: Path) -> None:
    runtime = TaskRuntime(load_task(f"{task_file}:task"))
    whole = runtime.init_flat(5)
    cuts = [0, 7, 100, whole.size]
    parts = [runtime.init_flat(5, a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
    assert np.concatenate(parts).tobytes() == whole.tobytes()
    assert not np.array_equal(runtime.init_flat(6), whole)


def test_a_loss_that_is_not_a_scalar_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.py"
    path.write_text(
        USER_TASK.replace("return jnp.mean(err ** 2), {", "return err ** 2, {").replace(
            "task = TwoLayer()", "task = TwoLayer()"
        )
    )
    runtime = TaskRuntime(load_task(f"{path}:task"))
    flat = runtime.init_flat(0)
    with pytest.raises(ValueError, match="task.loss must return a scalar"):
        runtime.step(flat, runtime.task.batch(ctx(), 0))


def test_an_init_that_makes_its_key_a_python_int_is_named_above_its_own_frames(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """init(key) is traced (jax.eval_shape): an init that turns its key into a Python int gets
    one sentence naming the task and its method, then the user's own frames, none of Tether's."""
    from tether.cli.main import main
    from tether.config import RunConfig
    from tether.tasks.build import resolve_config

    path = tmp_path / "int_key.py"
    path.write_text(
        USER_TASK.replace(
            "k1, k2 = jax.random.split(key)",
            "seed = int(key[0])\n        k1, k2 = jax.random.split(jax.random.PRNGKey(seed))",
        )
    )
    with pytest.raises(ValueError) as refused:
        resolve_config(RunConfig.of("r", task=f"{path}:task"))
    first, *rest = str(refused.value).splitlines()
    assert first.startswith(f"task {path}:task: TwoLayer.init(key) is traced: ")
    assert "jax.eval_shape" in first and "split the key and draw with jax.random" in first
    assert rest[:2] == [f'  File "{path}", line 7, in init', "    seed = int(key[0])"]
    assert not [line for line in rest if "File" in line and str(path) not in line]
    assert any(line.startswith("ConcretizationTypeError: ") for line in rest)  # JAX's words
    # The command line prints it as it prints any bad input, and exits 2 before any run.
    assert main(["launch", "--task", f"{path}:task", "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith(f"tether launch: {first}\n")
    assert not (tmp_path / "run").exists()


def test_the_builtin_classifier_is_a_task_on_the_same_path() -> None:
    from tether.config import RunConfig
    from tether.tasks.build import resolve_config, runtime_of

    config = resolve_config(RunConfig.of("r", model="mlp:16", dataset="digits"))
    runtime = runtime_of(config)
    assert runtime.num_params == config.num_params == 64 * 16 + 16 + 16 * 10 + 10
    x, y = runtime.task.batch(ctx(batch_size=4), 0)
    assert x.shape == (4, 64) and y.shape == (4,)
    assert runtime.step(runtime.init_flat(0), (x, y)).grad.size == config.num_params


def test_resolve_config_makes_the_task_spec_absolute_and_counts_params(
    task_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tether.config import RunConfig
    from tether.tasks.build import resolve_config

    monkeypatch.chdir(task_file.parent)
    config = resolve_config(RunConfig.of("r", task="user_task.py:task"))
    assert config.task == f"{task_file}:task" and config.num_params == 129
    with pytest.raises(ValueError, match="--shards 200 exceeds the 129 parameters"):
        resolve_config(RunConfig.of("r", task="user_task.py:task", shards=200))


def test_launch_refuses_unknown_settings_before_starting_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown settings shardz"):
        tether.launch(f"{REPO}/examples/linear_regression.py:task", shardz=2, run_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_task_optimizer_that_is_not_elementwise_is_refused_before_starting(
    tmp_path: Path,
) -> None:
    path = tmp_path / "clip.py"
    path.write_text(
        USER_TASK
        + "\nimport optax\n\nclass Clipped(TwoLayer):\n"
        + "    def optimizer(self):\n"
        + "        return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))\n"
        + "\nclipped = Clipped()\n"
    )
    with pytest.raises(ValueError, match="not elementwise"):
        tether.launch(f"{path}:clipped", run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
