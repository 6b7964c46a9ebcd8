"""The console of a run: third-party noise turned down, and the lines that matter.

`quiet_third_party_logs` (called by `cscl_jax.main`) drops the INFO chatter of TFDS, orbax
and JAX's accelerator probe and TFDS's repeated deprecation notice; `run_lines` and
`final_lines` are the first lines of a run (what runs, on what, where) and its last ones
(where everything went, the headline scores). `start_tool` is the common start of the
other command-line tools.
"""

from collections.abc import Sequence
import logging
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import ml_collections
import tensorflow as tf

# INFO (and lower) records of modules whose path holds one of these are dropped...
_QUIET_INFO = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/xla_bridge.py")
# ... and so are warnings holding one of these (TFDS warns at every split it opens).
_QUIET_WARNINGS = ("FeatureConnector.dtype` is deprecated", "has no dataset_info.json",
                   "did not provide metrics")


def _is_noise(record: logging.LogRecord) -> bool:
  if record.levelno <= logging.INFO:
    return any(part in record.pathname for part in _QUIET_INFO)
  return record.levelno == logging.WARNING and any(
      text in record.getMessage() for text in _QUIET_WARNINGS)


def quiet_third_party_logs(handler: logging.Handler) -> None:
  """Drops the known third-party noise (see the module docstring) on `handler`."""
  handler.addFilter(lambda record: not _is_noise(record))


def headline(scores: dict[str, float]) -> str:
  """The scores without the per-class IoUs, as `name=value, ...`."""
  return ", ".join(f"{k}={v:.4f}" for k, v in scores.items() if "iou/" not in k)


def run_lines(config: ml_collections.ConfigDict, workdir: str, info: Any, num_params: int,
              steps_per_epoch: int, start_step: int, num_steps: int) -> list[str]:
  """What runs, on what and where: the first lines of a run's log.

  Args:
    config: the run's config.
    workdir: the run's directory.
    info: the dataset's `input_pipeline.SitsInfo`.
    num_params: the model's parameter count.
    steps_per_epoch: training steps per epoch.
    start_step: the step the run starts from (0, or the resumed checkpoint's).
    num_steps: the last step.
  """
  m, d = config.model, config.dataset
  eval_examples = ("the whole split" if config.num_eval_batches < 1 else
                   f"its first {config.num_eval_batches} batches")
  if config.precise_bn_batches:
    n = config.precise_bn_batches
    eval_examples += (f", BatchNorm statistics recomputed over {n} training "
                      f"batch{'es' if n > 1 else ''}" + (" once" if config.freeze_encoder
                                                        else ""))
  return [
      f"{m.stage} of {m.name} ({num_params:,} parameters), workdir {workdir}, "
      + (f"resuming at step {start_step}." if start_step else "fresh start."),
      f"Data: {d.name}/{d.config}, {d.train_split} {info.num_examples[d.train_split]:,} "
      f"examples, {d.eval_split} {info.num_examples[d.eval_split]:,} (eval: "
      f"{eval_examples}); {m.max_seq_len} dates x {m.img_res}x{m.img_res}.",
      f"Devices: {jax.process_count()} process(es) x {jax.local_device_count()} "
      f"{jax.devices()[0].platform}; batch {config.batch_size} global, "
      f"{config.batch_size // jax.device_count()} per device.",
      f"Steps {start_step} -> {num_steps} ({steps_per_epoch} per epoch, "
      f"{num_steps / steps_per_epoch:.1f} epochs); eval every {config.eval_every_steps}, "
      f"checkpoint every {config.checkpoint_every_steps}.",
  ]


def final_lines(workdir: str, manager: Any, step: int, scores: dict[str, float]) -> list[str]:
  """Where everything went, and the headline scores: the last lines of a run's log.

  Args:
    workdir: the run's directory.
    manager: its orbax CheckpointManager.
    step: the last step.
    scores: the last evaluation's scores.
  """
  best = manager.best_step()
  return [
      f"Done at step {step}: {headline(scores)}",
      f"Checkpoints: {manager.directory} (latest {manager.latest_step()}, best {best}).",
      f"Plots: {os.path.join(workdir, 'plots')}; metrics: "
      f"{os.path.join(workdir, 'metrics.json')}; TensorBoard: "
      f"tensorboard --logdir={workdir}",
  ]


def start_tool(argv: Sequence[str]) -> None:
  """The start of a `python -m cscl_jax.<verb>` tool other than main (evaluate, predict).

  Refuses stray arguments, drops the third-party log noise (unless --verbosity > 0) and
  keeps TensorFlow, which only reads data, off the accelerators.
  """
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if flags.FLAGS.verbosity <= 0:
    quiet_third_party_logs(absl_logging.get_absl_handler())
  tf.config.set_visible_devices([], "GPU")
