"""Command line entry point: pre-train, fine-tune or train a supervised baseline.

  python -m cscl_jax.main --config=configs/pretrain.py:quick
  python -m cscl_jax.main --config=configs/finetune.py --workdir=workdirs/finetune \
      --config.init_from=workdirs/pretrain

`--workdir` defaults to `workdirs/<config file stem>[_<variant>]` (above:
workdirs/pretrain_quick); it may be a local path or a Cloud Storage URL (gs://...). Any
config field can be overridden, e.g. `--config.batch_size=8`; a mistyped field is an error.
Rerunning a command with the same workdir resumes from its latest checkpoint; Ctrl-C or
SIGTERM saves a checkpoint and exits with status 130 / 143.

The console shows the run's own lines; TensorFlow's C++ log (TF_CPP_MIN_LOG_LEVEL=2 unless
set), TFDS's and orbax's INFO chatter and progress bars, and JAX's TPU probe are turned down. `--verbosity=1`
(or TF_CPP_MIN_LOG_LEVEL=0) brings them back.

Multi-host (e.g. a TPU pod slice): run the same command on every host, with a --workdir
that all hosts reach (a gs:// bucket, NFS) and the dataset built once beforehand.
`jax.distributed.initialize` is called when
  * `--config.distributed=True`: JAX finds the coordinator, process count and id itself
    on Cloud TPU VMs (pods, GKE), SLURM and Open MPI; or when
  * the environment sets JAX_COORDINATOR_ADDRESS (host:port of process 0), for a launch by
    hand; then JAX_NUM_PROCESSES and JAX_PROCESS_ID give the process count and this
    process's id (where unset, JAX detects them as above).
Each process reads its own share of the data, batch_size stays the global batch, all
processes save checkpoints together, and only process 0 writes logs, plots and metrics.
"""

import os

# Before TensorFlow is first imported (by cscl_jax.train): no C++ INFO/WARNING lines, and
# no oneDNN notice (the input pipeline does no heavy maths in TensorFlow).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # Its notice is logged at import.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf
import tensorflow_datasets as tfds

from cscl_jax import console
from cscl_jax import host_memory
from cscl_jax import preemption
from cscl_jax import train

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory (or gs:// URL) for checkpoints, logs, plots "
                    "and metrics; default workdirs/<config stem>[_<variant>].")
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (configs/*.py[:variant]).",
    lock_config=True)
flags.mark_flags_as_required(["config"])


def default_workdir(config_arg: str) -> str:
  """workdirs/<file stem>[_<variant>] for a --config value like configs/pretrain.py:quick."""
  path, _, variant = config_arg.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdirs", f"{stem}_{variant}" if variant else stem)


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
  host_memory.retain_freed_memory()  # Before JAX's CPU client starts its threads.
  if FLAGS.verbosity <= 0:  # Unless asked for more: the run's own lines only.
    console.quiet_third_party_logs(logging.get_absl_handler())
    tfds.disable_progress_bar()  # A dataset's first build logs its start and end.
  # TensorFlow only feeds the input pipeline: keep it off the accelerators.
  tf.config.set_visible_devices([], "GPU")
  config = FLAGS.config
  if config.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(num_processes=_env_int("JAX_NUM_PROCESSES"),
                               process_id=_env_int("JAX_PROCESS_ID"))
  workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
  try:
    train.train_and_evaluate(config, workdir)
  except preemption.Stopped as stop:
    logging.warning("%s", stop)
    logging.flush()
    # All is saved and flushed: skip the interpreter's teardown of TensorFlow, tf.data and
    # JAX, which takes from seconds to a minute on a busy host, longer than the grace
    # period of many schedulers.
    os._exit(stop.exit_code)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
