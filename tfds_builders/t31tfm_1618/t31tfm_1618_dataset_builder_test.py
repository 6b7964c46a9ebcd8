"""Builds t31tfm_1618 from fake folders in the exact T31TFM_1618 format (see fake_data.py)."""

import json
import pathlib
import pickle

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tfds_builders import testing
from . import fake_data
from . import t31tfm_1618_dataset_builder as builder_lib

_BANDS = ("B04", "B03", "B02", "B08", "B05", "B06", "B07", "B8A", "B11", "B12", "B01", "B09",
          "B10")


class T31tfm1618Test(testing.FakeFolder, tfds.testing.DatasetBuilderTestCase):
  """Builds the fake folder, reads it back, reloads it, checks splits, tags and registration."""
  DATASET_CLASS = builder_lib.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["default"]
  SPLITS = {"train": 6, "validation": 3}
  write_fake = staticmethod(fake_data.write)


class T31tfm1618X4Test(T31tfm1618Test):
  """The x4 config: only the files with x4 ground truths (every other one in fake_data)."""
  BUILDER_CONFIG_NAMES_TO_TEST = ["x4"]
  SPLITS = {"train": 3, "validation": 2}


def _build(tmp_path, manual_dir, config="default"):
  return testing.build(builder_lib.Builder, tmp_path, manual_dir, config=config)


def _expected_labels(sample, suffix=""):
  """labels + suffix by a plain dict remap, unknown (20) where full_ass or part_ass is set."""
  spec = json.loads((pathlib.Path(builder_lib.__file__).parent / "labels_20k2k.json").read_text())
  labels = np.array([[spec["map"].get(str(int(code)), 20) for code in row]
                     for row in sample["labels" + suffix]])
  labels[(sample["full_ass" + suffix] > 0) | (sample["part_ass" + suffix] > 0)] = 20
  return labels


def _expected(sample):
  """The example a sample should give, from TF's bilinear resize and a plain dict remap."""
  bands = []
  for band in _BANDS:
    x = sample[band].astype(np.float32)[..., None]  # [T, h, w, 1]
    bands.append(tf.image.resize(x, (48, 48), method="bilinear").numpy()[..., 0])
  return np.stack(bands, -1), _expected_labels(sample)


def test_examples_match_the_pickles(tmp_path):
  root = fake_data.write(tmp_path / "T31TFM_1618")
  builder = _build(tmp_path, tmp_path)  # the folder holding T31TFM_1618 works too
  assert builder.info.metadata["class_names"][:3] == ["PPH", "J6S", "VRC"]
  assert len(builder.info.metadata["class_names"]) == 20
  pickles = {tuple(s["doy"]): s for s in (
      pickle.loads(p.read_bytes()) for p in root.glob("*/pkl_timeseries/*/*.pickle"))}
  seen = 0
  for split in ("train", "validation"):
    for example in tfds.as_numpy(builder.as_dataset(split=split)):
      sample = pickles[tuple(example["doy"])]
      image, labels = _expected(sample)
      assert example["image"].shape == (len(example["doy"]), 48, 48, 13)
      np.testing.assert_allclose(example["image"], image, atol=0.51)
      np.testing.assert_array_equal(example["image"][..., 0], sample["B04"])
      np.testing.assert_array_equal(example["labels"], labels)
      np.testing.assert_array_equal(example["parcel_ids"], sample["ids"])
      seen += 1
  assert seen == 9


def test_x4_config_holds_the_x4_files_and_ground_truths(tmp_path):
  root = fake_data.write(tmp_path / "T31TFM_1618")
  builder = _build(tmp_path, root, config="x4")
  pickles = [pickle.loads(p.read_bytes()) for p in root.glob("*/pkl_timeseries/*/*.pickle")]
  with_x4 = {tuple(s["doy"]): s for s in pickles if "labels_x4" in s}
  assert 0 < len(with_x4) < len(pickles)
  seen = set()
  for split in ("train", "validation"):
    for example in tfds.as_numpy(builder.as_dataset(split=split)):
      sample = with_x4[tuple(example["doy"])]
      assert example["labels_x4"].shape == (192, 192)
      np.testing.assert_array_equal(example["labels"], _expected_labels(sample))
      np.testing.assert_array_equal(example["labels_x4"], _expected_labels(sample, "_x4"))
      np.testing.assert_array_equal(example["parcel_ids_x4"], sample["ids_x4"])
      seen.add(tuple(example["doy"]))
  assert seen == set(with_x4)


def test_x4_file_with_misshapen_x4_truths_is_named(tmp_path):
  root = fake_data.write(tmp_path / "T31TFM_1618", num_train=2, num_eval=1)
  bad = root / (root / "paths" / "train_paths.csv").read_text().split()[0]  # has x4
  _rewrite(bad, lambda s: s.update(part_ass_x4=np.zeros((96, 96))))
  with pytest.raises(ValueError, match=rf"{bad}: wrong shapes: part_ass_x4 \(96, 96\) "
                                       r"\(expected \(192, 192\)\)"):
    _build(tmp_path, root, config="x4")


def _rewrite(path, change):
  sample = pickle.loads(path.read_bytes())
  change(sample)
  path.write_bytes(pickle.dumps(sample))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "not a readable pickle"),
    (lambda p: _rewrite(p, lambda s: s.pop("B8A")), r"missing keys \['B8A'\]"),
    (lambda p: _rewrite(p, lambda s: s.update(B05=np.zeros((len(s["doy"]), 48, 48)))),
     r"wrong shapes: B05 \(\d, 48, 48\) \(expected \(\d, 24, 24\)\)"),
    (lambda p: p.unlink(), "listed in the split file but missing"),
])
def test_bad_pickle_fails_naming_the_file(tmp_path, damage, message):
  root = fake_data.write(tmp_path / "T31TFM_1618", num_train=2, num_eval=1)
  bad = root / (root / "paths" / "eval_paths.csv").read_text().split()[0]
  damage(bad)
  with pytest.raises(ValueError, match=f"{bad}: {message}"):
    _build(tmp_path, root)


def test_missing_or_wrong_manual_dir_says_what_to_download(tmp_path):
  with pytest.raises(AssertionError, match="does not exist(.|\n)*drive.google.com"):
    _build(tmp_path, tmp_path / "nowhere")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "file.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match="train_paths.csv not found(.|\n)*drive.google"):
    _build(tmp_path, tmp_path / "other")


def test_label_map_is_the_shared_one():
  shared = pathlib.Path(__file__).parents[3] / "shared" / "t31tfm_labels_20k2k.json"
  if not shared.exists():
    pytest.skip("no ../shared beside the checkout")
  ours = pathlib.Path(builder_lib.__file__).parent / "labels_20k2k.json"
  assert json.loads(ours.read_text()) == json.loads(shared.read_text())
