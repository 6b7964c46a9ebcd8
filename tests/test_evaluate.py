"""`cscl_jax.evaluate` on a short supervised run of configs/test.py."""

import json
import os

import numpy as np
import pytest

from cscl_jax import checkpoints
from cscl_jax import evaluate
from cscl_jax import metrics
from cscl_jax import train
from configs import test as test_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A 4-step supervised run evaluated on the whole validation split at steps 2 and 4."""
  config = test_config.get_config()
  config.model.stage = "supervised"
  config.dataset.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.num_eval_batches = -1
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(config, workdir)
  return workdir


def test_latest_checkpoint_reproduces_the_final_validation_metrics(workdir):
  scores = evaluate.evaluate_checkpoint(workdir, "validation", "latest")
  with open(os.path.join(workdir, "metrics.json")) as f:
    expected = json.load(f)
  assert scores.keys() == expected.keys()
  assert scores == pytest.approx(expected, rel=1e-6)
  with open(os.path.join(workdir, "eval_validation_4.json")) as f:
    assert json.load(f) == scores
  assert os.path.getsize(os.path.join(workdir, "plots", "confusion_validation_4.png")) > 0


def test_best_checkpoint_on_test(workdir):
  stage = "supervised"
  step = checkpoints.find_step(workdir, "best", stage)
  assert step in (2, 4)
  scores = evaluate.evaluate_checkpoint(workdir, "test", "best")
  assert scores["step"] == step
  assert 0 <= scores["miou"] <= 1
  assert os.path.exists(os.path.join(workdir, f"eval_test_{step}.json"))
  assert checkpoints.find_step(workdir, "2", stage) == 2
  with pytest.raises(FileNotFoundError, match="No checkpoint '7'"):
    evaluate.evaluate_checkpoint(workdir, "test", "7")
  with pytest.raises(ValueError, match="has splits"):
    evaluate.evaluate_checkpoint(workdir, "tset", "best")


def test_class_table_against_hand_counts():
  confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 4]])
  table = evaluate.class_table(confusion, ["wheat", "maize", "rapeseed"]).splitlines()
  assert table[0].split() == ["class", "pixels", "precision", "recall", "iou", "f1"]
  # wheat: tp 3, 4 true, 5 predicted -> precision 0.6, recall 0.75, IoU 3/6, F1 6/9.
  assert table[1].split() == ["wheat", "4", "0.6000", "0.7500", "0.5000", "0.6667"]
  assert table[2].split() == ["maize", "0", "0.0000", "nan", "0.0000", "0.0000"]
  scores = metrics.per_class_scores(confusion)
  np.testing.assert_allclose(scores["iou"], [0.5, 0.0, 4 / 6])
