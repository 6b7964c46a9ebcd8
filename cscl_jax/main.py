"""Command line entry point: pre-train, fine-tune or train a supervised baseline.

  python -m cscl_jax.main --config=configs/pretrain.py --workdir=workdirs/pretrain
  python -m cscl_jax.main --config=configs/finetune.py --workdir=workdirs/finetune \
      --config.init_from=workdirs/pretrain

Any config field can be overridden, e.g. `--config.batch_size=8`; a mistyped field is an
error. Rerunning a command with the same workdir resumes from its latest checkpoint.

Multi-host (e.g. a TPU pod slice): run the same command on every host, with a --workdir
on a file system that all hosts mount (NFS, a gcsfuse mount of a bucket; the config,
metrics and plot files are written with plain `open`, so not a gs:// URL) and the dataset
built once beforehand. `jax.distributed.initialize` is called when
  * `--config.distributed=True`: JAX finds the coordinator, process count and id itself
    on Cloud TPU VMs (pods, GKE), SLURM and Open MPI; or when
  * the environment sets JAX_COORDINATOR_ADDRESS (host:port of process 0), for a launch by
    hand; then JAX_NUM_PROCESSES and JAX_PROCESS_ID give the process count and this
    process's id (where unset, JAX detects them as above).
Each process reads its own share of the data, batch_size stays the global batch, all
processes save checkpoints together, and only process 0 writes logs, plots and metrics.
"""

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from cscl_jax import train

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, plots and metrics.")
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (configs/*.py[:variant]).",
    lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _env_int(name: str) -> int | None:
  """The integer in environment variable `name`, or None if it is unset."""
  value = os.environ.get(name)
  if value is None:
    return None
  if not value.isdigit():
    raise ValueError(f"{name}={value!r} must be a non-negative integer (or unset).")
  return int(value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Orbax logs every step of every checkpoint write at INFO: keep its warnings only.
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname)
  # TensorFlow only feeds the input pipeline: keep it off the accelerators.
  tf.config.set_visible_devices([], "GPU")
  config = FLAGS.config
  if config.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(num_processes=_env_int("JAX_NUM_PROCESSES"),
                               process_id=_env_int("JAX_PROCESS_ID"))
  logging.info("JAX process %d of %d; local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  train.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
