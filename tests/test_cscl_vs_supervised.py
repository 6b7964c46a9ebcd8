"""benchmarks/cscl_vs_supervised.py end to end on the tiny data: table, plot and resuming."""

import os
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_COLUMNS = 5  # mIoU, OA, boundary mIoU, interior mIoU, boundary OA


def _benchmark(outdir: str, data_dir: str, cache_dir: str) -> str:
  """Runs the benchmark on one CPU device in a subprocess; returns its output."""
  # One device compiles quicker than conftest's 8; the compilation cache lets the second
  # seed and the fine-tuning reuse the first seed's programs.
  env = dict(os.environ, XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.cscl_vs_supervised", f"--outdir={outdir}",
       "--seeds=0,1", "--config=configs/test.py", f"--config.dataset.data_dir={data_dir}",
       "--config.num_train_steps=4"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _rows(table: str, first_cell: str) -> list[list[str]]:
  """The cells of the Markdown rows of `table` whose first cell is `first_cell`."""
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
          if line.startswith("|")]
  return [r for r in rows if r[0] == first_cell]


def test_table_plot_and_skipping_finished_runs(tmp_path):
  dirs = [str(tmp_path / d) for d in ("out", "tfds", "jax_cache")]
  outdir = dirs[0]
  log = _benchmark(*dirs)
  assert log.count("[run]") == 6 and "[skip]" not in log  # 2 seeds x 3 stages
  with open(os.path.join(outdir, "results.md")) as f:
    table = f.read()
  number = re.compile(r"^[+-]?\d+\.\d{4}$")
  for arm in ("supervised", "cscl"):
    (summary,), per_seed = _rows(table, arm)[:1], _rows(table, arm)[1:]
    assert len(summary) == 1 + METRIC_COLUMNS
    for cell in summary[1:]:
      mean, std = cell.split(" ± ")
      assert 0 <= float(mean) <= 1 and float(std) >= 0
    assert [r[1] for r in per_seed] == ["0", "1"]
    values = [float(c) for r in per_seed for c in r[2:] if number.match(c)]
    assert len(values) == 2 * METRIC_COLUMNS and all(0 <= v <= 1 for v in values)
    # The summary is the mean of the per-seed rows.
    means = np.mean([[float(c) for c in r[2:]] for r in per_seed], axis=0)
    np.testing.assert_allclose([float(c.split(" ± ")[0]) for c in summary[1:]], means,
                               atol=1e-4)
  assert len(_rows(table, "cscl - supervised (paired)")) == 1
  assert os.path.getsize(os.path.join(outdir, "results.png")) > 1000
  for arm_dir in ("supervised/seed_0", "cscl/seed_1/pretrain", "cscl/seed_1/finetune"):
    assert os.path.exists(os.path.join(outdir, arm_dir, "metrics.json"))

  log = _benchmark(*dirs)
  assert log.count("[skip]") == 6 and "[run]" not in log
  with open(os.path.join(outdir, "results.md")) as f:
    assert f.read() == table
