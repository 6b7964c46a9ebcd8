"""Checkpoints of a run: an orbax CheckpointManager in `<workdir>/checkpoints`.

Keeps the latest N checkpoints (the one to resume from) AND the best one by a validation
metric, saves atomically and asynchronously (call `manager.wait_until_finished()` before
exit), restores against an abstract target, loads only the encoder of another run for
fine-tuning, and stores the run's config in `<workdir>/config.json` so that resuming a
workdir with another model or another data order is refused instead of silently mixed up.
Workdirs may be local or on Cloud Storage (gs://...): every file goes through etils.epath.

States are saved as host (numpy) copies of the unreplicated train state.
"""

import json
import os
from typing import Any

from absl import logging
from etils import epath
from flax import traverse_util
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
# Top-level config fields a resumed run must keep (besides model.* and the process count):
# they set the order and content of the training batches.
RESUME_FIELDS = ("seed", "batch_size", "process_count", "dataset.name", "dataset.config",
                 "dataset.train_split", "dataset.shuffle_buffer", "dataset.time_sampling",
                 "dataset.img_res", "dataset.max_seq_len", "dataset.num_classes",
                 "dataset.num_channels")


def _path(path: str) -> epath.Path:
  """A local path made absolute, or a URL (gs://...) as it is."""
  return epath.Path(path if "://" in str(path) else os.path.abspath(path))


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
  return ocp.CheckpointManager(_path(workdir) / CHECKPOINT_DIR, options=options)


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
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _reader(directory: epath.Path) -> ocp.CheckpointManager:
  """A manager that only reads `directory` (creates nothing) and restores as saved."""
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers=ocp.StandardCheckpointHandler())


def _find_checkpoint(path: str) -> tuple[epath.Path, int]:
  """Resolves a workdir, a checkpoints dir or a step dir to (checkpoints dir, step)."""
  path = _path(path)
  candidates = [(path / CHECKPOINT_DIR, None), (path, None)]
  if path.name.isdigit():
    candidates.append((path.parent, int(path.name)))
  for directory, step in candidates:
    if directory.is_dir():
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


def _replays_exactly(field: str) -> bool:
  """Whether `field` must stay as it was for a resumed run to continue the same one."""
  return field.startswith("model.") or field in RESUME_FIELDS


def check_config(workdir: str, config: ml_collections.ConfigDict,
                 has_checkpoint: bool) -> None:
  """Refuses to resume a run with another model or data order; stores the config.

  A resumed run continues the interrupted one exactly only with the same network
  (`config.model.*`), the same batches (`RESUME_FIELDS`: seed, batch size, dataset and
  split, shuffling, date sampling) and the same process count. Other fields (steps,
  learning rate, evaluation...) may change: they are logged and the run goes on.

  Args:
    workdir: the run's directory (local or gs://...).
    config: this run's config.
    has_checkpoint: whether `workdir` already holds checkpoints.

  Raises:
    ValueError: naming every field that differs from the checkpoints' run, or if the
      workdir holds checkpoints without a config.json to tell.
  """
  path = _path(workdir) / CONFIG_FILE
  written = {**json.loads(config.to_json_best_effort()),
             "process_count": jax.process_count()}
  current = traverse_util.flatten_dict(written, sep=".")
  if has_checkpoint:
    if not path.exists():
      raise ValueError(
          f"{workdir} holds checkpoints but no {CONFIG_FILE}, so it cannot be checked "
          "against this config; use a new --workdir.")
    saved = traverse_util.flatten_dict(json.loads(path.read_text()), sep=".")
    differ = [k for k in sorted(set(saved) | set(current))
              if k in saved and saved[k] != current.get(k)]
    describe = lambda keys: "\n  ".join(
        f"{k}: {saved[k]!r} in the workdir, {current.get(k)!r} now" for k in keys)
    refused = [k for k in differ if _replays_exactly(k)]
    if refused:
      raise ValueError(
          f"{workdir} holds checkpoints of another run; resuming it needs the same model "
          f"and data order, but:\n  {describe(refused)}\nRun it with the workdir's values, "
          "or start afresh in a new --workdir (to fine-tune from it, pass "
          "--config.init_from=<that workdir>).")
    if differ:
      logging.warning("Resuming %s with changed settings:\n  %s", workdir, describe(differ))
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomically: the other processes may be reading the previous one (checked above).
    tmp = path.parent / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(written, indent=2))
    tmp.replace(path)


def best_metric(stage: str) -> tuple[str, str]:
  """(metric, "min" | "max") that ranks the checkpoints of a `stage` run."""
  return ("loss", "min") if stage == "pretrain" else ("miou", "max")


def find_step(workdir: str, which: str, stage: str) -> int:
  """Resolves "best", "latest" or a step number to a saved step of `workdir`.

  Args:
    workdir: a training run's directory.
    which: "best" (by the stage's validation metric), "latest", or a step number.
    stage: config.model.stage of the run (chooses the ranking metric).

  Raises:
    FileNotFoundError: if the workdir holds no checkpoint, or not that step.
  """
  directory = _path(workdir) / CHECKPOINT_DIR
  if not directory.is_dir():
    raise FileNotFoundError(f"{workdir} holds no '{CHECKPOINT_DIR}' directory: pass the "
                            "--workdir of a training run.")
  metric, mode = best_metric(stage)
  options = ocp.CheckpointManagerOptions(create=False, best_fn=lambda m: m[metric],
                                         best_mode=mode)
  with ocp.CheckpointManager(directory, options=options) as manager:
    steps = manager.all_steps()
    step = {"best": manager.best_step, "latest": manager.latest_step}.get(which)
    step = step() if step else (int(which) if which.isdigit() else which)
  if step is None or step not in steps:
    raise FileNotFoundError(
        f"No checkpoint {which!r} in {directory} (steps {sorted(steps)}; 'best' needs one "
        "saved with validation metrics): use --checkpoint=best, latest or one of the steps.")
  return step


def restore_step(workdir: str, step: int, target: Any) -> Any:
  """Restores checkpoint `step` of `workdir` into the structure of `target`.

  Args:
    workdir: a training run's directory.
    step: from `find_step`.
    target: a state (or a tree of `jax.ShapeDtypeStruct`) with the saved structure.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  with _reader(_path(workdir) / CHECKPOINT_DIR) as manager:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`)."""
  path = _path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: pass the --workdir of a training run.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))
