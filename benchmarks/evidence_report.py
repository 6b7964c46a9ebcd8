"""Statistics, tables and plots of benchmarks/cscl_vs_supervised.py (no training here).

  paired_ci(differences)      mean and 95 % t confidence interval of paired differences;
  read_scalars(workdir, tag)  a run's TensorBoard scalars (clu writes them as tensors);
  results_table / diff_plot / sweep_plot / curves_plot  the Markdown and PNGs of the
      benchmark.

The t quantiles come from a table (scipy is not a dependency): t_{0.975, df} for df 1..30,
then 40, 60, 120; between tabulated degrees of freedom the next lower one is used (a slightly
wider, conservative interval), above 120 the normal 1.96.
"""

import glob
import os
import re
import textwrap

import matplotlib
matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf

# (metrics.json key, column title); the first four are the protocol's metrics.
METRICS = (("miou", "mIoU"), ("oa", "OA"), ("boundary/miou", "boundary mIoU"),
           ("interior/miou", "interior mIoU"), ("boundary/oa", "boundary OA"))
# Two-sided 95 % Student t quantiles t_{0.975, df}.
T_975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 6: 2.446912,
         7: 2.364624, 8: 2.306004, 9: 2.262157, 10: 2.228139, 11: 2.200985, 12: 2.178813,
         13: 2.160369, 14: 2.144787, 15: 2.131450, 16: 2.119905, 17: 2.109816,
         18: 2.100922, 19: 2.093024, 20: 2.085963, 21: 2.079614, 22: 2.073873,
         23: 2.068658, 24: 2.063899, 25: 2.059539, 26: 2.055529, 27: 2.051831,
         28: 2.048407, 29: 2.045230, 30: 2.042272, 40: 2.021075, 60: 2.000298,
         120: 1.979930}
Z_975 = 1.959964


def t_quantile_975(df: int) -> float:
  """t_{0.975, df} from T_975 (the next lower tabulated df; 1.96 above 120)."""
  if df < 1:
    raise ValueError(f"A t interval needs df >= 1 (two or more seeds), got df={df}.")
  return Z_975 if df > 120 else T_975[max(k for k in T_975 if k <= df)]


def paired_ci(differences: list[float] | np.ndarray) -> tuple[float, float, float]:
  """(mean, low, high): mean of paired differences and its 95 % t confidence interval.

  mean ± t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation (ddof=1).

  Raises:
    ValueError: for fewer than two differences (no spread to estimate).
  """
  d = np.asarray(differences, np.float64)
  if d.ndim != 1 or len(d) < 2:
    raise ValueError(f"paired_ci needs a 1-D list of >= 2 differences (seeds), got shape "
                     f"{d.shape}: run more --seeds.")
  mean = float(d.mean())
  half = t_quantile_975(len(d) - 1) * float(d.std(ddof=1)) / np.sqrt(len(d))
  return mean, mean - half, mean + half


def read_scalars(workdir: str, tag: str) -> dict[int, float]:
  """{step: value} of scalar `tag` in the TensorBoard event files of `workdir`.

  A resumed run's repeated steps keep the value written last.
  """
  values = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor) if value.HasField(
              "tensor") else value.simple_value)
  return values


def training_seconds(workdir: str) -> float | None:
  """Seconds a run trained, from its TensorBoard events: the span of each event file's
  write times (one file per invocation of the training program), summed over the
  invocations that trained it, resumed ones included. None without events."""
  spans = []
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    times = [tf.compat.v1.Event.FromString(record.numpy()).wall_time
             for record in tf.data.TFRecordDataset(path)]
    spans.append(max(times) - min(times) if times else 0.0)
  return sum(spans) if spans else None


def paired_differences(results: dict[str, dict[int, dict[str, float]]], arm: str,
                       base: str, key: str) -> list[float]:
  """`arm` - `base` in metric `key`, one per seed both have, by increasing seed."""
  seeds = sorted(set(results[arm]) & set(results[base]))
  return [results[arm][s][key] - results[base][s][key] for s in seeds]


def _difference(differences: list[float]) -> str:
  """"+m [lo, hi]" (mean and 95 % CI); "+m (1 seed, no CI)" for a single seed."""
  if len(differences) == 1:
    return f"{differences[0]:+.4f} (1 seed, no CI)"
  mean, lo, hi = paired_ci(differences)
  return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _seconds(scores: dict) -> str:
  wall = scores.get("wall_s")
  return "-" if wall is None else f"{wall:.0f}"


def results_table(results: dict[str, dict[int, dict[str, float]]],
                  baselines: dict[str, str], pretrain: dict[str, dict[int, dict]],
                  header: str) -> str:
  """Markdown: per-arm means, paired differences with 95 % CIs, per-seed rows.

  Args:
    results: arm -> seed -> test metrics of its best-validation checkpoint, and optionally
      "wall_s", the seconds the run trained (`training_seconds`; None: unknown), shown
      per seed and summed, and "learning_rate", a rate chosen per seed (the probes),
      shown beside the arm in its per-seed row.
    baselines: arm -> the arm it is paired with (CSCL arm -> "supervised", ...); a pair
      with a single common seed gets its difference without an interval, one with none
      no row.
    pretrain: pre-training name -> seed -> its last validation metrics (and "wall_s").
    header: text put first.
  """
  titles = [t for _, t in METRICS]
  row = lambda cells: "| " + " | ".join(cells) + " |"
  lines = [header, "", "Mean over seeds (test split, best-validation checkpoint):", "",
           row(["arm", "seeds"] + titles), row(["---"] * (2 + len(METRICS)))]
  for arm, by_seed in results.items():
    lines.append(row([arm, str(len(by_seed))] + [
        f"{np.mean([s[k] for s in by_seed.values()]):.4f}" for k, _ in METRICS]))
  lines += ["", "Paired differences, mean [95 % CI] over seeds (t distribution, n-1 df):", "",
            row(["difference", "seeds"] + titles), row(["---"] * (2 + len(METRICS)))]
  for arm, base in baselines.items():
    differences = [paired_differences(results, arm, base, k) for k, _ in METRICS]
    if differences[0]:
      lines.append(row([f"{arm} - {base}", str(len(differences[0]))]
                       + [_difference(d) for d in differences]))
  lines += ["", "Per seed (train s: wall seconds of training, - where not recorded):", "",
            row(["arm", "seed", "best step"] + titles + ["train s"]),
            row(["---"] * (4 + len(METRICS)))]
  for arm, by_seed in results.items():
    for seed, s in sorted(by_seed.items()):
      name = f"{arm} (lr {s['learning_rate']:g})" if "learning_rate" in s else arm
      lines.append(row([name, str(seed), str(s["step"])] + [f"{s[k]:.4f}" for k, _ in METRICS]
                       + [_seconds(s)]))
  lines += ["", "CSCL pre-training at its last step, validation split (mean cosine similarity "
            "of same- and different-class pairs in the window):", "",
            row(["pre-training", "seed", "loss", "sim_same", "sim_diff", "train s"]),
            row(["---"] * 6)]
  for name, by_seed in pretrain.items():
    for seed, p in sorted(by_seed.items()):
      lines.append(row([name, str(seed)] + [f"{p[k]:.4f}" for k in ("loss", "sim_same",
                                                                   "sim_diff")] + [_seconds(p)]))
  walls = [s.get("wall_s") for group in (results, pretrain) for by_seed in group.values()
           for s in by_seed.values()]
  known = [w for w in walls if w is not None]
  lines += ["", f"Training wall time of these runs: {sum(known) / 3600:.2f} h over "
            f"{len(known)} of {len(walls)} runs (the others have no events to time them by)."]
  return "\n".join(lines) + "\n"


def _save(fig, ax, path: str, title: str, legend_fontsize: int) -> None:
  """Titles (wrapped), adds the legend, writes `path` and closes the figure."""
  ax.set_title(textwrap.fill(title, 100), fontsize=7)
  ax.legend(fontsize=legend_fontsize)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def diff_plot(results: dict[str, dict[int, dict[str, float]]], baselines: dict[str, str],
              path: str, title: str) -> bool:
  """Bars of the paired boundary / interior mIoU differences with their 95 % CIs.

  Pairs with fewer than two common seeds (no interval) are left out; without any pair
  left, no file is written.

  Returns:
    Whether the plot was written.
  """
  keys = (("boundary/miou", "boundary mIoU"), ("interior/miou", "interior mIoU"))
  names = [a for a, b in baselines.items() if len(set(results[a]) & set(results[b])) > 1]
  if not names:
    return False
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 3.8), dpi=100)
  x = np.arange(len(names))
  for i, (key, label) in enumerate(keys):
    stats = []
    for arm in names:
      stats.append(paired_ci(paired_differences(results, arm, baselines[arm], key)))
    mean, lo, hi = np.array(stats).T
    ax.bar(x + (i - 0.5) * 0.38, mean, 0.36, yerr=[mean - lo, hi - mean], capsize=3,
           label=label)
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xticks(x, [f"{a}\n- {baselines[a]}" for a in names], fontsize=6)
  ax.set_ylabel("paired difference (95 % CI)")
  _save(fig, ax, path, title, legend_fontsize=8)
  return True


def sweep_points(results: dict[str, dict[int, dict[str, float]]], baselines: dict[str, str],
                 arm: str, key: str = "miou") -> list[tuple[int, float, float, float, int]]:
  """(M, mean, low, high, seeds) of `<arm>/m<M>` - its baseline in `key`, by increasing M.

  Paired over the seeds both runs have; with one seed, low = high = mean (no interval).
  """
  points = []
  for name, base in baselines.items():
    match = re.fullmatch(rf"{re.escape(arm)}/m(\d+)", name)
    diffs = paired_differences(results, name, base, key) if match else []
    if diffs:
      mean, lo, hi = paired_ci(diffs) if len(diffs) > 1 else (diffs[0],) * 3
      points.append((int(match.group(1)), mean, lo, hi, len(diffs)))
  return sorted(points)


def sweep_plot(results: dict[str, dict[int, dict[str, float]]], baselines: dict[str, str],
               path: str, title: str) -> bool:
  """Paired mIoU difference with the baseline (supervised) against pre-training steps M.

  One line per arm (paper, matched) over its M; error bars are 95 % CIs, hollow markers
  single seeds (no interval). Written only where some arm has two or more M.

  Returns:
    Whether the plot was written.
  """
  arms = {arm: sweep_points(results, baselines, arm) for arm in ("paper", "matched")}
  arms = {arm: points for arm, points in arms.items() if len(points) > 1}
  if not arms:
    return False
  fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
  for i, (arm, points) in enumerate(arms.items()):
    m, mean, lo, hi, n = (np.array(v) for v in zip(*points))
    m = m * 1.04**i  # Side by side at one M.
    color = f"C{i}"
    ax.errorbar(m, mean, yerr=[mean - lo, hi - mean], color=color, capsize=3, lw=1.2,
                label=f"{arm} - supervised")
    ax.scatter(m[n == 1], mean[n == 1], facecolors="white", edgecolors=color, zorder=3)
    for x, y, k in zip(m, mean, n):
      ax.annotate(f"{k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6,
                  color=color)
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xscale("log", base=2)
  ticks = sorted({p[0] for points in arms.values() for p in points})
  ax.set_xticks(ticks, [str(t) for t in ticks])
  ax.set_xlabel("pre-training steps M (numbers: seeds)")
  ax.set_ylabel("paired mIoU difference (95 % CI)")
  _save(fig, ax, path, title, legend_fontsize=8)
  return True


def curves_plot(curves: dict[str, list[dict[int, float]]], path: str, ylabel: str,
                title: str) -> None:
  """One line per name: the mean over its runs (seeds) of {step: value}; thin per-run lines."""
  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  for i, (name, runs) in enumerate(curves.items()):
    steps = sorted(set.intersection(*(set(r) for r in runs)))
    color = f"C{i % 10}"
    for r in runs:
      ax.plot(sorted(r), [r[s] for s in sorted(r)], color=color, lw=0.5, alpha=0.4)
    ax.plot(steps, [np.mean([r[s] for r in runs]) for s in steps], color=color, lw=1.8,
            label=f"{name} (mean of {len(runs)})")
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  _save(fig, ax, path, title, legend_fontsize=7)
