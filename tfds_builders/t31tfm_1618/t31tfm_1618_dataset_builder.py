"""t31tfm_1618: the T31TFM_1618 (France) Sentinel-2 crop-type dataset of the CSCL paper.

Reads the manually downloaded folder: one pickle per 48x48 sample holding every band at its
native resolution, the days of year and the 10 m ground truths (SPEC.md §4). Each example
follows `cscl_jax.features`:

* image: the 13 bands on the 10 m grid in BANDS order; the 20 m and 60 m bands are upsampled
  by `cscl_jax.resolution.resize_bilinear` (torch `F.upsample(mode="bilinear")`,
  align_corners=False, as the reference; also `tf.image.resize(method="bilinear")`), then
  rounded to whole digital numbers (the reference keeps the fraction: at most 0.5e-4 off).
* doy: every date of the file (the input pipeline cuts or pads to T).
* labels: raw crop codes remapped by labels_20k2k (`labels_20k2k.json`); unlisted codes,
  background 0 included, and pixels flagged in full_ass or part_ass become 20 = unknown.
* parcel_ids: the `ids` ground truth.

Splits: train = paths/train_paths.csv, validation = paths/eval_paths.csv (the reference has no
separate test set).

Configs: "default" holds every file. "x4" holds only the files that carry the x4
super-resolution ground truths (SPEC.md §5) and adds them, 4x the 10 m grid (192x192):
labels_x4 (`labels_x4` remapped with the same rule, unknown where `full_ass_x4` or
`part_ass_x4` is set) and parcel_ids_x4 (`ids_x4`).
"""

import json
import pickle
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from cscl_jax import features
from cscl_jax import resolution

_GROUND_TRUTHS = ("labels", "ids", "full_ass", "part_ass")
_X4 = 4  # the magnification of the finer ground truths some files carry
# Class names: the French LPIS (RPG) codes the reference gives for the 20 labels_20k2k codes.
_CODE_NAMES = {1: "PPH", 2: "J6S", 3: "VRC", 6: "SNE", 7: "ORH", 8: "PRL", 9: "TTH", 10: "PTC",
               11: "MH7", 12: "RDF", 13: "MH6", 14: "BOP", 20: "BOR", 25: "RVI", 33: "VRG",
               34: "TCR", 35: "J5M", 36: "MC7", 48: "LU6", 73: "SA7"}
_SPLIT_FILES = {"train": "train_paths.csv", "validation": "eval_paths.csv"}


def _label_map() -> tuple[np.ndarray, np.ndarray, int]:
  """Returns (sorted raw codes, their classes, unknown class) of labels_20k2k."""
  spec = json.loads((tfds.core.Path(__file__).parent / "labels_20k2k.json").read_text())
  codes = np.array(sorted(int(code) for code in spec["map"]))
  return codes, np.array([spec["map"][str(code)] for code in codes]), spec["unknown_class"]


def _checked(path: tfds.core.Path, sample, with_x4: bool) -> tuple[int, int]:
  """Returns (H, W) after checking the keys and shapes of one sample; raises naming the file."""
  if not isinstance(sample, dict):
    raise ValueError(f"{path}: holds a {type(sample).__name__}, not a dict of arrays.")
  fine = tuple(f"{k}_x{_X4}" for k in _GROUND_TRUTHS) if with_x4 else ()
  missing = [k for k in ("doy",) + _GROUND_TRUTHS + fine + features.BANDS if k not in sample]
  if missing:
    raise ValueError(f"{path}: missing keys {missing}.")
  if np.ndim(sample["doy"]) != 1 or np.ndim(sample["labels"]) != 2:
    raise ValueError(f"{path}: wrong shapes: doy {np.shape(sample['doy'])} (expected [T]), "
                     f"labels {np.shape(sample['labels'])} (expected [H, W]).")
  (num_dates,), (height, width) = np.shape(sample["doy"]), np.shape(sample["labels"])
  want = {k: (height, width) for k in _GROUND_TRUTHS}
  want.update({k: (_X4 * height, _X4 * width) for k in fine})
  want.update({b: (num_dates, height // f, width // f)
               for b, f in resolution.BAND_FACTOR.items()})
  wrong = [f"{k} {np.shape(sample[k])} (expected {shape})"
           for k, shape in want.items() if np.shape(sample[k]) != shape]
  if height % 6 or width % 6:
    wrong.append(f"labels {(height, width)} (expected multiples of 6 at 10 m)")
  if wrong:
    raise ValueError(f"{path}: wrong shapes: {', '.join(wrong)}.")
  return height, width


def _ground_truth(sample, label_map, suffix: str) -> dict[str, np.ndarray]:
  """labels (remapped; unknown where full_ass or part_ass is set) and parcel_ids + suffix."""
  codes, classes, unknown = label_map
  raw = np.rint(sample["labels" + suffix]).astype(np.int64)
  index = np.clip(np.searchsorted(codes, raw), 0, len(codes) - 1)
  labels = np.where(codes[index] == raw, classes[index], unknown)
  ambiguous = ((np.asarray(sample["full_ass" + suffix]) != 0)
               | (np.asarray(sample["part_ass" + suffix]) != 0))
  return {"labels" + suffix: np.where(ambiguous, unknown, labels).astype(np.int32),
          "parcel_ids" + suffix: np.rint(sample["ids" + suffix]).astype(np.int32)}


def _read(path: tfds.core.Path) -> Any:
  """Unpickles one sample; raises naming the file."""
  try:
    return pickle.loads(path.read_bytes(), encoding="latin1")
  except FileNotFoundError as e:
    raise ValueError(f"{path}: listed in the split file but missing.") from e
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e}).") from e


def _example(path: tfds.core.Path, sample, label_map, with_x4: bool) -> dict[str, np.ndarray]:
  """Turns one sample dict into a `cscl_jax.features` example (+ the x4 ground truths)."""
  height, width = _checked(path, sample, with_x4)
  bands = [np.asarray(sample[b], np.float64) for b in features.BANDS]
  image = np.stack([resolution.resize_bilinear(x, height, width)
                    if resolution.BAND_FACTOR[b] > 1 else x
                    for b, x in zip(features.BANDS, bands)], axis=-1)  # [T, H, W, 13]
  example = {"image": np.clip(np.rint(image), 0, 65535).astype(np.uint16),
             "doy": np.asarray(sample["doy"]).astype(np.int32),
             **_ground_truth(sample, label_map, "")}
  if with_x4:
    example.update(_ground_truth(sample, label_map, f"_x{_X4}"))
  return example


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for T31TFM_1618 (France), from the manually downloaded folder."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # "default", as every SITS dataset has; "x4" for super-resolution.
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name="default", description="Every date; 20 labels_20k2k classes, unknown = 20."),
      tfds.core.BuilderConfig(
          name="x4", description="Only the files with x4 ground truths, which it adds: "
                                 "labels_x4 and parcel_ids_x4 at 2.5 m (192x192)."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download T31TFM_1618.zip from the Google Drive link in the DeepSatModels data README
  (https://github.com/michaeltrs/DeepSatModels/blob/main/data/README.md, "T31TFM_1618 dataset
  (France)": https://drive.google.com/file/d/1aSYbTwqT8QxN07D8LxZTjhIpc2xfcF-K) and unzip it.
  Pass the unzipped T31TFM_1618 folder as the manual dir (`--manual_dir=.../T31TFM_1618`, or
  config.dataset.manual_dir), or put that folder inside `<data_dir>/downloads/manual/`. It must
  hold paths/train_paths.csv and paths/eval_paths.csv (one pickle path a line, relative to the
  folder) and the pickles, e.g. 2016/pkl_timeseries/<window>/<N>_<W>_2016.pickle.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    """Returns the dataset metadata."""
    codes, _, _ = _label_map()
    return self.dataset_info_from_configs(
        features=features.sits_features(label_magnifications=(_X4,) if self._with_x4 else ()),
        supervised_keys=None,
        homepage="https://github.com/michaeltrs/DeepSatModels",
        metadata=features.sits_metadata(features.BANDS, [_CODE_NAMES[c] for c in codes]),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    """Returns the generator of each split from the paths/*.csv files."""
    root = dl_manager.manual_dir
    if (root / "T31TFM_1618").exists():
      root = root / "T31TFM_1618"
    lists = {split: root / "paths" / name for split, name in _SPLIT_FILES.items()}
    for path in lists.values():
      if not path.exists():
        raise FileNotFoundError(f"{path} not found: the manual dir is not the T31TFM_1618 "
                                f"folder.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {split: self._generate_examples(root, path) for split, path in lists.items()}

  @property
  def _with_x4(self) -> bool:
    return self.builder_config.name == "x4"

  def _generate_examples(self, root: tfds.core.Path, split_file: tfds.core.Path):
    """Yields (relative path, example) for each pickle listed in `split_file`.

    The "x4" config skips the files without `labels_x4`.
    """
    label_map = _label_map()
    for line in split_file.read_text().splitlines():
      relative = line.split(",")[0].strip()
      if not relative:
        continue
      sample = _read(root / relative)
      if self._with_x4 and isinstance(sample, dict) and f"labels_x{_X4}" not in sample:
        continue
      yield relative, _example(root / relative, sample, label_map, self._with_x4)
