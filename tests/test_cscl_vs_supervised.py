"""benchmarks/cscl_vs_supervised.py end to end on the tiny data, and its statistics."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import cscl_vs_supervised
from benchmarks import evidence_report
from benchmarks import run_records
from configs import test as test_config
from test_main import _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _t_cdf(t: float, df: int) -> float:
  """Student t CDF by the trapezoid rule on its density (slow, independent reference)."""
  x = np.linspace(-400.0, t, 4_000_001)
  c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
  pdf = c * (1 + x**2 / df) ** (-(df + 1) / 2)
  return float(np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x)))


@pytest.mark.parametrize("df", [2, 4, 9, 30])
def test_t_table_is_the_975_quantile(df):
  # df 1's heavy tail would need a far wider grid; the others are checked to 1e-5.
  assert _t_cdf(evidence_report.T_975[df], df) == pytest.approx(0.975, abs=1e-5)


def test_paired_ci_known_numbers():
  # mean 2, s = 1, n = 3: half-width t_{0.975,2} / sqrt(3) = 4.302653 / 1.7320508.
  mean, lo, hi = evidence_report.paired_ci([1.0, 2.0, 3.0])
  assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - 2.484138, 2.0 + 2.484138), abs=1e-6)
  # Six seeds: df 5; 45 seeds: df 44 uses the df-40 entry; 200: the normal quantile.
  d = np.arange(6.0)
  half = 2.570582 * d.std(ddof=1) / math.sqrt(6)
  assert evidence_report.paired_ci(d)[2] == pytest.approx(2.5 + half, abs=1e-9)
  assert evidence_report.t_quantile_975(44) == evidence_report.T_975[40]
  assert evidence_report.t_quantile_975(200) == evidence_report.Z_975
  with pytest.raises(ValueError, match="more --seeds"):
    evidence_report.paired_ci([0.3])


def _benchmark(outdir: str, data_dir: str, cache_dir: str, *extra: str) -> str:
  """Runs the benchmark on one CPU device in a subprocess; returns its output."""
  # A user's environment (one device, quick compiles); the compilation cache lets the
  # second seed and the later arms reuse the first programs. One eval and save, at the end.
  env = dict(_env(), JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.cscl_vs_supervised", f"--outdir={outdir}",
       "--seeds=0,1", "--pretrain_fractions=0.5", "--probe_steps=1",
       "--probe_learning_rates=1e-3,1e-2",
       "--config=configs/test.py", f"--config.dataset.data_dir={data_dir}",
       "--config.num_train_steps=2", "--config.eval_every_steps=100",
       "--config.checkpoint_every_steps=100", "--config.precise_bn_batches=1", *extra],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _read_json(*path: str) -> dict:
  with open(os.path.join(*path)) as f:
    return json.load(f)


def _rows(table: str, first_cell: str) -> list[list[str]]:
  """The cells of the Markdown rows of `table` whose first cell is `first_cell`."""
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
          if line.startswith("|")]
  return [r for r in rows if r[0] == first_cell]


def test_ablations_change_one_pretraining_setting_and_pair_with_the_paper_arm():
  base = test_config.get_config()
  base.num_train_steps = 8
  names = sorted(cscl_vs_supervised.ABLATIONS)
  runs = cscl_vs_supervised.seed_runs(base, 3, [2, 8], 2, "validation", "/out", names, 2,
                                      probe_rates=[1e-3, 1e-2])
  plain = {n: c for n, (c, _) in runs.items()}
  # The probes: each encoder once per rate, frozen, 2 steps, only the rate differs.
  probes = {n: c for n, c in plain.items() if n.startswith("probe/")}
  assert sorted(probes) == ["probe/cscl_m8/lr0.001", "probe/cscl_m8/lr0.01",
                            "probe/random/lr0.001", "probe/random/lr0.01"]
  assert runs["probe/cscl_m8/lr0.01"][0].init_from == runs["pretrain/m8"][1]
  assert runs["probe/random/lr0.01"][1] == "/out/probe/random/lr0.01/seed_3"
  assert "matched/m2" in runs and "matched/m8" not in runs  # M = N leaves no fine-tuning.
  for name, config in probes.items():
    assert config.freeze_encoder and config.num_train_steps == 2
    assert config.learning_rate == float(name.rsplit("/lr", 1)[1])
  flat = lambda c: {f"{s}.{k}": v for s in ("model", "cscl") for k, v in c[s].items()}
  for name, (field, value) in cscl_vs_supervised.ABLATIONS.items():
    pre, pre_dir = runs[f"pretrain_{name}/m2"]
    paper, _ = runs[f"paper_{name}/m2"]
    assert pre_dir == f"/out/pretrain_{name}/m2/seed_3" and paper.init_from == pre_dir
    for changed, reference in ((pre, plain["pretrain/m2"]), (paper, plain["paper/m2"])):
      differ = {k for k, v in flat(changed).items() if flat(reference)[k] != v}
      assert differ == {field} and flat(changed)[field] == value
    assert (paper.seed, paper.num_train_steps, pre.num_train_steps) == (3, 8, 2)
  merged = sorted({n.rsplit("/lr", 1)[0] for n in runs})  # the probes after best_probes
  baselines = cscl_vs_supervised.baselines_of(merged)
  assert baselines["paper_mask/m2"] == "paper/m2"
  assert baselines["paper/m2"] == baselines["matched/m2"] == "supervised"
  assert baselines["probe/cscl_m8"] == "probe/random"


def test_only_selects_runs_by_name_pattern():
  selected = cscl_vs_supervised.selected
  assert selected("paper/m375", []) and selected("probe/random/lr0.01", ["probe/random/*"])
  assert not selected("probe/cscl_m3000/lr0.01", ["paper/*", "probe/random/*"])
  assert not selected("paper/m3750", ["paper/m375"])


def test_each_probe_takes_its_best_validation_rate_per_seed():
  test = lambda miou, wall=10.0: {"miou": miou, "step": 5, "wall_s": wall}
  results = {"supervised": {0: test(0.8)},
             "probe/random/lr0.001": {0: test(0.1), 1: test(0.2, None)},
             "probe/random/lr0.01": {0: test(0.3), 1: test(0.4)},
             "probe/cscl_m8/lr0.001": {0: test(0.5), 1: test(0.6)},
             "probe/cscl_m8/lr0.01": {0: test(0.7)}}  # seed 1 unfinished
  validation = {"probe/random/lr0.001": {0: 0.9, 1: 0.1}, "probe/random/lr0.01": {0: 0.2, 1: 0.3},
                "probe/cscl_m8/lr0.001": {0: 0.5, 1: 0.9}, "probe/cscl_m8/lr0.01": {0: 0.4}}
  merged = cscl_vs_supervised.best_probes(results, validation)
  assert sorted(merged) == ["probe/cscl_m8", "probe/random", "supervised"]
  assert merged["supervised"] == results["supervised"]
  # By validation, not by test: seed 0 of the random probe takes lr 1e-3 (test 0.1).
  assert merged["probe/random"] == {
      0: {"miou": 0.1, "step": 5, "wall_s": 20.0, "learning_rate": 1e-3},
      1: {"miou": 0.4, "step": 5, "wall_s": None, "learning_rate": 1e-2}}
  assert merged["probe/cscl_m8"] == {
      0: {"miou": 0.5, "step": 5, "wall_s": 20.0, "learning_rate": 1e-3}}


def test_all_arms_paired_intervals_records_and_resuming(tmp_path):
  dirs = [str(tmp_path / d) for d in ("out", "tfds", "jax_cache")]
  outdir, records = dirs[0], str(tmp_path / "records")
  log = _benchmark(*dirs, f"--records={records}")
  # Per seed: supervised, pretrain m1, paper m1, matched m1, two probes at two rates each.
  assert log.count("[run]") == 16 and "[skip]" not in log
  with open(os.path.join(outdir, "results.md")) as f:
    table = f.read()
  for name in ("results.md", "diff.png", "loss_curves.png"):
    assert os.path.getsize(os.path.join(outdir, name)) > 1000

  def test_metrics(arm, seed):
    if arm.startswith("probe/"):  # The rate with the best validation mIoU.
      arm = max((f"{arm}/lr{r}" for r in ("0.001", "0.01")), key=lambda a: _read_json(
          records, a, f"seed_{seed}.json")["validation"]["miou"])
    return _read_json(outdir, arm, f"seed_{seed}", "test_metrics.json")

  for arm, base in (("paper/m1", "supervised"), ("matched/m1", "supervised"),
                    ("probe/cscl_m1", "probe/random")):
    (row,) = _rows(table, f"{arm} - {base}")
    assert row[1] == "2"
    for cell, key in zip(row[2:], ("miou", "oa", "boundary/miou", "interior/miou")):
      d = np.array([test_metrics(arm, s)[key] - test_metrics(base, s)[key] for s in (0, 1)])
      half = 12.706205 * d.std(ddof=1) / np.sqrt(2)  # t_{0.975, 1}
      expected = f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]"
      assert cell == expected, (arm, key)
  for seed in (0, 1):
    scores = test_metrics("paper/m1", seed)
    assert scores["split"] == "test" and scores["step"] == 2 and 0 <= scores["miou"] <= 1
  # One record per run, with what the report needs.
  paths = sorted(os.path.relpath(os.path.join(d, f), records)
                 for d, _, files in os.walk(records) for f in files)
  assert len(paths) == 16 and "paper/m1/seed_1.json" in paths
  assert "probe/cscl_m1/lr0.01/seed_1.json" in paths
  with open(os.path.join(records, "paper", "m1", "seed_1.json")) as f:
    record = json.load(f)
  assert record["test"] == test_metrics("paper/m1", 1)
  assert record["config"]["num_train_steps"] == 2 and record["config"]["seed"] == 1
  assert "2" in record["curves"]["train/loss"] and record["wall_s"] > 0
  per_seed = [r for r in _rows(table, "paper/m1") if len(r) == 9]  # + best step, train s.
  assert [r[1] for r in per_seed] == ["0", "1"] and all(r[-1].isdigit() for r in per_seed)
  for seed in (0, 1):  # A probe's row names the rate it chose.
    best = max(("0.001", "0.01"), key=lambda r: _read_json(
        records, f"probe/random/lr{r}", f"seed_{seed}.json")["validation"]["miou"])
    assert [r[1] for r in _rows(table, f"probe/random (lr {best})")].count(str(seed)) == 1
  assert "over 12 of 12 runs" in table  # 10 tested, 2 pre-training.

  log = _benchmark(*dirs, f"--records={records}")
  assert log.count("[skip]") == 16 and "[run]" not in log
  with open(os.path.join(outdir, "results.md")) as f:
    assert f.read() == table

  # A progress report while seed 1's paper/m1 is unfinished: nothing trains, that pair
  # keeps seed 0's difference without an interval, the others are unchanged.
  os.remove(os.path.join(records, "paper", "m1", "seed_1.json"))
  os.remove(os.path.join(outdir, "paper", "m1", "seed_1", "metrics.json"))
  log = _benchmark(*dirs, f"--records={records}", "--report_only")
  assert "[run]" not in log and log.count("[skip]") == 15
  with open(os.path.join(outdir, "results.md")) as f:
    progress = f.read()
  assert progress.startswith("# CSCL vs supervised (progress")
  (row,) = _rows(progress, "paper/m1 - supervised")
  d = test_metrics("paper/m1", 0)["miou"] - test_metrics("supervised", 0)["miou"]
  assert row[1:3] == ["1", f"{d:+.4f} (1 seed, no CI)"]
  assert _rows(progress, "matched/m1 - supervised") == _rows(table, "matched/m1 - supervised")

  # The workdirs lost with their machine: the records answer for the finished runs, and
  # the unfinished one retrains the pre-training it starts from, then itself, to the same
  # numbers (same seed, same data order, deterministic on CPU).
  # --only trains just the runs it names: here none of the unfinished one's, then it.
  shutil.rmtree(outdir)
  log = _benchmark(*dirs, f"--records={records}", "--only=supervised,probe/*")
  assert "[run]" not in log and log.count("[skip]") == 15
  log = _benchmark(*dirs, f"--records={records}", "--only=paper/*")
  assert log.count("[skip]") == 15 and log.count("[run]") == 2
  assert "[run]  pretrain/m1 seed 1" in log and "[run]  paper/m1 seed 1" in log
  with open(os.path.join(records, "paper", "m1", "seed_1.json")) as f:
    assert json.load(f)["test"] == record["test"]
  with open(os.path.join(outdir, "results.md")) as f:
    again = f.read()
  # Between the command and the per-seed rows, which hold the new run's wall time.
  means = lambda t: t[t.index("Mean over"):t.index("Per seed")]
  assert means(again) == means(table)


def test_a_record_answers_only_for_its_config(tmp_path):
  config = test_config.get_config()
  config.init_from = "/old/machine/pretrain/m2/seed_0"
  workdir = str(tmp_path / "run")  # No events: empty curves.
  path = run_records.path(str(tmp_path / "records"), "paper/m2", 0)
  run_records.write(path, run_records.make(config, workdir, {"miou": 0.5}, {"miou": 0.4}))
  assert run_records.read(str(tmp_path / "none.json"), config) is None
  moved = config.copy_and_resolve_references()
  moved.init_from, moved.dataset.data_dir = "/new/pretrain/m2/seed_0", "/new/tfds"
  record = run_records.read(path, moved)  # Locations may change.
  assert record["test"] == {"miou": 0.4} and record["curves"]["train/loss"] == {}
  other = config.copy_and_resolve_references()
  other.cscl.pos_weight = 1.0
  with pytest.raises(ValueError, match=r"cscl.pos_weight: 0.125 there, 1.0 here"):
    run_records.read(path, other)


def test_diff_plot_needs_two_seeds_of_a_pair(tmp_path):
  scores = {"boundary/miou": 0.5, "interior/miou": 0.7}
  results = {"supervised": {0: scores, 1: scores}, "paper/m1": {1: scores}}
  path = str(tmp_path / "diff.png")
  assert not evidence_report.diff_plot(results, {"paper/m1": "supervised"}, path, "t")
  assert not os.path.exists(path)
  results["paper/m1"][0] = {"boundary/miou": 0.6, "interior/miou": 0.7}
  assert evidence_report.diff_plot(results, {"paper/m1": "supervised"}, path, "t")
  assert os.path.getsize(path) > 1000


def test_training_seconds_sum_the_invocations(tmp_path):
  # Two invocations (one event file each): 100 -> 400 s, then resumed 1000 -> 1050 s.
  for name, times in (("events.out.tfevents.1.host.0.v2", (100.0, 160.0, 400.0)),
                      ("events.out.tfevents.2.host.0.v2", (1000.0, 1050.0))):
    with tf.io.TFRecordWriter(str(tmp_path / name)) as writer:
      for step, wall_time in enumerate(times):
        writer.write(tf.compat.v1.Event(wall_time=wall_time, step=step).SerializeToString())
  assert evidence_report.training_seconds(str(tmp_path)) == 350.0
  assert evidence_report.training_seconds(str(tmp_path / "absent")) is None


def test_sweep_points_pair_each_m_with_supervised(tmp_path):
  def runs(values):
    return {seed: {"miou": v} for seed, v in enumerate(values) if v is not None}
  results = {"supervised": runs([0.5, 0.6, 0.7]), "paper/m4": runs([0.6, 0.6, 0.9]),
             "paper/m2": runs([0.4, None, None]), "matched/m2": runs([0.5, 0.7]),
             "paper_mask/m2": runs([0.9, 0.9, 0.9])}
  baselines = cscl_vs_supervised.baselines_of(list(results))
  points = evidence_report.sweep_points(results, baselines, "paper")
  assert [(m, n) for m, *_, n in points] == [(2, 1), (4, 3)]  # paper_mask is another arm.
  assert points[0][1:4] == pytest.approx((-0.1, -0.1, -0.1))  # One seed: no interval.
  mean, lo, hi = evidence_report.paired_ci([0.1, 0.0, 0.2])
  assert points[1][1:4] == pytest.approx((mean, lo, hi))
  assert evidence_report.sweep_points(results, baselines, "matched")[0][1] == pytest.approx(
      0.05)
  path = str(tmp_path / "sweep.png")
  assert evidence_report.sweep_plot(results, baselines, path, "t")  # paper has two M.
  assert os.path.getsize(path) > 1000
  del results["paper/m2"], baselines["paper/m2"]
  assert not evidence_report.sweep_plot(results, baselines, str(tmp_path / "none.png"), "t")
  assert not os.path.exists(tmp_path / "none.png")
