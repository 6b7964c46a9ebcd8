"""Writes a small folder in the exact PASTIS layout, for tests (random values, no real data).

The layout is the one of PASTIS.zip (Zenodo record 5012942), as U-TAE's `PASTIS_Dataset` and
DeepSatModels' `data/PASTIS24/data2windows.py` read it:

  metadata.geojson                  FeatureCollection (EPSG:2154), one feature per patch with
                                    ID_PATCH, N_Parcel, Parcel_Cover, TILE, Fold (1..5) and
                                    dates-S2 {"0": yyyymmdd, ...} (dates of the time axis)
  DATA_S2/S2_<ID_PATCH>.npy         int16 [T, 10, H, W], bands B02 B03 B04 B05 B06 B07 B08 B8A
                                    B11 B12, reflectance x 1e4
  ANNOTATIONS/TARGET_<ID_PATCH>.npy uint8 [3, H, W]; channel 0 the semantic class (0 background,
                                    1-18 crops, 19 void)
  ANNOTATIONS/ParcelIDs_<ID_PATCH>.npy  int32 [H, W]

H = W = 128 in the real data; tests use smaller patches.
"""

import datetime
import json
import pathlib

import numpy as np

SIZE = 128
_SEASON_START = datetime.date(2018, 9, 1)  # PASTIS dates run from September 2018 to Nov 2019


def _labels(rng, size):
  """Four rectangular parcels: semantic classes (void 19 among them), ids, instance channels."""
  cut_y, cut_x = rng.integers(size // 4, 3 * size // 4, 2)
  quadrant = (np.arange(size)[:, None] >= cut_y) * 2 + (np.arange(size)[None] >= cut_x)
  classes = rng.choice([0, 1, 3, 7, 18, 19], 4)
  ids = np.where(classes > 0, rng.integers(1, 90000, 4), 0)
  target = np.stack([classes[quadrant], ids[quadrant] % 251, quadrant]).astype(np.uint8)
  return target, ids[quadrant].astype(np.int32)


def write(root: str | pathlib.Path, *, patches_per_fold: int = 1, size: int = SIZE,
          seed: int = 0) -> pathlib.Path:
  """Writes a fake PASTIS folder at `root` with patches in every fold; returns its path."""
  root = pathlib.Path(root)
  (root / "DATA_S2").mkdir(parents=True, exist_ok=True)
  (root / "ANNOTATIONS").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  features = []
  for i in range(5 * patches_per_fold):
    patch_id = 10000 + 7 * i
    num_dates = int(rng.integers(3, 7))
    days = np.sort(rng.choice(np.arange(0, 440), num_dates, replace=False))
    dates = {str(t): int((_SEASON_START + datetime.timedelta(int(d))).strftime("%Y%m%d"))
             for t, d in enumerate(days)}
    s2 = rng.integers(0, 10000, (num_dates, 10, size, size)).astype(np.int16)
    target, ids = _labels(rng, size)
    np.save(root / "DATA_S2" / f"S2_{patch_id}.npy", s2)
    np.save(root / "ANNOTATIONS" / f"TARGET_{patch_id}.npy", target)
    np.save(root / "ANNOTATIONS" / f"ParcelIDs_{patch_id}.npy", ids)
    x, y = 600000.0 + 1280 * i, 6800000.0
    features.append({
        "type": "Feature",
        "properties": {"ID_PATCH": patch_id, "N_Parcel": int(len(np.unique(ids))),
                       "Parcel_Cover": 0.8, "TILE": "t30uxv", "Fold": i % 5 + 1,
                       "dates-S2": dates},
        "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + 1280, y],
                                                         [x + 1280, y + 1280], [x, y + 1280],
                                                         [x, y]]]}})
  collection = {"type": "FeatureCollection", "name": "metadata",
                "crs": {"type": "name",
                        "properties": {"name": "urn:ogc:def:crs:EPSG::2154"}},
                "features": features}
  (root / "metadata.geojson").write_text(json.dumps(collection))
  return root
