"""Builds pastis from fake folders in the exact PASTIS layout (see fake_data.py)."""

import functools
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfds_builders import testing
from . import fake_data
from . import pastis_dataset_builder as builder_lib

_SIZE = 56  # 2 x 24 + 8: the 24x24 cut has a remainder, as 128 = 5 x 24 + 8 has
# 10 patches, 2 per fold.
_write_fake = functools.partial(fake_data.write, patches_per_fold=2, size=_SIZE)


class PastisFoldTest(testing.FakeFolder, tfds.testing.DatasetBuilderTestCase):
  """Builds fold1 (train Folds 3-5, validation 2, test 1), reads it back, checks the splits."""
  DATASET_CLASS = builder_lib.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["fold1"]
  SPLITS = {"train": 6, "validation": 2, "test": 2}
  write_fake = staticmethod(_write_fake)


class PastisWindowsTest(testing.FakeFolder, tfds.testing.DatasetBuilderTestCase):
  """Builds fold5_24x24: 3 x 3 windows of each 56x56 patch (train Folds 2-4, val 1, test 5)."""
  DATASET_CLASS = builder_lib.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["fold5_24x24"]
  SPLITS = {"train": 54, "validation": 18, "test": 18}
  write_fake = staticmethod(_write_fake)


def _build(tmp_path, manual_dir, config="fold1"):
  return testing.build(builder_lib.Builder, tmp_path, manual_dir, config)


def _patches(root):
  meta = json.loads((root / "metadata.geojson").read_text())
  return {f["properties"]["ID_PATCH"]: f["properties"] for f in meta["features"]}


def test_folds_and_windows():
  assert builder_lib.split_folds(1) == {"train": (3, 4, 5), "validation": (2,), "test": (1,)}
  assert builder_lib.split_folds(5) == {"train": (2, 3, 4), "validation": (1,), "test": (5,)}
  assert builder_lib.window_starts(128, 24) == [0, 21, 42, 62, 83, 104]
  assert builder_lib.window_starts(56, 24) == [0, 16, 32]
  assert builder_lib.window_starts(48, 24) == [0, 24]
  assert builder_lib.window_starts(24, 24) == [0]
  assert builder_lib.day_of_year(20180917) == 260 and builder_lib.day_of_year("20190101") == 1


def test_examples_match_the_files(tmp_path):
  root = fake_data.write(tmp_path / "PASTIS", size=_SIZE)
  builder = _build(tmp_path, tmp_path)  # the folder holding PASTIS works too
  assert builder.info.metadata["bands"] == list(builder_lib.BANDS)
  assert builder.info.metadata["class_names"][:2] == ["Background", "Meadow"]
  assert len(builder.info.metadata["class_names"]) == 19
  meta = _patches(root)
  for split, fold in (("test", 1), ("validation", 2)):
    (example,) = tfds.as_numpy(builder.as_dataset(split=split))
    (patch_id,) = [i for i, p in meta.items() if p["Fold"] == fold]
    s2 = np.load(root / "DATA_S2" / f"S2_{patch_id}.npy")
    target = np.load(root / "ANNOTATIONS" / f"TARGET_{patch_id}.npy")
    np.testing.assert_array_equal(example["image"], s2.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(example["labels"], target[0])  # void 19 = unknown = 19
    np.testing.assert_array_equal(
        example["parcel_ids"], np.load(root / "ANNOTATIONS" / f"ParcelIDs_{patch_id}.npy"))
    dates = meta[patch_id]["dates-S2"]
    want = [builder_lib.day_of_year(dates[str(t)]) for t in range(len(dates))]
    np.testing.assert_array_equal(example["doy"], want)


def test_windows_tile_each_patch(tmp_path):
  root = fake_data.write(tmp_path / "PASTIS", size=_SIZE)
  builder = _build(tmp_path, root, config="fold3_24x24")
  windows = list(tfds.as_numpy(builder.as_dataset(split="test")))  # Fold 3: one patch
  assert len(windows) == 9
  (patch_id,) = [i for i, p in _patches(root).items() if p["Fold"] == 3]
  s2 = np.load(root / "DATA_S2" / f"S2_{patch_id}.npy").transpose(0, 2, 3, 1)
  covered = np.zeros((_SIZE, _SIZE), int)
  for window in windows:
    assert window["image"].shape[1:] == (24, 24, 10)
    # The window's place in the patch: where its pixels are (random data, so unique).
    tops, lefts = zip(*[(t, l) for t in (0, 16, 32) for l in (0, 16, 32)
                        if np.array_equal(s2[:, t:t + 24, l:l + 24], window["image"])])
    covered[tops[0]:tops[0] + 24, lefts[0]:lefts[0] + 24] += 1
  assert covered.min() >= 1  # every pixel, no dropped border


@pytest.mark.parametrize("damage, message", [
    (lambda r, i: (r / "DATA_S2" / f"S2_{i}.npy").unlink(),
     r"S2_{i}.npy: patch {i} is listed in metadata.geojson but its file is missing"),
    (lambda r, i: (r / "ANNOTATIONS" / f"TARGET_{i}.npy").write_bytes(b"junk"),
     r"TARGET_{i}.npy: not a readable .npy file"),
    (lambda r, i: np.save(r / "DATA_S2" / f"S2_{i}.npy", np.zeros((2, 13, 8, 8), np.int16)),
     r"S2_{i}.npy: shape \(2, 13, 8, 8\), expected \[T=\d \(dates-S2\), 10, H, W\]"),
])
def test_a_bad_patch_fails_naming_the_file(tmp_path, damage, message):
  root = fake_data.write(tmp_path / "PASTIS", size=_SIZE)
  patch_id = min(_patches(root))
  damage(root, patch_id)
  with pytest.raises(ValueError, match=message.format(i=patch_id)):
    _build(tmp_path, root)


def test_a_wrong_or_partial_folder_says_what_to_download(tmp_path):
  with pytest.raises(AssertionError, match="does not exist(.|\n)*zenodo.org/records/5012942"):
    _build(tmp_path, tmp_path / "nowhere")
  root = fake_data.write(tmp_path / "PASTIS", size=_SIZE)
  (root / "metadata.geojson").unlink()
  with pytest.raises(FileNotFoundError, match=r"lacks \['metadata.geojson'\](.|\n)*zenodo"):
    _build(tmp_path, root)
