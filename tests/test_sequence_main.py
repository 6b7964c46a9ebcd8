"""End to end for BiConvGRU, TSViT and U-TAE: `python -m cscl_jax.main` pre-trains each with
CSCL on the tiny synthetic dataset, then fine-tunes from it (configs/test.py, minute widths)."""

import json
import os

import pytest

from test_main import ROOT, _main, _run_lines

TINY = {
    "biconvgru": ("--config.model.conv3d_dim=4", "--config.model.rnn_hidden_dim=4"),
    "tsvit": ("--config.model.dim=8", "--config.model.temporal_depth=1",
              "--config.model.spatial_depth=1", "--config.model.heads=2",
              "--config.model.dim_head=4", "--config.model.scale_dim=1"),
    # U-TAE with f = 4 (H, W divisible by 8), the original's classifier.
    "utae": ("--config.model.num_features=4", "--config.model.img_res=16"),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))  # built once, by the first run


@pytest.mark.parametrize("name", list(TINY))
def test_pretrain_then_finetune(name, data_dir, tmp_path):
  pretrain, finetune = str(tmp_path / "pre"), str(tmp_path / "ft")
  common = (f"--config.dataset.data_dir={data_dir}", f"--config.model.name={name}",
            "--config.num_train_steps=2", *TINY[name])
  log = _run_lines(_main(ROOT, f"--workdir={pretrain}", *common))
  assert "Eval at step 2: loss=" in log and "sim_same=" in log
  log = _run_lines(_main(ROOT, f"--workdir={finetune}", *common,
                         "--config.model.stage=finetune", f"--config.init_from={pretrain}"))
  assert "Loaded pre-trained encoder from " + os.path.join(pretrain, "checkpoints") in log
  with open(os.path.join(finetune, "metrics.json")) as f:
    scores = json.load(f)
  assert scores["step"] == 2 and 0 <= scores["miou"] <= 1
