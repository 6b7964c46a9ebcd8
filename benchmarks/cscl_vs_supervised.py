"""Does CSCL pre-training help segmentation, most at parcel boundaries? (the paper's claim)

Protocol (issue 13), one encoder per invocation: UNet3Df (configs/finetune.py:quick widths
or wider) or UNet2D-ConvLSTM (--config.model.name=unet2d_convlstm); every arm uses the same
config.model, so the same widths; the supervised arm keeps the encoder and its classifier
(not UNet3D) so that the only difference is the initialisation.

 1. Choose N, the supervised budget, from a learning curve on sits_synthetic/default:
    `--learning_curve` trains only the supervised arm for config.num_train_steps steps,
    evaluating on the validation split every config.eval_every_steps, and plots validation
    mIoU against steps (learning_curve.png / .md). N is where the curve has flattened.
 2. Per seed, all arms with the same seed and so the same data order:
    (a) supervised: N steps from random initialisation;
    (b) paper: CSCL pre-training M steps, then fine-tuning N steps (pre-training on top, as
        in the reference's 50 + 50 vs 50 epochs), for M = round(f N), f in
        --pretrain_fractions (default 1/8, 1/4, 1/2, 1);
    (c) matched: the same pre-training (M steps), then fine-tuning N - M steps (the same
        total compute as (a)), for every f < 1;
    probe: a linear probe (config.freeze_encoder: the encoder's params get zero updates and
        it runs in inference mode with fixed BatchNorm statistics; only the classifier
        head trains, 1x1 for UNet3Df, the reference's 3x3 for UNet2D-ConvLSTM)
        for --probe_steps on the CSCL encoder pre-trained with the largest M, and on a
        randomly initialised encoder, once per rate of --probe_learning_rates; each
        encoder's probe is the rate with the best validation mIoU (per seed). One rate
        cannot suit both: the CSCL encoder's features are ~10x larger than a random one's,
        and at the fine-tuning rate (1e-4) the random probe stays at chance.
    >= 5 seeds.
 3. Every run validates on --select_split (validation) and keeps its best checkpoint by
    validation mIoU; after training that checkpoint is evaluated on --test_split (test)
    with cscl_jax.evaluate (the whole split; test_metrics.json in the run's workdir).
    BatchNorm statistics: pass --config.precise_bn_batches=K (as the README's commands do)
    so that every evaluation, and the checkpoint it ranks, uses statistics recomputed over
    K training batches (cscl_jax/precise_bn.py); the running averages made validation
    mIoU swing by up to 0.4 between evaluations (benchmarks/bn_statistics.py). A probe's
    frozen encoder gets them once, before its first step: both probes then normalise
    with statistics of their own weights, not the random encoder's initial (0, 1) nor
    the CSCL encoder's pre-training running averages.
 4. Differences from the reference, one at a time (--ablations; ABLATIONS): the paper arm
    at M = --ablation_fraction N with the CSCL mask on, unnormalised embeddings or
    pos_weight 1, paired with that paper arm. Run them after the main arms: rerunning
    the command with --ablations skips every finished run.
 5. results.md: per-arm means, paired differences (CSCL - supervised; probe cscl - probe
    random) with 95 % t confidence intervals over seeds (benchmarks/evidence_report.py), per
    seed rows; diff.png: boundary / interior mIoU differences with their intervals;
    sweep.png: the paired mIoU difference against M, paper and matched arms;
    loss_curves.png: the fine-tuning training loss of every arm. All of it comes from the
    runs' records (below). --report_only writes them from the runs finished so far,
    training nothing (a progress report while the arms run elsewhere; a pair with one
    common seed has no interval).

Workdirs (scratch): <outdir>/supervised/seed_<s>, pretrain/m<M>/seed_<s>,
paper/m<M>/seed_<s>, matched/m<M>/seed_<s>, probe/random/lr<rate>/seed_<s>,
probe/cscl_m<M>/lr<rate>/seed_<s>,
pretrain_<ablation>/m<M>/seed_<s>, paper_<ablation>/m<M>/seed_<s>. Records (durable, to
commit): <records>/<same name>.json, one per finished run (benchmarks/run_records.py: its
config, validation and test metrics, loss and validation curves, wall time). A run with a
record is skipped, its workdir may be gone (a fine-tuning run that still has to train
retrains its pre-training first if that workdir has gone); a run whose metrics.json holds
its last step gets its record from its workdir; an interrupted one resumes from its
checkpoint. So rerunning the command resumes, on this machine or, from the records, on
another. --only=<patterns> trains just the runs whose names match (fnmatch: 'paper/*',
'probe/random/*'), reading the others from their records: a queue can then fit its runs
into the time a machine has, one at a time, and hand the rest to another.

  python -m benchmarks.cscl_vs_supervised --learning_curve --outdir=/tmp/curve \
      --config=configs/finetune.py:quick --config.dataset.config=default \
      --config.num_train_steps=4000 --config.eval_every_steps=250 --seeds=0,1
  python -m benchmarks.cscl_vs_supervised --outdir=/tmp/evidence --seeds=0,1,2,3,4 \
      --config=configs/finetune.py:quick --config.dataset.config=default \
      --config.num_train_steps=<N>
"""

from collections.abc import Sequence
import fnmatch
import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import tensorflow as tf

from benchmarks import evidence_report as report
from benchmarks import run_records
from cscl_jax import evaluate
from cscl_jax import host_memory
from cscl_jax import train

FLAGS = flags.FLAGS

# The linear probes' learning rates: each encoder's probe keeps the best on validation.
PROBE_LEARNING_RATES = (1e-4, 1e-3, 1e-2)

flags.DEFINE_string("outdir", None, "Where the run workdirs, results.md and the plots go.")
flags.DEFINE_string("records", None, "Folder of the runs' records (benchmarks/run_records.py:"
                    " one small JSON per finished run, all that the report reads; commit "
                    "it). A run with a record is done, its workdir may be gone. Default: "
                    "<outdir>/records.")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds; each trains every arm.")
flags.DEFINE_list("pretrain_fractions", ["0.125", "0.25", "0.5", "1"],
                  "CSCL pre-training steps M as fractions of N = config.num_train_steps.")
flags.DEFINE_integer("probe_steps", -1, "Linear-probe steps; -1: N // 4; 0: no probe.")
flags.DEFINE_list("probe_learning_rates", [f"{r:g}" for r in PROBE_LEARNING_RATES],
                  "The linear probes' learning rates; each encoder's probe is the rate with "
                  "the best validation mIoU.")
flags.DEFINE_list("ablations", [], "Reference settings changed one at a time in the paper "
                  "arm at M = --ablation_fraction N, each paired with that paper arm: "
                  "mask, no_norm_emb, pos_weight_1 (ABLATIONS).")
flags.DEFINE_float("ablation_fraction", 0.25, "M of the ablations as a fraction of N; one "
                   "of --pretrain_fractions.")
flags.DEFINE_bool("learning_curve", False,
                  "Only train the supervised arm and plot its validation mIoU vs steps.")
flags.DEFINE_bool("report_only", False, "Train and evaluate nothing new: results.md and the "
                  "plots from the runs finished so far (a progress report while arms run); "
                  "finished runs without a record get one.")
flags.DEFINE_list("only", [], "Train only the runs whose names match one of these fnmatch "
                  "patterns (e.g. paper/m375,probe/random/*); the others are read from "
                  "their records as with --report_only. Default: every run.")
flags.DEFINE_string("select_split", "validation", "Split the runs validate on.")
flags.DEFINE_string("test_split", "test", "Split the best checkpoints are evaluated on.")
config_flags.DEFINE_config_file("config", "configs/finetune.py:quick",
                                "Base config (configs/*.py[:variant]).", lock_config=True)
flags.mark_flags_as_required(["outdir"])

TEST_METRICS = "test_metrics.json"
# Pre-training settings of the reference that the ablations change, one at a time:
# name -> (config field, value in the ablation).
ABLATIONS = {
    # The CSCL mask: pairs with an unknown pixel, out-of-image neighbours and the centre
    # leave the loss (the reference counts unknown as one more class: mask off).
    "mask": ("cscl.use_mask", True),
    # Dot products of unnormalised embeddings instead of cosine similarities.
    "no_norm_emb": ("model.norm_emb", False),
    # Positive (same-class) pairs weighted 1 instead of the reference's 0.125.
    "pos_weight_1": ("cscl.pos_weight", 1.0),
}


def pretrain_steps(total: int, fractions: list[float]) -> list[int]:
  """M = round(f * total) per fraction.

  Raises:
    ValueError: for a fraction outside (0, 1] or one that rounds to no step.
  """
  steps = [int(round(total * f)) for f in fractions]
  bad = [f for f, m in zip(fractions, steps) if not 0 < f <= 1 or m < 1]
  if bad:
    raise ValueError(f"--pretrain_fractions {bad} give no pre-training step of N={total} "
                     "or exceed 1; use fractions in (0, 1] with round(f * N) >= 1.")
  return steps


def seed_runs(base: ml_collections.ConfigDict, seed: int, steps_m: list[int],
              probe_steps: int, select_split: str, outdir: str,
              ablations: Sequence[str] = (), ablation_m: int = 0,
              probe_rates: Sequence[float] = PROBE_LEARNING_RATES
              ) -> dict[str, tuple[ml_collections.ConfigDict, str]]:
  """The runs of one seed, name -> (config, workdir), in an order that can run them.

  The probes are probe/random/lr<rate> and probe/cscl_m<M>/lr<rate> for each of
  `probe_rates`. Each of `ablations` (keys of ABLATIONS) adds pretrain_<name>/m<ablation_m>
  and paper_<name>/m<ablation_m>: the paper arm with that one setting changed.
  """
  total = base.num_train_steps

  def make(name, stage, steps, init_from="", freeze=False, change=None, rate=None):
    config = base.copy_and_resolve_references()
    config.seed, config.num_train_steps, config.model.stage = seed, steps, stage
    config.dataset.eval_split, config.init_from = select_split, init_from
    config.freeze_encoder = freeze
    if rate is not None:
      config.learning_rate = rate
    if change:
      (section, field), value = change[0].split("."), change[1]
      config[section][field] = value
    return config, os.path.join(outdir, name, f"seed_{seed}")

  runs = {"supervised": make("supervised", "supervised", total)}
  for m in steps_m:
    runs[f"pretrain/m{m}"] = pre = make(f"pretrain/m{m}", "pretrain", m)
    runs[f"paper/m{m}"] = make(f"paper/m{m}", "finetune", total, pre[1])
    if m < total:
      runs[f"matched/m{m}"] = make(f"matched/m{m}", "finetune", total - m, pre[1])
  if probe_steps:
    m = max(steps_m)
    for rate in probe_rates:
      for probe, stage, init in (("probe/random", "supervised", ""),
                                 (f"probe/cscl_m{m}", "finetune", runs[f"pretrain/m{m}"][1])):
        name = f"{probe}/lr{rate:g}"
        runs[name] = make(name, stage, probe_steps, init, freeze=True, rate=rate)
  for name in ablations:
    m, change = ablation_m, ABLATIONS[name]
    pre = make(f"pretrain_{name}/m{m}", "pretrain", m, change=change)
    runs[f"pretrain_{name}/m{m}"] = pre
    runs[f"paper_{name}/m{m}"] = make(f"paper_{name}/m{m}", "finetune", total, pre[1],
                                      change=change)
  return runs


def best_probes(results: dict[str, dict[int, dict]], validation: dict[str, dict[int, float]]
                ) -> dict[str, dict[int, dict]]:
  """Merges each encoder's probes over the learning rates, per seed.

  Args:
    results: arm -> seed -> test scores; probes are named <probe>/lr<rate>.
    validation: the same probe names -> seed -> validation mIoU.

  Returns:
    `results` with every <probe>/lr<rate> replaced by <probe>: per seed the test scores of
    the rate with the best validation mIoU (seeds with any rate unfinished are left out),
    that rate under "learning_rate" and the training seconds of all its rates ("wall_s").
  """
  merged = {a: r for a, r in results.items() if "/lr" not in a}
  probes: dict[str, list[str]] = {}
  for arm in results:
    if "/lr" in arm:
      probes.setdefault(arm.rsplit("/lr", 1)[0], []).append(arm)
  for probe, arms in probes.items():
    seeds = set.intersection(*(set(results[a]) for a in arms))
    for seed in sorted(seeds):
      best = max(arms, key=lambda a: validation[a][seed])
      walls = [results[a][seed].get("wall_s") for a in arms]
      merged.setdefault(probe, {})[seed] = {
          **results[best][seed], "learning_rate": float(best.rsplit("/lr", 1)[1]),
          "wall_s": None if None in walls else sum(walls)}
  return merged


def baselines_of(arms: list[str]) -> dict[str, str]:
  """Arm -> the arm its paired difference subtracts (an ablation: its paper arm)."""
  def baseline(arm):
    if arm.startswith("probe/cscl"):
      return "probe/random"
    if arm.startswith("paper_"):
      return "paper/" + arm.split("/", 1)[1]
    return "supervised"

  return {a: baseline(a) for a in arms if a not in ("supervised", "probe/random")}


def selected(name: str, patterns: Sequence[str]) -> bool:
  """Whether run `name` may train under --only: no patterns, or one that matches it."""
  return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def finished_scores(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """The run's last validation metrics if it has trained all its steps, else None."""
  path = os.path.join(workdir, "metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    scores = json.load(f)
  return scores if scores["step"] == config.num_train_steps else None


def train_run(config: ml_collections.ConfigDict, workdir: str, name: str) -> dict:
  """Trains one run unless finished; returns its last validation metrics."""
  scores = finished_scores(config, workdir)
  if scores is not None:
    print(f"[skip] {name}: finished ({workdir})", flush=True)
    return scores
  print(f"[run]  {name}: {config.num_train_steps} steps in {workdir}", flush=True)
  start = time.perf_counter()
  scores = train.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - start
  print(f"[done] {name}: {wall:.0f} s, " + ", ".join(
      f"{k}={scores[k]:.4f}" for k in ("miou", "boundary/miou", "sim_same", "sim_diff")
      if k in scores), flush=True)
  return {"step": config.num_train_steps, **scores}


def evaluate_best(config: ml_collections.ConfigDict, workdir: str, split: str) -> dict:
  """Test metrics of the run's best-validation checkpoint (cscl_jax.evaluate; cached)."""
  path = os.path.join(workdir, TEST_METRICS)
  if os.path.exists(path):
    with open(path) as f:
      scores = json.load(f)
    if scores["num_train_steps"] == config.num_train_steps and scores["split"] == split:
      return scores
  scores = evaluate.evaluate_checkpoint(workdir, split, "best")
  scores = {**scores, "split": split, "num_train_steps": config.num_train_steps}
  with open(path, "w") as f:
    json.dump(scores, f, indent=2)
  return scores


def record_of(runs: dict[str, tuple[ml_collections.ConfigDict, str]], name: str, seed: int,
              records: str, report_only: bool) -> dict | None:
  """The record of run `name` (run_records): read from `records`, else made and written there.

  Without a record the run is trained first unless its workdir holds the finished run,
  after the pre-training it starts from if that workdir has gone (its record alone does not
  keep the checkpoint); with report_only nothing trains or is evaluated: None for a run not
  finished and evaluated on the test split.
  """
  config, workdir = runs[name]
  label, where = f"{name} seed {seed}", run_records.path(records, name, seed)
  record = run_records.read(where, config)
  if record is not None:
    print(f"[skip] {label}: recorded ({where})", flush=True)
    return record
  pretraining = config.model.stage == "pretrain"
  if report_only:
    scores = finished_scores(config, workdir)
    if scores is None or not (pretraining or os.path.exists(
        os.path.join(workdir, TEST_METRICS))):
      return None  # Still training, or not yet evaluated on the test split.
  else:
    for init, (init_config, init_dir) in runs.items():
      if init_dir == config.init_from and finished_scores(init_config, init_dir) is None:
        train_run(init_config, init_dir, f"{init} seed {seed}")
    scores = train_run(config, workdir, label)
  test = None if pretraining else evaluate_best(config, workdir, FLAGS.test_split)
  record = run_records.make(config, workdir, scores, test)
  run_records.write(where, record)
  return record


def describe(base: ml_collections.ConfigDict, num_seeds: int) -> str:
  m, d = base.model, base.dataset
  return (f"{m.name} f={m.num_features} emb={m.emb_channels} attn={m.attn_channels}, "
          f"{d.name}/{d.config} {m.img_res}x{m.img_res} T={m.max_seq_len}, batch "
          f"{base.batch_size}, lr {base.learning_rate}, N={base.num_train_steps}, BatchNorm "
          + (f"statistics of {base.precise_bn_batches} batches" if base.precise_bn_batches
             else "running statistics") + f"; {num_seeds} seeds")


def learning_curve(base: ml_collections.ConfigDict, seeds: list[int], outdir: str) -> None:
  """Supervised runs only; validation mIoU vs steps in learning_curve.png and .md."""
  curves = []
  for seed in seeds:
    config, workdir = seed_runs(base, seed, [], 0, FLAGS.select_split,
                                os.path.join(outdir, "learning_curve"))["supervised"]
    train_run(config, workdir, f"supervised seed {seed}")
    curves.append(report.read_scalars(workdir, "eval/miou"))
  setup = describe(base, len(seeds))
  report.curves_plot({"supervised": curves}, os.path.join(outdir, "learning_curve.png"),
                     f"validation mIoU ({FLAGS.select_split})", setup)
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  lines = [f"# Supervised learning curve\n\n{setup}.\n", "| step | " + " | ".join(
      f"seed {s}" for s in seeds) + " | mean |", "| --- |" + " --- |" * (len(seeds) + 1)]
  lines += [f"| {t} | " + " | ".join(f"{c[t]:.4f}" for c in curves) +
            f" | {sum(c[t] for c in curves) / len(curves):.4f} |" for t in steps]
  with open(os.path.join(outdir, "learning_curve.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  host_memory.retain_freed_memory()  # As cscl_jax.main does.
  tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds the input pipeline.
  base, outdir = FLAGS.config, FLAGS.outdir
  seeds = [int(s) for s in FLAGS.seeds]
  start = time.perf_counter()
  if FLAGS.learning_curve:
    learning_curve(base, seeds, outdir)
    return
  steps_m = pretrain_steps(base.num_train_steps,
                           [float(f) for f in FLAGS.pretrain_fractions])
  probe_steps = base.num_train_steps // 4 if FLAGS.probe_steps < 0 else FLAGS.probe_steps
  unknown = set(FLAGS.ablations) - set(ABLATIONS)
  if unknown:
    raise app.UsageError(f"--ablations {sorted(unknown)}: choose from {sorted(ABLATIONS)}.")
  ablation_m = 0
  if FLAGS.ablations:
    (ablation_m,) = pretrain_steps(base.num_train_steps, [FLAGS.ablation_fraction])
    if ablation_m not in steps_m:
      raise app.UsageError(f"--ablation_fraction={FLAGS.ablation_fraction} (M={ablation_m}) "
                           "is not one of --pretrain_fractions: its paper arm is the "
                           "ablations' baseline.")
  records = FLAGS.records or os.path.join(outdir, "records")
  probe_rates = [float(r) for r in FLAGS.probe_learning_rates]
  results, pretrain, losses, probe_validation = {}, {}, {}, {}
  for seed in seeds:
    runs = seed_runs(base, seed, steps_m, probe_steps, FLAGS.select_split, outdir,
                     FLAGS.ablations, ablation_m, probe_rates)
    for name in runs:
      report_only = FLAGS.report_only or not selected(name, FLAGS.only)
      record = record_of(runs, name, seed, records, report_only)
      if record is None:
        continue
      if name.startswith("pretrain"):
        pretrain.setdefault(name, {})[seed] = {**record["validation"],
                                               "wall_s": record["wall_s"]}
        continue
      results.setdefault(name, {})[seed] = {**record["test"], "wall_s": record["wall_s"]}
      if name.startswith("probe/"):
        probe_validation.setdefault(name, {})[seed] = record["validation"]["miou"]
      else:
        losses.setdefault(name, []).append(record["curves"]["train/loss"])
  results = best_probes(results, probe_validation)
  probes = (f"probe {probe_steps} steps, best of lr {probe_rates}; " if probe_steps
            else "no probe; ")
  setup = (describe(base, len(seeds)) + f"; M in {steps_m}, " + probes
           + (f"ablations {FLAGS.ablations} at M={ablation_m}; " if FLAGS.ablations else "")
           + f"best on '{FLAGS.select_split}', evaluated on '{FLAGS.test_split}'")
  command = " ".join(["python -m benchmarks.cscl_vs_supervised"] + sys.argv[1:])
  baselines = {a: b for a, b in baselines_of(list(results)).items() if b in results}
  title = "# CSCL vs supervised" + (" (progress: the runs finished so far)"
                                    if FLAGS.report_only or FLAGS.only else "")
  table = report.results_table(results, baselines, pretrain,
                               f"{title}\n\n{setup}.\n\n    {command}")
  os.makedirs(outdir, exist_ok=True)  # Nothing may have trained here.
  with open(os.path.join(outdir, "results.md"), "w") as f:
    f.write(table)
  plots = {"diff.png": lambda path: report.diff_plot(results, baselines, path, setup),
           "sweep.png": lambda path: report.sweep_plot(results, baselines, path, setup)}
  plotted = [name for name, plot in plots.items() if plot(os.path.join(outdir, name))]
  report.curves_plot(losses, os.path.join(outdir, "loss_curves.png"),
                     "training loss (fine-tuning / supervised)", setup)
  print(table, flush=True)
  print(f"Wrote {outdir}/results.md, " + "".join(f"{name}, " for name in plotted)
        + f"loss_curves.png ({time.perf_counter() - start:.0f} s; "
        f"{jax.device_count()} devices).", flush=True)


if __name__ == "__main__":
  app.run(main)
