"""End to end: `python -m cscl_jax.main` pre-trains, then fine-tunes from it (configs/test.py),
on the synthetic data and on fake PASTIS and MTLCC folders."""

import glob
import json
import os
import subprocess
import sys

import pytest

from tfds_builders.mtlcc import fake_data as mtlcc_fake_data
from tfds_builders.pastis import fake_data as pastis_fake_data

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


@pytest.mark.parametrize("name, builder_config, flags", [
    ("pastis", "fold1_24x24", ("--config.model.num_channels=11", "--config.model.num_classes=19")),
    ("mtlcc", "all", ("--config.model.num_classes=17",))])
def test_benchmark_datasets_pretrain_then_finetune(tmp_path, name, builder_config, flags):
  """Two steps of each stage on the fake PASTIS (10 bands) and MTLCC folders."""
  if name == "pastis":
    manual_dir = pastis_fake_data.write(tmp_path / "PASTIS", patches_per_fold=2, size=48)
  else:
    manual_dir = mtlcc_fake_data.write(tmp_path / "MTLCC", num_tiles=(4, 4, 1))
  common = (f"--config.dataset.data_dir={tmp_path / 'tfds'}", f"--config.dataset.name={name}",
            f"--config.dataset.config={builder_config}",
            f"--config.dataset.manual_dir={manual_dir}", "--config.model.img_res=24",
            "--config.num_train_steps=2", "--config.num_eval_batches=1", *flags)
  pretrain, finetune = str(tmp_path / "pre"), str(tmp_path / "ft")
  assert "Eval at step 2" in _main(f"--workdir={pretrain}", *common)
  log = _main(f"--workdir={finetune}", *common, "--config.model.stage=finetune",
              f"--config.init_from={pretrain}")
  assert "Loaded pre-trained encoder" in log and "Eval at step 2: loss=" in log
  with open(os.path.join(finetune, "metrics.json")) as f:
    assert 0 <= json.load(f)["miou"] <= 1
