"""Windows of a tile and their split by spatial blocks.

Windows are `size` x `size` pixels at 10 m on a fixed grid anchored at the tile's corner (the
last partial row and column of windows are left out; Sentinel-2 tiles overlap by ~10 km).

Splits are decided by spatial blocks of `block` metres in the tile's CRS: a window belongs to
the block holding its centre, and each block goes to a split by a hash of (CRS, block, seed)
compared with the split fractions. Neighbouring windows thus share a split, tiles of one UTM
zone that overlap agree on the split of the ground they share, and the assignment is
deterministic. Windows of the non-training splits that touch (8-neighbourhood) a window of
another split are dropped (`guard`), so that no training window touches an evaluation window.
"""

import dataclasses
import hashlib

import numpy as np
import rasterio
import rasterio.features
import shapely


@dataclasses.dataclass(frozen=True)
class WindowSpec:
  """One window of one tile and year: its key, 10 m pixel offsets and split."""
  key: str
  row: int
  col: int
  split: str


def parse_splits(text: str) -> dict[str, float]:
  """Parses "train=0.8,validation=0.1,test=0.1" into {split: fraction}; checks it."""
  try:
    splits = {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
  except ValueError as e:
    raise ValueError(f"--splits={text!r}: expected name=fraction,... e.g. "
                     f"train=0.8,validation=0.1,test=0.1.") from e
  if "train" not in splits or any(v < 0 for v in splits.values()) or not np.isclose(
      sum(splits.values()), 1):
    raise ValueError(f"--splits={text!r}: needs a train split and non-negative fractions that "
                     f"sum to 1.")
  return splits


def block_split(crs: rasterio.crs.CRS, x: float, y: float, block: float,
                splits: dict[str, float], seed: int) -> str:
  """The split of the block (of `block` metres) holding the point (x, y) of `crs`."""
  bx, by = int(np.floor(x / block)), int(np.floor(y / block))
  digest = hashlib.sha256(f"{crs.to_string()}/{bx}/{by}/{seed}".encode()).digest()
  u = int.from_bytes(digest[:8], "big") / 2**64
  edges = np.cumsum(list(splits.values()))
  return list(splits)[min(int(np.searchsorted(edges, u, side="right")), len(splits) - 1)]


def plan(name: str, year: int, crs: rasterio.crs.CRS, transform: rasterio.Affine,
         width: int, height: int, parcels: list[shapely.Geometry], size: int, block: float,
         splits: dict[str, float], seed: int) -> tuple[list[WindowSpec], int]:
  """The windows of a tile-year that touch a parcel, with their splits.

  Args:
    name: tile name (keys are "<name>/<year>/r<row>c<col>").
    year: year of the dates.
    crs, transform, width, height: the tile's 10 m grid.
    parcels: the parcel geometries in `crs`.
    size: window size in 10 m pixels.
    block: block size in metres.
    splits: split name -> fraction.
    seed: changes the block assignment.

  Returns:
    (windows in reading order: ~1024-pixel chunks, row-major inside; number of windows dropped
    as guard).
  """
  rows, cols = height // size, width // size
  if not parcels or not rows or not cols:
    return [], 0
  # One pixel a window: which windows touch a parcel.
  touched = rasterio.features.rasterize(
      ((g, 1) for g in parcels), out_shape=(rows, cols), all_touched=True, dtype="uint8",
      transform=transform * rasterio.Affine.scale(size))
  # The split of every window of the grid and of its neighbours: [rows + 2, cols + 2].
  centres = transform * rasterio.Affine.scale(size) * rasterio.Affine.translation(0.5, 0.5)
  split = np.array([[block_split(crs, *(centres * (c, r)), block, splits, seed)
                     for c in range(-1, cols + 1)] for r in range(-1, rows + 1)])
  windows, guard = [], 0
  # Chunk by chunk of ~1024 pixels (row-major inside), so successive reads hit the same JPEG
  # 2000 tiles / GeoTIFF blocks in GDAL's cache.
  chunk = max(1, 1024 // size)
  order = sorted(zip(*np.nonzero(touched)), key=lambda rc: (rc[0] // chunk, rc[1] // chunk, *rc))
  for r, c in order:
    own = split[r + 1, c + 1]
    if own != "train" and (split[r:r + 3, c:c + 3] != own).any():
      guard += 1
      continue
    windows.append(WindowSpec(f"{name}/{year}/r{r * size:05d}c{c * size:05d}", int(r * size),
                              int(c * size), str(own)))
  return windows, guard
