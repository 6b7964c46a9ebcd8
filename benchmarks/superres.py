"""Super-resolution: the x4 model vs the x1 model's map upsampled x4, and what x2 / x4 cost.

The paper's comparison (SPEC.md §5), at CPU size on the synthetic benchmark: two UNet3Df
classifiers trained alike from scratch (stage "supervised", the `:quick` shapes: 24x24
inputs at 10 m, 8 dates, f = 2, E = 32), one mapping at 10 m (x1) and one at 2.5 m (x4,
two up-blocks, trained on `labels_x4`). Both are scored on the test split against the x4
labels (2.5 m ground truth rasterised from the parcels): the x4 model's own map, and the x1
model's map upsampled x4 by nearest neighbour. Overall, boundary and interior pixels as in
`cscl_jax.metrics` (the boundary is that of the 2.5 m labels).

Then the cost of magnification: the compiled train step's memory (XLA temp + arguments +
outputs) and its median time for m = 1, 2, 4, pre-training (CSCL head on the magnified
embedding) and fine-tuning, at the same shapes.

  python -m benchmarks.superres --steps=150 --workdir=/tmp/superres_bench
  python -m benchmarks.superres --parts=cost --repeats=5     # only the cost table

Finished runs in `--workdir` are resumed (nothing retrained); delete it to start afresh.

Prints markdown tables and writes two PNGs of test samples (RGB | x4 labels | prediction |
errors) for the upsampled x1 and the x4 maps to `--plots`.
"""

import argparse
import functools
import os
import time

from flax import jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import measure
from configs import pretrain
from cscl_jax import input_pipeline
from cscl_jax import metrics
from cscl_jax import models
from cscl_jax import steps
from cscl_jax import train
from cscl_jax import visualize

X4 = 4


def make_config(magnification: int, stage: str = "supervised",
                learning_rate: float = 1e-3) -> ml_collections.ConfigDict:
  """The `:quick` UNet3Df with a classifier (or CSCL head) at `magnification`."""
  config = pretrain.get_config("quick")
  config.model.stage = stage
  config.learning_rate = learning_rate
  config.model.output_magnification = magnification
  return config


def train_model(magnification: int, num_steps: int, learning_rate: float,
                workdir: str) -> tuple[dict, float]:
  """Trains (or resumes) the x`magnification` model; returns its variables and wall s."""
  config = make_config(magnification, learning_rate=learning_rate)
  config.num_train_steps = num_steps
  config.eval_every_steps = config.checkpoint_every_steps = num_steps
  config.num_eval_batches = 4
  start = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  seconds = time.perf_counter() - start
  state, _ = train.restore_state(workdir, config, "latest")
  return {"params": state.params, "batch_stats": state.batch_stats}, seconds


def upsample_nearest(preds: np.ndarray, factor: int) -> np.ndarray:
  """[B, H, W] -> [B, factor H, factor W], each pixel repeated factor x factor times."""
  return np.repeat(np.repeat(preds, factor, axis=1), factor, axis=2)


def compare(variables: dict[int, dict], split: str, plots: str) -> dict[str, dict]:
  """Scores the x4 map and the upsampled x1 map on `split` against the x4 labels."""
  config = ml_collections.ConfigDict(make_config(X4).to_dict())  # references resolved
  config.batch_size = 8
  num_classes = config.model.num_classes
  info = input_pipeline.dataset_info(config)
  confusions, first = {}, None
  for batch in input_pipeline.create_split(config, split, train=False):
    batch = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}  # [B, ...]
    preds = {}
    for m, name in ((1, "x1 upsampled x4 (nearest)"), (X4, "x4")):
      logits = models.predict(make_config(m).model, variables[m], batch["inputs"])
      preds[name] = upsample_nearest(np.argmax(logits, -1), X4 // m)  # [B, 4S, 4S]
    for name, p in preds.items():
      c = np.asarray(metrics.segmentation_confusions(
          jnp.asarray(batch["labels"]), jnp.asarray(p), jnp.asarray(batch["valid"]),
          num_classes))
      confusions[name] = confusions.get(name, 0) + c
    if first is None:
      first = batch, preds
  batch, preds = first
  for i, (name, p) in enumerate(preds.items()):
    visualize.plot_segmentation(os.path.join(plots, f"superres_{('x1_upsampled', 'x4')[i]}.png"),
                                batch["inputs"][:3], batch["labels"][:3], p[:3], num_classes)
  return {name: metrics.segmentation_scores(c, info.class_names)
          for name, c in confusions.items()}


def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """One [D, b, ...] batch at the config's shapes, blocky labels at the label grid."""
  m, devices = config.model, jax.local_device_count()
  b, res = config.batch_size // devices, m.img_res * m.output_magnification
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, m.num_classes + 1, (devices, b, res // 8, res // 8))
  labels = np.repeat(np.repeat(blocks, 8, 2), 8, 3).astype(np.int32)  # [D, b, mS, mS]
  return {"inputs": rng.normal(size=(devices, b, m.max_seq_len, m.img_res, m.img_res,
                                     m.num_channels)).astype(np.float32),
          "labels": labels, "valid": labels < m.num_classes}


def step_cost(magnification: int, stage: str, repeats: int) -> tuple[float, float]:
  """(compiled train step MiB, median step s) at the `:quick` shapes."""
  config = make_config(magnification, stage)
  model = models.create_model(config.model, axis_name=steps.AXIS)
  state = steps.create_train_state(jax.random.key(0, impl="rbg"), config, model,
                                   steps.learning_rate_schedule(config, 100))
  state = jax_utils.replicate(state, axis_name=steps.AXIS)
  step = jax.pmap(functools.partial(steps.train_step, config=config, axis_name=steps.AXIS),
                  axis_name=steps.AXIS)
  batch = random_batch(config)
  mib = measure.compiled_bytes(step.lower(state, batch).compile()) / 2**20
  seconds = measure.median_times({"step": step}, (state, batch), repeats)["step"]
  return mib, seconds


def print_comparison(args: argparse.Namespace) -> None:
  """Trains (or resumes) both models, scores them, prints the table and writes the PNGs."""
  variables, train_s = {}, {}
  for m in (1, X4):
    variables[m], train_s[m] = train_model(m, args.steps, args.learning_rate,
                                           os.path.join(args.workdir, f"x{m}"))
  scores = compare(variables, args.split, args.plots)
  print(f"JAX {jax.__version__}, {jax.default_backend()}, {jax.device_count()} devices; "
        f"sits_synthetic/small, split {args.split!r}, scored against labels_x4 (2.5 m); "
        f"{args.steps} steps each, lr {args.learning_rate:g} (train s: x1 "
        f"{train_s[1]:.0f}, x4 {train_s[X4]:.0f})")
  print("| map (2.5 m grid) | OA | mIoU | boundary OA | boundary mIoU | interior OA |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, s in scores.items():
    print(f"| {name} | {s['oa']:.4f} | {s['miou']:.4f} | {s['boundary/oa']:.4f} | "
          f"{s['boundary/miou']:.4f} | {s['interior/oa']:.4f} |")


def print_cost(repeats: int) -> None:
  """Prints the train step's compiled memory and median time for m = 1, 2, 4."""
  print(f"JAX {jax.__version__}, {jax.default_backend()}; median of {repeats} steps")
  print("| stage | m | output grid | train step MiB | step s | vs m = 1 (MiB, s) |")
  print("|---|---:|---|---:|---:|---|")
  for stage in ("pretrain", "finetune"):
    base = None
    for m in (1, 2, X4):
      mib, seconds = step_cost(m, stage, repeats)
      base = base or (mib, seconds)
      res = make_config(m).model.img_res * m
      print(f"| {stage} | {m} | {res}x{res} | {mib:.0f} | {seconds:.3f} | "
            f"x{mib / base[0]:.2f}, x{seconds / base[1]:.2f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=150, help="training steps of each model")
  parser.add_argument("--workdir", default="/tmp/superres_bench", help="the two runs' dirs")
  parser.add_argument("--split", default="test")
  parser.add_argument("--plots", default="benchmarks/results")
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  parser.add_argument("--repeats", type=int, default=3, help="timed steps per cost cell")
  parser.add_argument("--parts", default="compare,cost", help="what to run: compare, cost")
  args = parser.parse_args()
  parts = set(args.parts.split(","))
  if parts - {"compare", "cost"}:
    parser.error(f"--parts={args.parts}: choose from compare, cost.")
  start = time.perf_counter()
  if "compare" in parts:
    print_comparison(args)
  if "cost" in parts:
    print_cost(args.repeats)
  print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
