"""mtlcc: MTLCC (Germany, Rußwurm & Körner 2018), Sentinel-2 time series of 24x24 tiles.

Reads the manually downloaded `data_IJGI18/datasets/full/240` folder: `data16/` and `data17/`
with one gzipped TFRecord per tile, `<tileid>.tfrecord.gz`, whose tf.train.Example holds
int64 arrays as raw bytes with their shapes: `x10/data` [T, 24, 24, 4], `x20/data`
[T, 12, 12, 6], `x60/data` [T, 4, 4, 3], `dates/doy` and `dates/year` [T], `labels/data`
[T, 24, 24] (the same map repeated; older files [24, 24]); and `tileids/*.tileids`, one tile
id a line. Examples follow `cscl_jax.features`:

* image: uint16 [T, 24, 24, 13], bands x10 | x20 | x60 as stored, named in `BANDS`
  (B02 B03 B04 B08 | B05 B06 B07 B8A B11 B12 | B01 B09 B10; the records carry no names: the
  10 m order is the one MTLCC readers index, B04 at 2 and B08 at 3, the others are taken in
  band-number order). x20 and x60 are upsampled to 10 m by
  `cscl_jax.resolution.resize_bilinear`, as the France builder and the reference
  (`F.upsample(mode="bilinear")`) do, then rounded.
* doy: `dates/doy`. The reference also appends `dates/year` - 2016 as a 15th channel; it
  converts data16 only, so that channel is 0 throughout, and it is left out here.
* labels: the first map of `labels/data`, remapped as the reference does: the 17 crop codes
  1, 2, 3, 5, 8, 9, 12, 13, 15, 16, 17, 19, 22, 23, 24, 25, 26 become classes 0..16 and
  code 0 (unknown) becomes 17. Codes outside the list (the reference would keep them raw,
  past the classifier) also become 17.
* parcel_ids: zeros (MTLCC has no parcel ids).

Configs: `data16` (the 2016 tiles only: what DeepSatModels, hence the CSCL and TSViT papers,
use) and `all` (2016 and 2017). Splits: train = train_fold0.tileids, validation =
test_fold0.tileids, test = eval.tileids (the reference trains on train_fold0 and reports on
eval). A tile listed in a split file but absent from a year folder is skipped (with a
warning), as the MTLCC readers do.
"""

import dataclasses

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cscl_jax import features
from cscl_jax import resolution

BANDS = ("B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12",
         "B01", "B09", "B10")
# Raw MTLCC label code -> name; the reference maps codes in this order to classes 0..16.
CODE_NAMES = {1: "sugar_beet", 2: "summer_oat", 3: "meadow", 5: "rape", 8: "hop",
              9: "winter_spelt", 12: "winter_triticale", 13: "beans", 15: "peas",
              16: "potatoes", 17: "soybeans", 19: "asparagus", 22: "winter_wheat",
              23: "winter_barley", 24: "winter_rye", 25: "summer_barley", 26: "maize"}
UNKNOWN = len(CODE_NAMES)  # 17
_CHANNELS = {"x10": (1, 4), "x20": (2, 6), "x60": (6, 3)}  # pixel size / 10 m, bands
_SPLIT_FILES = {"train": "train_fold0.tileids", "validation": "test_fold0.tileids",
                "test": "eval.tileids"}
_ROOT = ("data_IJGI18", "datasets", "full", "240")


@dataclasses.dataclass
class MtlccConfig(tfds.core.BuilderConfig):
  """Which years of MTLCC to read.

  Attributes:
    years: the year folders, e.g. ("data16",).
  """
  years: tuple[str, ...] = ("data16",)


def remap_labels(codes: np.ndarray) -> np.ndarray:
  """Raw MTLCC codes -> classes 0..16, everything else (0 included) -> UNKNOWN."""
  lookup = np.full(max(CODE_NAMES) + 1, UNKNOWN, np.int32)
  lookup[list(CODE_NAMES)] = np.arange(len(CODE_NAMES))
  inside = (codes >= 0) & (codes < len(lookup))
  return np.where(inside, lookup[np.clip(codes, 0, len(lookup) - 1)], UNKNOWN).astype(np.int32)


def _array(example: tf.train.Example, name: str, path) -> np.ndarray:
  """Decodes the int64 array `<name>/data` (or `dates/<name>`) with its shape."""
  feats = example.features.feature
  data_key, shape_key = ((f"dates/{name}", "dates/shape") if name in ("doy", "year")
                         else (f"{name}/data", f"{name}/shape"))
  if data_key not in feats or shape_key not in feats:
    raise ValueError(f"{path}: the record lacks {data_key} or {shape_key}; not an MTLCC "
                     "tfrecord.")
  raw = np.frombuffer(feats[data_key].bytes_list.value[0], np.int64)
  shape = tuple(feats[shape_key].int64_list.value)
  if raw.size != np.prod(shape):
    raise ValueError(f"{path}: {data_key} holds {raw.size} numbers, not {shape}.")
  return raw.reshape(shape)


def _example(path, record: bytes) -> dict[str, np.ndarray]:
  """Decodes one MTLCC record into a `cscl_jax.features` example; raises naming the file."""
  example = tf.train.Example.FromString(record)
  x = {name: _array(example, name, path) for name in _CHANNELS}
  doy, labels = _array(example, "doy", path), _array(example, "labels", path)
  labels = labels[0] if labels.ndim == 3 else labels  # the map is repeated over time
  (num_dates,), (height, width) = doy.shape, labels.shape
  wrong = [f"{name} {x[name].shape} (expected {(num_dates, height // f, width // f, c)})"
           for name, (f, c) in _CHANNELS.items()
           if x[name].shape != (num_dates, height // f, width // f, c)]
  if wrong or height % 6 or width % 6:
    raise ValueError(f"{path}: wrong shapes for labels {labels.shape} and T = {num_dates}: "
                     f"{', '.join(wrong) or 'labels not a multiple of 6 pixels'}.")
  bands = [x["x10"]] + [
      np.moveaxis(resolution.resize_bilinear(np.moveaxis(x[n].astype(np.float64), -1, 1),
                                           height, width), 1, -1)
      for n in ("x20", "x60")]  # each [T, H, W, c]
  image = np.concatenate(bands, axis=-1)  # [T, H, W, 13]
  return {
      "image": np.clip(np.rint(image), 0, 65535).astype(np.uint16),
      "doy": doy.astype(np.int32),
      "labels": remap_labels(labels),
      "parcel_ids": np.zeros((height, width), np.int32),
  }


def _records(path) -> list[bytes]:
  try:
    return list(tf.data.TFRecordDataset(str(path), compression_type="GZIP").as_numpy_iterator())
  except tf.errors.OpError as e:
    raise ValueError(f"{path}: not a readable gzipped TFRecord ({type(e).__name__}: "
                     f"{e.message}).") from e


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for MTLCC (Germany), from the manually downloaded folder."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      MtlccConfig(name="data16", years=("data16",),
                  description="2016 tiles only, as the reference (DeepSatModels)."),
      MtlccConfig(name="all", years=("data16", "data17"), description="2016 and 2017 tiles."),
  ]
  DEFAULT_CONFIG_NAME = "data16"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Get the MTLCC data (about 40 GB) with the authors' script: `git clone
  https://github.com/TUM-LMF/MTLCC && cd MTLCC && bash download.sh full` (the README there
  names the current host). Pass the MTLCC folder (or its data_IJGI18/datasets/full/240
  folder) as the manual dir (`--manual_dir=...`, or config.dataset.manual_dir). It must hold
  data_IJGI18/datasets/full/240/tileids/{train_fold0,test_fold0,eval}.tileids and the
  data16/ (and for config `all` data17/) folders of <tileid>.tfrecord.gz files.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    """Returns the dataset metadata."""
    return self.dataset_info_from_configs(
        features=features.sits_features(len(BANDS)),
        supervised_keys=None,
        homepage="https://github.com/TUM-LMF/MTLCC",
        metadata=features.sits_metadata(BANDS, CODE_NAMES.values()),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    """Returns the generator of each split from the tileids/ files."""
    root = dl_manager.manual_dir
    if root.joinpath(*_ROOT).exists():
      root = root.joinpath(*_ROOT)
    needed = [f"tileids/{name}" for name in _SPLIT_FILES.values()] + list(
        self.builder_config.years)
    missing = [name for name in needed if not (root / name).exists()]
    if missing:
      raise FileNotFoundError(f"{root} lacks {missing}: it is not the MTLCC 240 folder, or the "
                              f"download is incomplete.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {split: self._generate_examples(root, root / "tileids" / name)
            for split, name in _SPLIT_FILES.items()}

  def _generate_examples(self, root: tfds.core.Path, tileids: tfds.core.Path):
    """Yields (year/tileid/index, example) for each record of the split's tiles."""
    tiles = [line.strip() for line in tileids.read_text().splitlines() if line.strip()]
    for year in self.builder_config.years:
      paths = [root / year / f"{tile}.tfrecord.gz" for tile in tiles]
      present = [path for path in paths if path.exists()]
      if not present:
        raise FileNotFoundError(f"{root / year} holds none of the {len(tiles)} tiles of "
                                f"{tileids}; the download is incomplete.")
      if len(present) < len(paths):
        logging.warning("%s: %d of the %d tiles of %s are missing; skipped.", root / year,
                        len(paths) - len(present), len(paths), tileids.name)
      for path in present:
        for index, record in enumerate(_records(path)):
          yield f"{year}/{path.name}/{index}", _example(path, record)
