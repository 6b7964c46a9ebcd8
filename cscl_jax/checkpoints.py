"""Checkpoints of a run: an orbax CheckpointManager in `<workdir>/checkpoints`.

Keeps the latest N checkpoints (the one to resume from) AND the best one by a validation
metric, saves atomically and asynchronously (call `manager.wait_until_finished()` before
exit), restores against an abstract target, loads only the encoder of another run for
fine-tuning, and stores the run's config in `<workdir>/config.json` so that a workdir
holding checkpoints of another model is refused instead of silently mixed up.

States are saved as host (numpy) copies of the unreplicated train state.
"""

import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


def create_manager(workdir: str, *, keep: int, best_metric: str,
                   best_mode: str) -> ocp.CheckpointManager:
  """Returns the manager of `<workdir>/checkpoints`.

  Args:
    workdir: the run's directory.
    keep: how many of the latest checkpoints to keep.
    best_metric: name of the metric (passed to `save`) that ranks checkpoints; the best one
      is kept on top of the latest `keep`.
    best_mode: "max" or "min": whether larger or smaller `best_metric` is better.
  """
  def best_fn(metrics):
    return metrics[best_metric]
  preservation = policies.AnyPreservationPolicy([
      policies.LatestN(n=keep),
      policies.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                     keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      best_fn=best_fn, best_mode=best_mode, preservation_policy=preservation)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: dict[str, float] | None = None) -> None:
  """Saves a host copy of `state` (unreplicated) at `step`, with the eval `metrics` if any."""
  manager.save(step, args=ocp.args.StandardSave(jax.device_get(state)), metrics=metrics)


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> Any | None:
  """Restores the latest checkpoint into the structure of `target`, or None if none.

  Args:
    manager: from `create_manager`.
    target: a state (or a tree of `jax.ShapeDtypeStruct`) with the saved structure.

  Returns:
    The restored state with numpy leaves, or None when the directory holds no checkpoint.
  """
  return _restore(manager, manager.latest_step(), target)


def restore_best(manager: ocp.CheckpointManager, target: Any) -> tuple[int, Any] | None:
  """(step, state) of the best checkpoint by the manager's metric, or None if none has one.

  Args:
    manager: from `create_manager` (its `best_metric` ranks the saved eval metrics).
    target: as in `restore_latest`.
  """
  step = manager.best_step()
  return None if step is None else (step, _restore(manager, step, target))


def _restore(manager: ocp.CheckpointManager, step: int | None, target: Any) -> Any | None:
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _reader(directory: str) -> ocp.CheckpointManager:
  """A manager that only reads `directory` (creates nothing) and restores as saved."""
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers=ocp.StandardCheckpointHandler())


def _find_checkpoint(path: str) -> tuple[str, int]:
  """Resolves a workdir, a checkpoints dir or a step dir to (checkpoints dir, step)."""
  path = os.path.abspath(path)
  candidates = [(os.path.join(path, CHECKPOINT_DIR), None), (path, None)]
  if os.path.basename(path).isdigit():
    candidates.append((os.path.dirname(path), int(os.path.basename(path))))
  for directory, step in candidates:
    if os.path.isdir(directory):
      steps = _reader(directory).all_steps()
      if steps and (step is None or step in steps):
        return directory, max(steps) if step is None else step
  raise FileNotFoundError(
      f"No checkpoint found at {path!r}: pass a pre-training workdir, its "
      f"'{CHECKPOINT_DIR}' directory or one of its step directories.")


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Maps 'a/b/c' leaf paths to shapes."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.shape(leaf)
          for path, leaf in leaves}


def load_encoder(path: str, params: Any, batch_stats: Any) -> tuple[Any, Any]:
  """Replaces the encoder of `params` / `batch_stats` by the one saved at `path`.

  Args:
    path: a pre-training workdir, its checkpoints directory, or a step directory in it
      (the latest step is used unless a step directory is given).
    params: the new model's params {"encoder": ..., "head": ...}.
    batch_stats: the new model's batch statistics {"encoder": ...}.

  Returns:
    (params, batch_stats) with "encoder" taken from the checkpoint, the rest unchanged.

  Raises:
    ValueError: naming the leaves whose names or shapes differ from the new encoder.
  """
  directory, step = _find_checkpoint(path)
  with _reader(directory) as manager:
    saved = manager.restore(step)
  loaded = {"params": saved["params"]["encoder"],
            "batch_stats": saved.get("batch_stats", {}).get("encoder", {})}
  expected = {"params": params["encoder"], "batch_stats": batch_stats.get("encoder", {})}
  got, want = _shapes(loaded), _shapes(expected)
  problems = [f"{k}: checkpoint {got.get(k, 'missing')}, model {want.get(k, 'missing')}"
              for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
  if problems:
    raise ValueError(
        f"The encoder saved in {directory} (step {step}) does not fit this model "
        f"({len(problems)} mismatching leaves; were both runs built with the same "
        "config.model fields?):\n  " + "\n  ".join(problems[:20]))
  # Same structure as the new encoder, so the loaded leaves keep its containers.
  restructure = lambda new, old: jax.tree.unflatten(
      jax.tree.structure(new), [np.asarray(x) for x in jax.tree.leaves(old)])
  logging.info("Loaded pre-trained encoder from %s (step %d).", directory, step)
  return ({**params, "encoder": restructure(expected["params"], loaded["params"])},
          {**batch_stats,
           "encoder": restructure(expected["batch_stats"], loaded["batch_stats"])})


def check_config(workdir: str, config: ml_collections.ConfigDict,
                 has_checkpoint: bool) -> None:
  """Refuses a workdir whose checkpoints come from another model; stores the config.

  Args:
    workdir: the run's directory.
    config: this run's config.
    has_checkpoint: whether `workdir` already holds checkpoints.

  Raises:
    ValueError: if the checkpoints were written with different `config.model` fields, or
      without a config.json to tell.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if has_checkpoint:
    if not os.path.exists(path):
      raise ValueError(
          f"{workdir} holds checkpoints but no {CONFIG_FILE}, so it cannot be checked "
          "against this config; use a new --workdir.")
    with open(path) as f:
      saved = json.load(f).get("model", {})
    current = json.loads(config.model.to_json())
    diffs = [f"model.{k}: {saved.get(k)!r} in the workdir, {current.get(k)!r} now"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
      raise ValueError(
          f"{workdir} holds checkpoints of a different model/stage config:\n  "
          + "\n  ".join(diffs) + "\nUse a new --workdir (to fine-tune from it, pass "
          "--config.init_from=<that workdir>).")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    # Atomically: the other processes may be reading the previous one (checked above).
    with open(path + ".tmp", "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + ".tmp", path)
