"""Validation scores of a run's checkpoints with running vs recomputed BatchNorm statistics.

Evaluates every saved checkpoint of a training run (or --steps) on --split three ways: with
the running statistics it saved, and with statistics recomputed over the first K training
batches after that step (cscl_jax.precise_bn, as config.precise_bn_batches = K does in the
loop) for each K in --batches. Prints a markdown table (and writes it to --out).

  python -m benchmarks.bn_statistics --batches=25,100 \
      --workdir=workdirs/evidence_unet3df/learning_curve/supervised/seed_1
"""

import functools
import time

from absl import app
from absl import flags
from etils import epath
from flax import jax_utils
import jax
import tensorflow as tf

from cscl_jax import checkpoints
from cscl_jax import host_memory
from cscl_jax import input_pipeline
from cscl_jax import precise_bn
from cscl_jax import steps
from cscl_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's directory.")
flags.DEFINE_list("steps", [], "Checkpoint steps (default: every saved one).")
flags.DEFINE_list("batches", ["25", "100"], "K: training batches to recompute over.")
flags.DEFINE_string("split", "validation", "Split to evaluate on.")
flags.DEFINE_string("out", None, "Also write the table to this markdown file.")
flags.mark_flags_as_required(["workdir"])


def scores_row(step: int, state, config, info, p_eval_step, p_statistics_step,
               batches: list[int]) -> list[tuple[float, float]]:
  """(mIoU, loss) with the saved statistics, then recomputed over each K of `batches`."""
  def evaluate(st):
    scores, _, _ = train.evaluate(
        p_eval_step, st, input_pipeline.create_split(config, FLAGS.split, train=False,
                                                     info=info),
        class_names=info.class_names, stage=config.model.stage)
    return scores["miou"], scores["loss"]

  state = jax_utils.replicate(state, axis_name=steps.AXIS)
  row = [evaluate(state)]
  for k in batches:
    row.append(evaluate(train.with_precise_bn(p_statistics_step, state, step, k, config,
                                              info)))
  return row


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  host_memory.retain_freed_memory()
  tf.config.set_visible_devices([], "GPU")
  config = checkpoints.load_config(FLAGS.workdir)
  if config.model.stage == "pretrain":
    raise app.UsageError("Scores mIoU: pass a fine-tuning or supervised run.")
  info = input_pipeline.dataset_info(config)
  saved = epath.Path(FLAGS.workdir) / checkpoints.CHECKPOINT_DIR
  saved_steps = [int(s) for s in FLAGS.steps] or sorted(
      int(p.name) for p in saved.iterdir() if p.name.isdigit())
  batches = [int(k) for k in FLAGS.batches]
  p_eval_step = jax.pmap(functools.partial(steps.eval_step, config=config,
                                           axis_name=steps.AXIS), axis_name=steps.AXIS)
  p_statistics_step = jax.pmap(functools.partial(precise_bn.batch_statistics,
                                                 seed=config.seed), axis_name=steps.AXIS)
  lines = [f"{FLAGS.workdir}, {FLAGS.split} split: mIoU / loss.\n",
           "| step | running | " + " | ".join(f"recomputed, K={k}" for k in batches) + " |",
           "| --- |" + " --- |" * (len(batches) + 1)]
  start = time.perf_counter()
  for step in saved_steps:
    state, _ = train.restore_state(FLAGS.workdir, config, str(step))
    row = scores_row(step, state, config, info, p_eval_step, p_statistics_step, batches)
    lines.append(f"| {step} | " + " | ".join(f"{m:.4f} / {l:.3f}" for m, l in row) + " |")
    print(lines[-1], flush=True)
  lines.append(f"\n{time.perf_counter() - start:.0f} s, {jax.device_count()} devices.")
  table = "\n".join(lines) + "\n"
  print(table)
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  app.run(main)
