"""Checkpoint retention, restore, encoder loading and the workdir config check."""

import json
import os

from etils.epath import testing as epath_testing
import jax
import numpy as np
import pytest

from cscl_jax import checkpoints
from configs import test as test_config


def _state(value: float):
  return {"step": 0,
          "params": {"encoder": {"conv": {"kernel": np.full((3, 4), value, np.float32)}},
                     "head": {"dense": {"kernel": np.full((4, 2), value, np.float32)}}},
          "batch_stats": {"encoder": {"bn": {"mean": np.full((4,), value, np.float32)}}}}


def test_keeps_latest_and_best(tmp_path):
  manager = checkpoints.create_manager(str(tmp_path), keep=2, best_metric="miou",
                                       best_mode="max")
  for step, miou in [(1, 0.5), (2, 0.9), (3, 0.1), (4, None), (5, 0.2), (6, None)]:
    checkpoints.save(manager, step, _state(step), None if miou is None else {"miou": miou})
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 5, 6]  # best (2) + latest two
  assert manager.best_step() == 2
  assert sorted(os.listdir(tmp_path / checkpoints.CHECKPOINT_DIR)) == ["2", "5", "6"]


def test_keeps_lowest_loss_when_smaller_is_better(tmp_path):
  manager = checkpoints.create_manager(str(tmp_path), keep=1, best_metric="loss",
                                       best_mode="min")
  for step, loss in [(1, 0.3), (2, 0.1), (3, 0.2), (4, 0.4)]:
    checkpoints.save(manager, step, _state(step), {"loss": loss})
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 4]


def test_restore_latest(tmp_path):
  manager = checkpoints.create_manager(str(tmp_path), keep=2, best_metric="miou",
                                       best_mode="max")
  assert checkpoints.restore_latest(manager, _state(0)) is None
  checkpoints.save(manager, 3, _state(3))
  checkpoints.save(manager, 7, _state(7))
  manager.wait_until_finished()
  restored = checkpoints.restore_latest(manager, _state(0))
  np.testing.assert_array_equal(restored["params"]["head"]["dense"]["kernel"],
                                _state(7)["params"]["head"]["dense"]["kernel"])


@pytest.mark.parametrize("where", ["workdir", "checkpoints", "step"])
def test_load_encoder_replaces_only_the_encoder(tmp_path, where):
  manager = checkpoints.create_manager(str(tmp_path), keep=2, best_metric="miou",
                                       best_mode="max")
  checkpoints.save(manager, 5, _state(5))
  checkpoints.save(manager, 9, _state(9))
  manager.wait_until_finished()
  path = {"workdir": tmp_path, "checkpoints": tmp_path / "checkpoints",
          "step": tmp_path / "checkpoints" / "5"}[where]
  new = _state(0)
  new["params"]["head"] = {"classifier": {"kernel": np.zeros((4, 7), np.float32)}}
  params, batch_stats = checkpoints.load_encoder(str(path), new["params"],
                                                 new["batch_stats"])
  expected = 5 if where == "step" else 9
  np.testing.assert_array_equal(params["encoder"]["conv"]["kernel"], expected)
  np.testing.assert_array_equal(batch_stats["encoder"]["bn"]["mean"], expected)
  assert params["head"] is new["params"]["head"]


def test_load_encoder_names_mismatching_leaves(tmp_path):
  manager = checkpoints.create_manager(str(tmp_path), keep=2, best_metric="miou",
                                       best_mode="max")
  checkpoints.save(manager, 1, _state(1))
  manager.wait_until_finished()
  new = _state(0)
  new["params"]["encoder"]["conv"]["kernel"] = np.zeros((3, 8), np.float32)
  new["params"]["encoder"]["extra"] = {"bias": np.zeros(2, np.float32)}
  with pytest.raises(ValueError) as error:
    checkpoints.load_encoder(str(tmp_path), new["params"], new["batch_stats"])
  message = str(error.value)
  assert "params/conv/kernel: checkpoint (3, 4), model (3, 8)" in message
  assert "params/extra/bias: checkpoint missing, model (2,)" in message
  assert "batch_stats" not in message


def test_load_encoder_without_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint found"):
    checkpoints.load_encoder(str(tmp_path), {}, {})
  assert not os.path.exists(tmp_path / "checkpoints")


def test_check_config(tmp_path, caplog):
  workdir = str(tmp_path)
  config = test_config.get_config()
  checkpoints.check_config(workdir, config, has_checkpoint=False)
  with open(tmp_path / checkpoints.CONFIG_FILE) as f:
    saved = json.load(f)
  assert saved["model"]["stage"] == "pretrain" and saved["process_count"] == 1
  config.num_train_steps = 100  # Training longer is fine, and said.
  with caplog.at_level("WARNING"):
    checkpoints.check_config(workdir, config, has_checkpoint=True)
  assert "num_train_steps: 4 in the workdir, 100 now" in caplog.text
  config.model.stage = "finetune"
  config.model.num_features = 3
  with pytest.raises(ValueError, match="another run") as error:
    checkpoints.check_config(workdir, config, has_checkpoint=True)
  assert "model.stage: 'pretrain' in the workdir, 'finetune' now" in str(error.value)
  assert "model.num_features" in str(error.value)
  os.remove(tmp_path / checkpoints.CONFIG_FILE)
  with pytest.raises(ValueError, match="no config.json"):
    checkpoints.check_config(workdir, config, has_checkpoint=True)


@pytest.mark.parametrize("field, value", [
    ("seed", 1), ("batch_size", 16), ("dataset.config", "small"),
    ("dataset.shuffle_buffer", 8), ("dataset.time_sampling", "first"),
    ("dataset.train_split", "test"), ("process_count", 2)])
def test_resuming_with_another_data_order_is_refused(tmp_path, monkeypatch, field, value):
  config = test_config.get_config()
  checkpoints.check_config(str(tmp_path), config, has_checkpoint=False)
  if field == "process_count":
    monkeypatch.setattr(jax, "process_count", lambda: value)
  else:
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match="same model and data order") as error:
    checkpoints.check_config(str(tmp_path), config, has_checkpoint=True)
  assert f"{field}: " in str(error.value) and f"{value!r} now" in str(error.value)
  assert "new --workdir" in str(error.value)


def test_config_json_goes_through_epath(tmp_path):
  """The workdir's files are written through etils.epath, so gs:// workdirs work."""
  opened = []

  def record(open_fn, path, mode):
    opened.append(os.path.basename(str(path)))
    return open_fn(path, mode)

  with epath_testing.mock_epath(open=record):
    checkpoints.check_config(str(tmp_path), test_config.get_config(), has_checkpoint=False)
  assert checkpoints.CONFIG_FILE + ".tmp" in opened
  assert (tmp_path / checkpoints.CONFIG_FILE).exists()
