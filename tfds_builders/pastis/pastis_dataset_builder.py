"""pastis: PASTIS, Sentinel-2 time series of 2,433 patches in France with crop-type labels.

Reads the manually downloaded PASTIS folder (Zenodo record 5012942): `metadata.geojson` (one
feature per patch: `ID_PATCH`, `Fold` 1..5, `dates-S2` {"0": yyyymmdd, ...}),
`DATA_S2/S2_<id>.npy` int16 [T, 10, 128, 128] and `ANNOTATIONS/TARGET_<id>.npy` [3, 128, 128]
(channel 0 the semantic class) and `ANNOTATIONS/ParcelIDs_<id>.npy` [128, 128]. Examples
follow `cscl_jax.features`:

* image: uint16 [T, H, W, 10], the stored digital numbers (reflectance x 1e4) in the order of
  `BANDS` (PASTIS's own: B02 B03 B04 B05 B06 B07 B08 B8A B11 B12; no B01, B09, B10); negative
  numbers, if any, become 0.
* doy: the day of year of each date of `dates-S2`, in the stored (chronological) order. The
  season runs from September 2018 to November 2019, so days of year wrap around once; the
  reference PASTIS24 conversion instead sorts the dates by day of year, which interleaves the
  two autumns, and U-TAE uses days since 2018-09-01.
* labels: the semantic class as the PASTIS papers use it (U-TAE, TSViT): 0 background is a
  class and is scored, 1-18 are crops, 19 void (parcels of unclear class and pixels shared by
  parcels) is ignored by the loss and the metrics, i.e. the unknown label here; 19 classes.
* parcel_ids: ParcelIDs.

Configs: `fold<k>`, k = 1..5, whole 128x128 patches with test = Fold k, validation = Fold k % 5
+ 1, train = the three others; `fold<k>_24x24` cuts every patch into 24x24 windows as PASTIS24
(TSViT) does, but keeps every pixel: the reference takes 5x5 windows at multiples of 24 and
drops the last 8 rows and columns; here 6x6 windows start at round(i * 104 / 5) = 0, 21, 42,
62, 83, 104 and overlap a little. Windows of a patch stay in its fold's split.
"""

import dataclasses
import datetime
import json
import math

import numpy as np
import tensorflow_datasets as tfds

from cscl_jax import features

BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
CLASS_NAMES = ("Background", "Meadow", "Soft winter wheat", "Corn", "Winter barley",
               "Winter rapeseed", "Spring barley", "Sunflower", "Grapevine", "Beet",
               "Winter triticale", "Winter durum wheat", "Fruits, vegetables, flowers",
               "Potatoes", "Leguminous fodder", "Soybeans", "Orchard", "Mixed cereal", "Sorghum")
VOID = len(CLASS_NAMES)  # 19, the unknown label
NUM_FOLDS = 5
_PROPERTIES = ("ID_PATCH", "Fold", "dates-S2")


@dataclasses.dataclass
class PastisConfig(tfds.core.BuilderConfig):
  """A PASTIS split of the official folds, whole patches or cut into windows.

  Attributes:
    test_fold: the fold of the test split (1..5); validation is the next one.
    window: 0 for whole patches, else the side of the square windows they are cut into.
  """
  test_fold: int = 1
  window: int = 0


def _configs() -> list[PastisConfig]:
  configs = []
  for window in (0, 24):
    for k in range(1, NUM_FOLDS + 1):
      size = f"{window}x{window} windows" if window else "128x128 patches"
      configs.append(PastisConfig(
          name=f"fold{k}" + (f"_{window}x{window}" if window else ""), test_fold=k,
          window=window, description=f"{size}; test Fold {k}, validation Fold "
          f"{k % NUM_FOLDS + 1}, train the other three."))
  return configs


def split_folds(test_fold: int) -> dict[str, tuple[int, ...]]:
  """Returns the folds of each split: test Fold k, validation Fold k % 5 + 1, train the rest."""
  validation = test_fold % NUM_FOLDS + 1
  train = tuple(f for f in range(1, NUM_FOLDS + 1) if f not in (test_fold, validation))
  return {"train": train, "validation": (validation,), "test": (test_fold,)}


def window_starts(size: int, window: int) -> list[int]:
  """Offsets of the fewest `window`-long windows that cover 0..size-1, spread evenly."""
  count = math.ceil(size / window)
  if count == 1:
    return [0]
  # round(i * (size - window) / (count - 1)), half up, in integers.
  return [(2 * i * (size - window) + count - 1) // (2 * (count - 1)) for i in range(count)]


def day_of_year(date: int | str) -> int:
  """Day of year of a yyyymmdd date."""
  text = str(date)
  return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8])).timetuple().tm_yday


def _patches(path: tfds.core.Path) -> list[dict]:
  """Reads (ID_PATCH, Fold, dates-S2) of every patch of metadata.geojson, sorted by id.

  Only the properties are needed, so the GeoJSON is read as JSON (the geometries are unused).
  """
  try:
    collection = json.loads(path.read_text())
    rows = [feature["properties"] for feature in collection["features"]]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a GeoJSON FeatureCollection ({type(e).__name__}: {e}).") from e
  patches = []
  for row in rows:
    missing = [p for p in _PROPERTIES if p not in row]
    if missing:
      raise ValueError(f"{path}: a patch lacks the properties {missing}: {str(row)[:200]}")
    dates = row["dates-S2"]
    dates = json.loads(dates) if isinstance(dates, str) else dates
    if int(row["Fold"]) not in range(1, NUM_FOLDS + 1):
      raise ValueError(f"{path}: patch {row['ID_PATCH']} has Fold {row['Fold']}, not 1..5.")
    try:
      doy = [day_of_year(dates[key]) for key in sorted(dates, key=int)]
    except ValueError as e:
      raise ValueError(f"{path}: patch {row['ID_PATCH']} has dates-S2 that are not yyyymmdd "
                       f"dates: {str(dates)[:200]}") from e
    patches.append({"id": int(row["ID_PATCH"]), "fold": int(row["Fold"]),
                    "doy": np.array(doy, np.int32)})
  return sorted(patches, key=lambda p: p["id"])


def _load(path: tfds.core.Path, patch_id: int) -> np.ndarray:
  try:
    with path.open("rb") as f:
      return np.load(f)
  except FileNotFoundError as e:
    raise ValueError(f"{path}: patch {patch_id} is listed in metadata.geojson but its file is "
                     "missing; the download or the unzip is incomplete.") from e
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: not a readable .npy file ({type(e).__name__}: {e}).") from e


def _example(root: tfds.core.Path, patch: dict) -> dict[str, np.ndarray]:
  """Reads one patch into a `cscl_jax.features` example; raises naming a misfit file."""
  i = patch["id"]
  s2_path = root / "DATA_S2" / f"S2_{i}.npy"
  target_path = root / "ANNOTATIONS" / f"TARGET_{i}.npy"
  ids_path = root / "ANNOTATIONS" / f"ParcelIDs_{i}.npy"
  s2, target, ids = (_load(p, i) for p in (s2_path, target_path, ids_path))
  num_dates = len(patch["doy"])
  if s2.ndim != 4 or s2.shape[:2] != (num_dates, len(BANDS)):
    raise ValueError(f"{s2_path}: shape {s2.shape}, expected [T={num_dates} (dates-S2), "
                     f"{len(BANDS)}, H, W].")
  height, width = s2.shape[2:]
  if target.ndim != 3 or target.shape[1:] != (height, width):
    raise ValueError(f"{target_path}: shape {target.shape}, expected [3, {height}, {width}].")
  if ids.shape != (height, width):
    raise ValueError(f"{ids_path}: shape {ids.shape}, expected [{height}, {width}].")
  semantic = target[0]
  return {
      "image": np.clip(s2, 0, 65535).astype(np.uint16).transpose(0, 2, 3, 1),  # [T, H, W, 10]
      "doy": patch["doy"],
      "labels": np.where((semantic >= 0) & (semantic < VOID), semantic, VOID).astype(np.int32),
      "parcel_ids": ids.astype(np.int32),
  }


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for PASTIS (semantic segmentation), from the manually downloaded folder."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = _configs()
  DEFAULT_CONFIG_NAME = "fold1"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download PASTIS.zip (about 29 GB) from Zenodo record 5012942
  (https://zenodo.org/records/5012942, linked from https://github.com/VSainteuf/pastis-benchmark)
  and unzip it. Pass the unzipped PASTIS folder as the manual dir (`--manual_dir=.../PASTIS`,
  or config.dataset.manual_dir), or put it inside `<data_dir>/downloads/manual/`. It must hold
  metadata.geojson, DATA_S2/S2_<ID_PATCH>.npy and ANNOTATIONS/{TARGET,ParcelIDs}_<ID_PATCH>.npy
  for every patch of metadata.geojson.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    """Returns the dataset metadata."""
    return self.dataset_info_from_configs(
        features=features.sits_features(len(BANDS)),
        supervised_keys=None,
        homepage="https://github.com/VSainteuf/pastis-benchmark",
        metadata=features.sits_metadata(BANDS, CLASS_NAMES),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    """Returns the generator of each split, from the folds of metadata.geojson."""
    root = dl_manager.manual_dir
    if (root / "PASTIS").exists():
      root = root / "PASTIS"
    missing = [name for name in ("metadata.geojson", "DATA_S2", "ANNOTATIONS")
               if not (root / name).exists()]
    if missing:
      raise FileNotFoundError(f"{root} lacks {missing}: it is not the PASTIS folder, or the "
                              f"unzip is incomplete.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    patches = _patches(root / "metadata.geojson")
    return {split: self._generate_examples(root, [p for p in patches if p["fold"] in folds])
            for split, folds in split_folds(self.builder_config.test_fold).items()}

  def _generate_examples(self, root: tfds.core.Path, patches: list[dict]):
    """Yields (key, example): one per patch, or one per window of each patch."""
    window = self.builder_config.window
    for patch in patches:
      example = _example(root, patch)
      if not window:
        yield str(patch["id"]), example
        continue
      height, width = example["labels"].shape
      if min(height, width) < window:
        raise ValueError(f"Patch {patch['id']} is {height}x{width}, smaller than the "
                         f"{window}x{window} windows of config {self.builder_config.name}.")
      for top in window_starts(height, window):
        for left in window_starts(width, window):
          cut = (slice(top, top + window), slice(left, left + window))
          yield f"{patch['id']}_{top}_{left}", {
              "image": example["image"][:, cut[0], cut[1]], "doy": example["doy"],
              "labels": example["labels"][cut], "parcel_ids": example["parcel_ids"][cut]}
