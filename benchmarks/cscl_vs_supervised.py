"""Does CSCL pre-training help segmentation, most at parcel boundaries? (the paper's claim)

For each seed it trains one encoder two ways on the same data, with the same total number
of optimizer steps N = config.num_train_steps:

  supervised: encoder + classifier from random initialisation, N steps;
  cscl:       CSCL pre-training for round(N * pretrain_fraction) steps, then fine-tuning of
              the pre-trained encoder with a new classifier for the remaining steps.

Both arms evaluate the final model on the same held-out split (`--eval_split`, the
synthetic test split by default; it replaces config.dataset.eval_split) and write
`results.md` (mean ± std over seeds of mIoU, OA, boundary and interior mIoU, per-seed rows
and the paired CSCL - supervised gains) and `results.png` into `--outdir`. Every run has its
own workdir `<outdir>/<arm>/seed_<s>`; a run whose metrics.json holds its last step is
skipped, an interrupted one resumes from its checkpoint, so rerunning the command resumes.

The model, data and optimizer come from a base config (its `model.stage` is set per arm);
the encoder must be one that can be pre-trained (unet3df, unet2d_convlstm):

  python -m benchmarks.cscl_vs_supervised --outdir=/tmp/cscl_vs_supervised \
      --config=configs/finetune.py:quick --config.num_train_steps=300 --seeds=0,1,2
"""

import json
import os
import sys
import textwrap
import time

from absl import app
from absl import flags
import jax
import matplotlib
matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import ml_collections
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from cscl_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("outdir", None, "Where the run workdirs, results.md and results.png go.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each trains both arms.")
flags.DEFINE_float("pretrain_fraction", 0.5,
                   "Share of config.num_train_steps spent on CSCL pre-training.")
flags.DEFINE_string("eval_split", "test", "Held-out split both arms are evaluated on.")
config_flags.DEFINE_config_file("config", "configs/finetune.py:quick",
                                "Base config (configs/*.py[:variant]).", lock_config=True)
flags.mark_flags_as_required(["outdir"])

ARMS = ("supervised", "cscl")
# (metrics.json key, column title); the first four are plotted.
METRICS = (("miou", "mIoU"), ("oa", "OA"), ("boundary/miou", "boundary mIoU"),
           ("interior/miou", "interior mIoU"), ("boundary/oa", "boundary OA"))


def stage_configs(base: ml_collections.ConfigDict, seed: int, pretrain_fraction: float,
                  eval_split: str, outdir: str) -> dict[str, tuple[ml_collections.ConfigDict,
                                                                    str]]:
  """The runs of one seed: {"supervised", "pretrain", "finetune"} -> (config, workdir).

  Raises:
    ValueError: if the step budget cannot be split into two non-empty stages.
  """
  total = base.num_train_steps
  pretrain_steps = int(round(total * pretrain_fraction))
  if not 0 < pretrain_steps < total:
    raise ValueError(f"config.num_train_steps={total} with --pretrain_fraction="
                     f"{pretrain_fraction} leaves a stage without steps; set "
                     "config.num_train_steps > 1 and 0 < pretrain_fraction < 1.")
  runs = {}
  for stage, steps in (("supervised", total), ("pretrain", pretrain_steps),
                       ("finetune", total - pretrain_steps)):
    config = base.copy_and_resolve_references()
    config.seed, config.num_train_steps, config.model.stage = seed, steps, stage
    config.dataset.eval_split = eval_split
    arm = "supervised" if stage == "supervised" else "cscl"
    sub = "" if stage == "supervised" else stage
    runs[stage] = config, os.path.join(outdir, arm, f"seed_{seed}", sub)
  runs["finetune"][0].init_from = runs["pretrain"][1]
  return runs


def finished_metrics(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """The metrics.json of a run that reached its last step, else None."""
  path = os.path.join(workdir, "metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    scores = json.load(f)
  return scores if scores["step"] == config.num_train_steps else None


def run(config: ml_collections.ConfigDict, workdir: str, name: str) -> dict[str, float]:
  """Trains one stage unless it has finished; returns its final metrics."""
  scores = finished_metrics(config, workdir)
  if scores is not None:
    print(f"[skip] {name}: finished ({workdir})", flush=True)
    return scores
  print(f"[run]  {name}: {config.num_train_steps} steps in {workdir}", flush=True)
  start = time.perf_counter()
  scores = train.train_and_evaluate(config, workdir)
  print(f"[done] {name}: {time.perf_counter() - start:.0f} s, " + ", ".join(
      f"{k}={scores[k]:.4f}" for k in ("miou", "boundary/miou", "sim_same", "sim_diff")
      if k in scores), flush=True)
  return scores


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def results_table(results: dict[str, dict[int, dict[str, float]]],
                  pretrain: dict[int, dict[str, float]], header: str) -> str:
  """Markdown: mean ± std per arm, paired gains, per-seed rows and pre-training stats."""
  seeds = sorted(results["supervised"])
  titles = [t for _, t in METRICS]
  lines = [header, "", "| arm | " + " | ".join(titles) + " |",
           "| --- |" + " --- |" * len(METRICS)]
  for arm in ARMS:
    cells = [mean_std([results[arm][s][k] for s in seeds]) for k, _ in METRICS]
    lines.append(f"| {arm} | " + " | ".join(f"{m:.4f} ± {d:.4f}" for m, d in cells) + " |")
  gains = [mean_std([results["cscl"][s][k] - results["supervised"][s][k] for s in seeds])
           for k, _ in METRICS]
  lines.append("| cscl - supervised (paired) | " + " | ".join(
      f"{m:+.4f} ± {d:.4f}" for m, d in gains) + " |")
  lines += ["", "Per seed:", "", "| arm | seed | " + " | ".join(titles) + " |",
            "| --- | --- |" + " --- |" * len(METRICS)]
  for arm in ARMS:
    for s in seeds:
      lines.append(f"| {arm} | {s} | " + " | ".join(
          f"{results[arm][s][k]:.4f}" for k, _ in METRICS) + " |")
  lines += ["", "CSCL pre-training at its last step, on the eval split (mean cosine similarity "
            "of same-class and different-class pairs in the window; the centre and "
            "out-of-image neighbours included):", "",
            "| seed | loss | sim_same | sim_diff |", "| --- | --- | --- | --- |"]
  lines += [f"| {s} | {p['loss']:.4f} | {p['sim_same']:.4f} | {p['sim_diff']:.4f} |"
            for s, p in sorted(pretrain.items())]
  return "\n".join(lines) + "\n"


def results_plot(results: dict[str, dict[int, dict[str, float]]], path: str,
                 title: str) -> None:
  """Bars (mean ± std over seeds) of the first four METRICS, one colour per arm."""
  seeds = sorted(results["supervised"])
  fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
  x = np.arange(4)
  for i, arm in enumerate(ARMS):
    values = np.array([[results[arm][s][k] for k, _ in METRICS[:4]] for s in seeds])
    offset = (i - 0.5) * 0.38
    ax.bar(x + offset, values.mean(0), 0.36, label=arm,
           yerr=values.std(0, ddof=1) if len(seeds) > 1 else None, capsize=3)
    ax.plot(np.broadcast_to(x + offset, values.shape).ravel(), values.ravel(), "k.", ms=3)
  ax.set_xticks(x, [t for _, t in METRICS[:4]])
  ax.set_ylim(0, 1)
  ax.set_title(textwrap.fill(title, 95), fontsize=7)
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds the input pipeline.
  base, outdir = FLAGS.config, FLAGS.outdir
  seeds = [int(s) for s in FLAGS.seeds]
  start = time.perf_counter()
  results = {arm: {} for arm in ARMS}
  pretrain = {}
  for seed in seeds:
    runs = stage_configs(base, seed, FLAGS.pretrain_fraction, FLAGS.eval_split, outdir)
    results["supervised"][seed] = run(*runs["supervised"], f"supervised seed {seed}")
    pretrain[seed] = run(*runs["pretrain"], f"cscl pretrain seed {seed}")
    results["cscl"][seed] = run(*runs["finetune"], f"cscl finetune seed {seed}")
  m, d = base.model, base.dataset
  setup = (f"{m.name} f={m.num_features} emb={m.emb_channels} attn={m.attn_channels}, "
           f"{d.name}/{d.config} {m.img_res}x{m.img_res} T={m.max_seq_len}, batch "
           f"{base.batch_size}, lr {base.learning_rate}; supervised {base.num_train_steps} "
           f"steps vs cscl {runs['pretrain'][0].num_train_steps} pretrain + "
           f"{runs['finetune'][0].num_train_steps} finetune; eval on '{FLAGS.eval_split}'; "
           f"{len(seeds)} seeds")
  command = " ".join(["python -m benchmarks.cscl_vs_supervised"] + sys.argv[1:])
  table = results_table(results, pretrain,
                        f"# CSCL vs supervised\n\n{setup}.\n\n    {command}")
  with open(os.path.join(outdir, "results.md"), "w") as f:
    f.write(table)
  results_plot(results, os.path.join(outdir, "results.png"), setup)
  print(table, flush=True)
  print(f"Wrote {outdir}/results.md and results.png ({time.perf_counter() - start:.0f} s; "
        f"{jax.device_count()} devices).", flush=True)


if __name__ == "__main__":
  app.run(main)
