"""Multi-process training: 2 local CPU processes (jax.distributed) against one process.

The step test starts two processes with 2 CPU devices each, joined by
`jax.distributed.initialize` (gloo collectives); they train on their halves of a fixed
global batch and must reach the parameters that one device reaches on the whole batch.
The loop test runs `train.train_and_evaluate` in 2 such processes (checkpoints, evaluation
on the padded eval split), kills a second run with SIGKILL after its first checkpoint,
resumes it and compares its final parameters with the uninterrupted run's: equal to the
last bit. (A 1-process run sees other batches by design: each process shuffles its own
share of the split.) The loop's multi-process specifics (each process reads its own share
of the data; only process 0 writes logs, plots and metrics.json) are also checked
in-process with a patched process index.
"""

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from flax import jax_utils
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from cscl_jax import checkpoints
from cscl_jax import input_pipeline
from cscl_jax import models
from cscl_jax import preemption
from cscl_jax import steps
from cscl_jax import train
from configs import test as test_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH, NUM_STEPS, LEARNING_RATE = 8, 2, 0.1
# (stage, how the steps run across processes): the loop's pmap, and jit(shard_map).
CASES = (("pretrain", "pmap"), ("finetune", "shard_map"))

_CHILD = """
import sys
import jax
port, process_id, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_enable_x64", True)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=process_id)
import test_distributed
test_distributed.child_main(out)
"""


def _config(stage: str):
  config = test_config.get_config()
  config.model.stage = stage
  return config


def _initial_state(config):
  """The tiny model with plain SGD: Adam would turn float noise in zero gradients into
  full-size steps, which no tolerance could compare.

  It computes in float64 (callers enable x64): in float32, one pre-activation within
  round-off of LeakyReLU's kink takes slope 1 on one side and 0.01 on the other, and a
  different summation order (4 devices against 1) can flip it, a difference no
  tolerance on round-off covers. Parameters stay float32; BatchNorm statistics, which
  the float64 batch statistics update, start float64.
  """
  model = models.create_model(config.model, dtype=jnp.float64, axis_name=steps.AXIS)
  state = steps.create_train_state(jax.random.key(0, impl="rbg"), config, model,
                                   steps.learning_rate_schedule(config, 10))
  tx = optax.sgd(LEARNING_RATE)
  return state.replace(tx=tx, opt_state=tx.init(state.params),
                       batch_stats=jax.tree.map(lambda s: s.astype(jnp.float64),
                                                state.batch_stats))


def _global_batches(config):
  """NUM_STEPS fixed global batches, identical in every process."""
  m, rng = config.model, np.random.default_rng(0)
  hw = (GLOBAL_BATCH, m.img_res, m.img_res)
  for _ in range(NUM_STEPS):
    labels = np.repeat(np.repeat(rng.integers(0, m.num_classes + 1, hw[:1] + (4, 4)),
                                 m.img_res // 4, 1), m.img_res // 4, 2)
    yield {"inputs": rng.normal(size=hw[:1] + (m.max_seq_len,) + hw[1:] + (m.num_channels,)
                                ).astype(np.float32),
           "labels": labels.astype(np.int32), "valid": rng.random(hw) > 0.1}


def _this_process_share(batch):
  """This process's rows of a global batch, as [local devices, b, ...]."""
  per_process = GLOBAL_BATCH // jax.process_count()
  start = jax.process_index() * per_process
  return jax.tree.map(lambda x: x[start:start + per_process].reshape(
      (jax.local_device_count(), -1) + x.shape[1:]), batch)


def _train_pmap(config):
  """NUM_STEPS of `steps.train_step` under pmap on every process, as the loop runs them."""
  step = jax.pmap(functools.partial(steps.train_step, config=config, axis_name=steps.AXIS),
                  axis_name=steps.AXIS)
  state = jax_utils.replicate(_initial_state(config), axis_name=steps.AXIS)
  for batch in _global_batches(config):
    state, _ = step(state, _this_process_share(batch))
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], state.params)


def _train_shard_map(config, devices):
  """NUM_STEPS of `steps.train_step` under jit(shard_map) over `devices` (of any process)."""
  mesh = Mesh(np.array(devices), (steps.AXIS,))
  step = jax.jit(jax.shard_map(
      functools.partial(steps.train_step, config=config, axis_name=steps.AXIS), mesh=mesh,
      in_specs=(P(), P(steps.AXIS)), out_specs=P()))
  state = jax.device_put(_initial_state(config), NamedSharding(mesh, P()))
  compiled = None
  for batch in _global_batches(config):
    share = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), _this_process_share(batch))
    batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        NamedSharding(mesh, P(steps.AXIS)), x), share)
    # Tiny arrays: compilation dominates, so skip XLA's backend optimisations.
    compiled = compiled or step.lower(state, batch).compile(
        {"xla_backend_optimization_level": 0})
    state, _ = compiled(state, batch)
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)


def child_main(out: str) -> None:
  """Runs every case in this process of the 2-process group; process 0 saves params."""
  assert jax.process_count() == 2 and jax.local_device_count() == 2
  run = {"pmap": _train_pmap,
         "shard_map": functools.partial(_train_shard_map, devices=jax.devices())}
  results = {stage: run[how](_config(stage)) for stage, how in CASES}
  # Only process 1 got a SIGTERM: both stop at the next agreement step (every 2 steps).
  stops = [preemption.stop_agreed(jax.process_index() == 1, step, every=2) for step in (3, 4)]
  if jax.process_index() == 0:
    flat = {f"{stage}/{jax.tree_util.keystr(path)}": leaf for stage, params in results.items()
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(out, stops=np.array(stops), **flat)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(child: str, *args: str) -> list[subprocess.Popen]:
  """Starts `child` (python code) as processes 0 and 1 of a jax.distributed group."""
  port = _free_port()
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
  # Not conftest's 8 devices (the children ask for 2 each); tiny programs compile twice as
  # fast without XLA's backend optimisations.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  return [subprocess.Popen([sys.executable, "-c", child, str(port), str(i), *args],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish(children: list[subprocess.Popen]) -> list[str]:
  """Waits for both processes; returns their logs."""
  try:
    logs = [child.communicate(timeout=300)[0] for child in children]
  finally:
    for child in children:
      child.kill()
  for i, child in enumerate(children):
    assert child.returncode == 0, f"process {i}:\n{logs[i][-3000:]}"
  return logs


def test_two_processes_train_like_one_device(tmp_path):
  out = str(tmp_path / "params.npz")
  _finish(_start(_CHILD, out))
  saved = np.load(out)
  assert saved["stops"].tolist() == [False, True]
  for stage, _ in CASES:
    with jax.enable_x64(True):
      expected = _train_shard_map(_config(stage), jax.devices()[:1])
      initial = jax.tree.leaves(_initial_state(_config(stage)).params)
    leaves = jax.tree_util.tree_leaves_with_path(expected)
    for path, leaf in leaves:
      got = saved[f"{stage}/{jax.tree_util.keystr(path)}"]
      assert np.isfinite(got).all()
      np.testing.assert_allclose(got, leaf, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{stage} {jax.tree_util.keystr(path)}")
    assert any(not np.allclose(a, b) for a, b in zip(initial, jax.tree.leaves(expected)))


# --- The loop's multi-process specifics, in this process with a patched process index. ---


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _pretend_process(monkeypatch, index: int, count: int = 2) -> None:
  monkeypatch.setattr(jax, "process_index", lambda *_: index)
  monkeypatch.setattr(jax, "process_count", lambda *_: count)


def test_each_process_reads_its_own_share(data_dir, monkeypatch):
  config = _config("pretrain")
  config.dataset.data_dir, config.batch_size = data_dir, 8  # 8 local devices
  examples = np.concatenate([b["inputs"].reshape((-1,) + b["inputs"].shape[2:]) for b in
                             input_pipeline.create_split(config, "train", train=False)])
  per_process = len(examples) // 2  # the 24 train examples, in order
  config.batch_size = 16
  for index in range(2):
    _pretend_process(monkeypatch, index)
    batches = list(input_pipeline.create_split(config, "train", train=False))
    # batch_size is global: 16 / 2 processes / 8 devices = 1 sample per device; 12
    # examples per process: a second batch of 4 examples and 4 padding ones.
    assert len(batches) == 2 and batches[0]["inputs"].shape[:2] == (8, 1)
    start = index * per_process
    np.testing.assert_array_equal(batches[0]["inputs"][:, 0], examples[start:start + 8])


def test_only_process_0_writes(data_dir, tmp_path, monkeypatch):
  config = _config("pretrain")
  config.dataset.data_dir = data_dir
  writers = []

  def recording_writer(workdir, *, just_logging):
    writers.append(just_logging)
    raise InterruptedError  # The rest of the loop is not needed here.

  monkeypatch.setattr(train.metric_writers, "create_default_writer", recording_writer)
  batch = next(input_pipeline.create_split(config, "validation", train=False))
  monkeypatch.setattr(input_pipeline, "create_split", lambda *_, **__: iter([batch]))
  num_devices = batch["labels"].shape[0]
  sums = {k: np.ones(num_devices) for k in ("loss_sum", "loss_count", "sim_same_sum", "same_count",
                                            "sim_diff_sum", "diff_count")}
  sim = np.zeros(batch["labels"].shape + (3, 3), np.float32)
  info = input_pipeline.dataset_info(config)
  for index in (1, 0):
    _pretend_process(monkeypatch, index)
    with pytest.raises(InterruptedError):
      train.train_and_evaluate(config, str(tmp_path))
    train._eval_and_report(lambda state, b: (sums, sim), None, 7, config, str(tmp_path),
                           info, train.metric_writers.LoggingWriter())
    written = {os.path.exists(tmp_path / "metrics.json"),
               os.path.exists(tmp_path / "plots" / "eval_0000007.png")}
    assert written == {index == 0}
  assert writers == [True, False]  # process 1 only logs; process 0 writes TensorBoard
  with open(tmp_path / "metrics.json") as f:
    assert json.load(f)["step"] == 7


# --- The whole loop in 2 processes: checkpoints, evaluation, a SIGKILL and a resume. ---

_LOOP_CHILD = """
import sys
import jax
port, process_id, workdir, data_dir, cache = sys.argv[1:6]
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_compilation_cache_dir", cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=int(process_id))
from absl import logging
logging.use_absl_handler()
logging.set_verbosity(logging.INFO)
import test_distributed
from cscl_jax import train
train.train_and_evaluate(test_distributed.loop_config(data_dir), workdir)
"""
LOOP_STEPS = 6


def loop_config(data_dir: str):
  """configs/test.py for 6 steps, a checkpoint every 2 and an eval at 3 and 6."""
  config = _config("pretrain")
  config.update(num_train_steps=LOOP_STEPS, checkpoint_every_steps=2, eval_every_steps=3,
                log_every_steps=1, num_eval_batches=-1)
  config.dataset.data_dir = data_dir
  return config


def _saved_params(workdir: str, step: int):
  manager = checkpoints.create_manager(workdir, keep=1, best_metric="loss", best_mode="min")
  return jax.tree.leaves(manager.restore(step)["params"])


def test_two_process_loop_resumes_after_sigkill_exactly(data_dir, tmp_path):
  input_pipeline.dataset_info(loop_config(data_dir))  # built once, before any process
  cache, straight, killed = (str(tmp_path / d) for d in ("cache", "straight", "killed"))
  logs = _finish(_start(_LOOP_CHILD, straight, data_dir, cache))
  assert "Eval at step 3" in logs[0] and "Eval at step 6" in logs[0]
  with open(os.path.join(straight, "metrics.json")) as f:
    assert json.load(f)["step"] == LOOP_STEPS

  children = _start(_LOOP_CHILD, killed, data_dir, cache)
  first = os.path.join(killed, "checkpoints", "2")
  while not os.path.isdir(first) and children[0].poll() is None:
    time.sleep(0.05)
  for child in children:  # the whole run dies at once, no chance to save
    child.send_signal(signal.SIGKILL)
    child.wait()
  logs = _finish(_start(_LOOP_CHILD, killed, data_dir, cache))
  resumed_at = int(re.search(r"resuming at step (\d+)", logs[0]).group(1))
  assert 2 <= resumed_at < LOOP_STEPS
  for a, b in zip(_saved_params(straight, LOOP_STEPS), _saved_params(killed, LOOP_STEPS)):
    np.testing.assert_array_equal(a, b)
