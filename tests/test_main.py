"""End to end: `python -m cscl_jax.main` pre-trains, then fine-tunes from it (configs/test.py)."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*flags: str) -> str:
  """Runs the entry point in a subprocess from the project root; returns its log."""
  result = subprocess.run([sys.executable, "-m", "cscl_jax.main", "--config=configs/test.py",
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stderr + result.stdout


def _files(workdir: str, pattern: str) -> list[str]:
  return glob.glob(os.path.join(workdir, "**", pattern), recursive=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """One TFDS directory for the module: the tiny dataset is built once."""
  return str(tmp_path_factory.mktemp("tfds"))


def test_pretrain_then_finetune(tmp_path, data_dir):
  pretrain, finetune = (str(tmp_path / d) for d in ("pre", "ft"))
  log = _main(f"--workdir={pretrain}", f"--config.dataset.data_dir={data_dir}")
  assert "Eval at step 4" in log
  log = _main(f"--workdir={finetune}", f"--config.dataset.data_dir={data_dir}",
              "--config.model.stage=finetune", f"--config.init_from={pretrain}")
  assert "Loaded pre-trained encoder from " + os.path.join(pretrain, "checkpoints") in log
  for workdir in (pretrain, finetune):
    assert _files(workdir, "events.out.tfevents*")
    assert _files(workdir, "eval_0000004.png")
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
    assert os.path.exists(os.path.join(workdir, "config.json"))
  with open(os.path.join(pretrain, "metrics.json")) as f:
    assert {"step", "loss", "sim_same", "sim_diff"} <= set(json.load(f))
  with open(os.path.join(finetune, "metrics.json")) as f:
    scores = json.load(f)
  assert scores["step"] == 4
  assert 0 <= scores["miou"] <= 1 and 0 <= scores["boundary/miou"] <= 1


def test_utae_pretrains_with_cscl_then_finetunes(tmp_path, data_dir):
  # A narrow U-TAE (f = 4; H, W divisible by 8), with the classifier of the original.
  pretrain, finetune = str(tmp_path / "pre"), str(tmp_path / "ft")
  utae = ("--config.model.name=utae", "--config.model.num_features=4",
          "--config.model.img_res=16", f"--config.dataset.data_dir={data_dir}")
  assert "Eval at step 4" in _main(f"--workdir={pretrain}", *utae)
  log = _main(f"--workdir={finetune}", *utae, "--config.model.stage=finetune",
              f"--config.init_from={pretrain}")
  assert "Loaded pre-trained encoder" in log
  with open(os.path.join(finetune, "metrics.json")) as f:
    scores = json.load(f)
  assert scores["step"] == 4 and 0 <= scores["miou"] <= 1
