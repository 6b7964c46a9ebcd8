"""Is the input pipeline the bottleneck? `main`'s training loop vs the bare train step.

Runs the training loop of `python -m cscl_jax.main` (train.train_and_evaluate: tf.data
input pipeline, host-to-device transfer, metrics, logging) for --steps steps of a config
in a temporary workdir, with evaluation and checkpointing only at the end, and reads its
steps/s from the TensorBoard scalars (clu's ReportProgress, after each step's results
are back; the median over the log windows after the first, which holds compilation).
Then times the bare replicated step of the same config on one fixed batch
(benchmarks/train_step.py). The share of the loop's time spent in the step is
bare step s x loop steps/s; the rest is the input pipeline and the loop's own work.

  python -m benchmarks.main_vs_step --config=configs/pretrain.py:quick
  python -m benchmarks.main_vs_step --config=configs/finetune.py:quick
"""

import statistics
import tempfile

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import tensorflow as tf

from benchmarks import evidence_report
from benchmarks import train_step
from cscl_jax import host_memory
from cscl_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 150, "Training steps of the loop.")
flags.DEFINE_integer("windows", 10, "Log windows (steps/s readings) over the loop.")
flags.DEFINE_integer("repeats", 10, "Timed bare steps (median).")
config_flags.DEFINE_config_file("config", "configs/pretrain.py:quick",
                                "Training configuration (configs/*.py[:variant]).",
                                lock_config=True)


def loop_steps_per_s(config, steps: int, windows: int) -> float:
  """Median steps/s of train_and_evaluate's log windows, the first one left out."""
  config = config.copy_and_resolve_references()
  config.num_train_steps = steps
  config.eval_every_steps = config.checkpoint_every_steps = steps
  config.log_every_steps = max(1, steps // windows)
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    rates = evidence_report.read_scalars(workdir, "steps_per_sec")
  # The first window compiles; the last one also evaluates.
  kept = [rates[s] for s in sorted(rates)[1:-1]]
  if not kept:
    raise ValueError(f"--steps={steps} with --windows={windows} leaves no log window "
                     "between the first and the last; raise --steps.")
  return statistics.median(kept)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  host_memory.retain_freed_memory()  # As cscl_jax.main does.
  tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds the input pipeline.
  config = FLAGS.config
  per_device = config.batch_size // jax.device_count()
  bare = train_step.time_steps(config, per_device, warmup=1, repeats=FLAGS.repeats)
  rate = loop_steps_per_s(config, FLAGS.steps, FLAGS.windows)
  m = config.model
  print(f"{m.name} {m.stage}, batch {config.batch_size}, {m.img_res}x{m.img_res}, "
        f"T={m.max_seq_len}, f={m.num_features}, {config.dataset.name}/"
        f"{config.dataset.config}; {jax.device_count()} devices ({jax.default_backend()})")
  print("| main loop steps/s | bare step s | bare steps/s | share of the loop in the step |")
  print("|---:|---:|---:|---:|")
  print(f"| {rate:.2f} | {bare['step_s']:.4f} | {1 / bare['step_s']:.2f} | "
        f"{100 * bare['step_s'] * rate:.0f} % |")


if __name__ == "__main__":
  app.run(main)
