"""Writes a small folder in the exact T31TFM_1618 format, for tests (random values, no real data).

The format is the one the reference (DeepSatModels `data/France`, DeepSatData
`make_image_timeseries_for_labels.py`) reads and writes: `<root>/paths/{train,eval}_paths.csv`
with one pickle path a line relative to `<root>`, no header, and one pickle per sample at
`<year>/pkl_timeseries/<window>/<N>_<W>_<year>.pickle` holding a dict of numpy arrays: every
band uint16 [T, h, w] at its native resolution (48, 24 or 8 pixels), `doy` int64 [T], `year`
int32 [], the ground truths float32 [48, 48] (`labels` raw crop codes, `ids`, `full_ass`,
`part_ass`, `groups`, `invalid`, `ratios`) and on some files the same ground truths at 4x
resolution [192, 192] with an `_x4` suffix.
"""

import pathlib
import pickle

import numpy as np

SIZE = 48  # pixels at 10 m
NATIVE_SIZE = {**dict.fromkeys(("B02", "B03", "B04", "B08"), SIZE),
               **dict.fromkeys(("B05", "B06", "B07", "B8A", "B11", "B12"), SIZE // 2),
               **dict.fromkeys(("B01", "B09", "B10"), SIZE // 6)}
GROUND_TRUTHS = ("labels", "ids", "full_ass", "part_ass", "groups", "invalid", "ratios")
# Raw codes: background 0, codes labels_20k2k keeps (1, 7, 20, 73) and codes it drops (4, 99).
CODES = (0, 1, 4, 7, 20, 73, 99)


def _ground_truths(rng, size):
  """Four rectangular parcels with random codes, ids and boundary flags, float32 [size, size]."""
  cut_y, cut_x = rng.integers(size // 4, 3 * size // 4, 2)
  quadrant = (np.arange(size)[:, None] >= cut_y) * 2 + (np.arange(size)[None] >= cut_x)
  codes = rng.choice(CODES, 4)
  ids = np.where(codes > 0, rng.integers(1000, 90000, 4), 0)
  edge = np.zeros((size, size), bool)
  edge[cut_y - 1:cut_y + 1] = edge[:, cut_x - 1:cut_x + 1] = True
  flags = rng.random((2, size, size)) < 0.3
  truths = {"labels": codes[quadrant], "ids": ids[quadrant], "full_ass": edge & flags[0],
            "part_ass": edge & flags[1], "groups": codes[quadrant] % 5,
            "invalid": np.zeros((size, size)), "ratios": np.where(edge, 0.5, 1.0)}
  return {k: np.asarray(v, np.float32) for k, v in truths.items()}


def fake_sample(rng: np.random.Generator, year: int, *, with_x4: bool) -> dict[str, np.ndarray]:
  """Returns one sample dict in the T31TFM_1618 pickle format."""
  num_dates = int(rng.integers(3, 8))
  sample = {band: rng.integers(0, 10000, (num_dates, n, n)).astype(np.uint16)
            for band, n in NATIVE_SIZE.items()}
  sample["doy"] = np.sort(rng.choice(np.arange(1, 366), num_dates, replace=False))
  sample["year"] = np.array(str(year)).astype(np.int32)
  sample.update(_ground_truths(rng, SIZE))
  if with_x4:
    sample.update({f"{k}_x4": v for k, v in _ground_truths(rng, 4 * SIZE).items()})
  return sample


def write(root: str | pathlib.Path, *, num_train: int = 6, num_eval: int = 3,
          seed: int = 0) -> pathlib.Path:
  """Writes a fake T31TFM_1618 folder at `root` and returns its path."""
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  lines = {"train_paths.csv": [], "eval_paths.csv": []}
  for i in range(num_train + num_eval):
    year = 2016 + i % 3
    north, west = 6540681 + 480 * i, 799943 + 480 * i
    window = f"W{west}_N{north + 28000}_E{west + 28000}_S{north}"
    relative = f"{year}/pkl_timeseries/{window}/{north}_{west}_{year}.pickle"
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    with open(root / relative, "wb") as f:
      pickle.dump(fake_sample(rng, year, with_x4=i % 2 == 0), f,
                  protocol=pickle.HIGHEST_PROTOCOL)
    lines["train_paths.csv" if i < num_train else "eval_paths.csv"].append(relative)
  (root / "paths").mkdir(parents=True, exist_ok=True)
  for name, paths in lines.items():
    (root / "paths" / name).write_text("\n".join(paths) + "\n")
  return root
