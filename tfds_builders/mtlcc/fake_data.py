"""Writes a small folder in the exact MTLCC layout, for tests (random values, no real data).

The layout is the one of the MTLCC download (`bash download.sh full`), as the authors' and
DeepSatModels' `S2parser` read and write it:

  data_IJGI18/datasets/full/240/
    tileids/train_fold0.tileids, test_fold0.tileids, eval.tileids   one tile id a line
    data16/<tileid>.tfrecord.gz, data17/<tileid>.tfrecord.gz       GZIP TFRecord, one
        tf.train.Example per tile: int64 arrays as raw bytes (`x10/data` [T, 24, 24, 4],
        `x20/data` [T, 12, 12, 6], `x60/data` [T, 4, 4, 3], `dates/doy` [T], `dates/year` [T],
        `labels/data` [T, 24, 24]) and their shapes (`x10/shape`, ..., `dates/shape`,
        `labels/shape`) as int64 lists.
"""

import pathlib

import numpy as np
import tensorflow as tf

SIZE = 24  # pixels at 10 m
ROOT = pathlib.Path("data_IJGI18", "datasets", "full", "240")
# Raw codes: unknown 0, crops the reference keeps (1, 5, 22, 26) and an unlisted code (4).
CODES = (0, 1, 4, 5, 22, 26)
SPLIT_FILES = ("train_fold0.tileids", "test_fold0.tileids", "eval.tileids")


def _int64_feature(array: np.ndarray) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[array.astype(np.int64).tobytes()]))


def _shape_feature(array: np.ndarray) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=array.shape))


def fake_record(rng: np.random.Generator, year: int) -> bytes:
  """Returns one serialised tf.train.Example in the MTLCC format."""
  num_dates = int(rng.integers(3, 8))
  arrays = {f"x{res}": rng.integers(0, 10000, (num_dates, SIZE // f, SIZE // f, bands))
            for res, f, bands in ((10, 1, 4), (20, 2, 6), (60, 6, 3))}
  cut_y, cut_x = rng.integers(4, SIZE - 4, 2)
  quadrant = (np.arange(SIZE)[:, None] >= cut_y) * 2 + (np.arange(SIZE)[None] >= cut_x)
  labels = np.asarray(CODES)[rng.integers(0, len(CODES), 4)][quadrant]
  arrays["labels"] = np.broadcast_to(labels, (num_dates, SIZE, SIZE))
  doy = np.sort(rng.choice(np.arange(1, 366), num_dates, replace=False))
  feature = {}
  for name, array in arrays.items():
    feature[f"{name}/data"] = _int64_feature(array)
    feature[f"{name}/shape"] = _shape_feature(array)
  feature["dates/doy"] = _int64_feature(doy)
  feature["dates/year"] = _int64_feature(np.full(num_dates, year))
  feature["dates/shape"] = _shape_feature(doy)
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write(root: str | pathlib.Path, *, num_tiles: tuple[int, int, int] = (4, 2, 2),
          seed: int = 0) -> pathlib.Path:
  """Writes a fake MTLCC folder at `root` and returns `root`.

  Args:
    root: where to write; the 240 folder is root/ROOT.
    num_tiles: tiles of train_fold0, test_fold0 and eval, each in data16 and data17.
    seed: seed of the random values.
  """
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  base = root / ROOT
  (base / "tileids").mkdir(parents=True, exist_ok=True)
  tile = 16000
  for name, count in zip(SPLIT_FILES, num_tiles):
    tiles = [str(tile + 17 * i) for i in range(count)]
    tile += 17 * count
    (base / "tileids" / name).write_text("\n".join(tiles) + "\n")
    for year in (16, 17):
      (base / f"data{year}").mkdir(exist_ok=True)
      for tile_id in tiles:
        with tf.io.TFRecordWriter(str(base / f"data{year}" / f"{tile_id}.tfrecord.gz"),
                                  options="GZIP") as writer:
          writer.write(fake_record(rng, 2000 + year))
  return root
