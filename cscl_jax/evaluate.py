"""Evaluates a checkpoint of a training run on a whole dataset split.

  python -m cscl_jax.evaluate --workdir=workdirs/finetune --split=test --checkpoint=best

Reads the run's config from `<workdir>/config.json`, restores the checkpoint ("best" by the
validation metric the run ranked its checkpoints with, "latest", or a step number) and runs
the training loop's own eval step over the whole split (every example once: the last
batches are padded with examples that count nowhere). Writes, in the workdir:
  eval_<split>_<step>.json                the scores, with the keys of metrics.json;
  plots/confusion_<split>_<step>.png      the row-normalised confusion matrix (segmentation);
and logs a per-class table (pixels, precision, recall, IoU, F1).
"""

import functools
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
from flax import jax_utils
import jax
import numpy as np

from cscl_jax import checkpoints
from cscl_jax import console
from cscl_jax import input_pipeline
from cscl_jax import metrics
from cscl_jax import steps
from cscl_jax import train
from cscl_jax import visualize

def class_table(confusion: np.ndarray, class_names: list[str]) -> str:
  """A text table of per-class pixels, precision, recall, IoU and F1."""
  scores = metrics.per_class_scores(confusion)
  width = max(len("class"), *map(len, class_names))
  columns = ("precision", "recall", "iou", "f1")
  lines = [f"{'class':<{width}} {'pixels':>10} " + " ".join(f"{c:>9}" for c in columns)]
  for c, name in enumerate(class_names):
    values = " ".join(f"{scores[k][c]:>9.4f}" for k in columns)
    lines.append(f"{name:<{width}} {int(scores['pixels'][c]):>10d} {values}")
  return "\n".join(lines)


def evaluate_checkpoint(workdir: str, split: str, checkpoint: str,
                        data_dir: str | None = None) -> dict[str, Any]:
  """Evaluates a run's checkpoint on `split`; writes the JSON and PNG (module docstring).

  Returns:
    {"step": step, **scores}: the content of eval_<split>_<step>.json.
  """
  config = checkpoints.load_config(workdir)
  if data_dir:
    config.dataset.data_dir = data_dir
  info = input_pipeline.dataset_info(config)
  if split not in info.num_examples:
    raise ValueError(f"--split={split!r}: {config.dataset.name} has splits "
                     f"{sorted(info.num_examples)}.")
  state, step = train.restore_state(workdir, config, checkpoint)
  logging.info("Evaluating step %d of %s on %s (%d examples).", step, workdir, split,
               info.num_examples[split])
  p_eval_step = jax.pmap(functools.partial(steps.eval_step, config=config,
                                           axis_name=steps.AXIS), axis_name=steps.AXIS)
  confusions = []  # Summed confusion matrices [3, N, N] of each batch (segmentation).

  def eval_step_keeping_confusions(state, batch):
    sums, outputs = p_eval_step(state, batch)
    if "confusions" in sums:
      confusions.append(np.asarray(sums["confusions"][0], np.int64))
    return sums, outputs

  scores, _, _ = train.evaluate(
      eval_step_keeping_confusions, jax_utils.replicate(state, axis_name=steps.AXIS),
      input_pipeline.create_split(config, split, train=False, info=info),
      class_names=info.class_names, stage=config.model.stage)
  logging.info("%s at step %d: %s", split, step, console.headline(scores))
  train.write_metrics(os.path.join(workdir, f"eval_{split}_{step}.json"), step, scores)
  if confusions:
    confusion = np.sum(confusions, axis=0)[0]  # All known pixels.
    logging.info("Per-class scores on %s:\n%s", split, class_table(confusion,
                                                                   info.class_names))
    visualize.plot_confusion(os.path.join(workdir, "plots", f"confusion_{split}_{step}.png"),
                             confusion, list(info.class_names))
  return {"step": step, **scores}


def _define_flags() -> None:
  """The command line (defined only when run, so that tests import several entry points)."""
  flags.DEFINE_string("workdir", None, "Directory of the training run to evaluate.")
  flags.DEFINE_string("split", "test", "Dataset split to evaluate on.")
  flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
  flags.DEFINE_string("data_dir", None, "TFDS data dir, if not the run's.")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  console.start_tool(argv)
  f = flags.FLAGS
  evaluate_checkpoint(f.workdir, f.split, f.checkpoint, f.data_dir)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
