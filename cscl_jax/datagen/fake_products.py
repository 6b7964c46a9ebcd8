"""Small fake Sentinel-2 products and parcels for tests and benchmarks (real JP2 / GeoTIFF files).

Band values encode where they come from: digital number of date d, band b (index in
`features.BANDS`), native pixel (i, j) = `encoded(d, b, i, j, native_width)`, so a test can
check that each window lands on the right pixels, bands and dates. The scene classification of
date `cloudy` says cloud (class 9) on 80 % of the tile, the other dates vegetation (4) with a
thin band of cloud shadow (3) in date 1.

The tile is on the UTM 31N grid of Sentinel-2 tile T31TFM (origin 600000 E, 5000040 N) but
`size` x `size` pixels at 10 m instead of 10,980 x 10,980.
"""

import datetime
import json
from typing import Sequence

from etils import epath
import geopandas as gpd
import numpy as np
import rasterio
import shapely

from cscl_jax import features
from cscl_jax import resolution

CRS = "EPSG:32631"
ORIGIN = (600000.0, 5000040.0)
DATES = (datetime.date(2018, 4, 3), datetime.date(2018, 5, 13), datetime.date(2018, 6, 2),
         datetime.date(2018, 7, 22))
CLOUDY = 2  # index in DATES of the date that is mostly cloud
BAND_STEP, DATE_STEP = 500, 3000


def encoded(date: int, band: int, rows: np.ndarray, cols: np.ndarray, width: int) -> np.ndarray:
  """Digital number of a fake product pixel (native resolution)."""
  return 1 + rows * width + cols + BAND_STEP * band + DATE_STEP * date


def band_array(date: int, band: str, size: int) -> np.ndarray:
  """Returns the native-resolution array [size / f, size / f] of a band of a date."""
  n = size // resolution.BAND_FACTOR[band]
  rows, cols = np.mgrid[:n, :n]
  return encoded(date, features.BANDS.index(band), rows, cols, n).astype(np.uint16)


def scl_array(date: int, size: int) -> np.ndarray:
  """Returns the fake scene classification [size / 2, size / 2] of a date."""
  scl = np.full((size // 2, size // 2), 4, np.uint8)
  if date == CLOUDY:
    scl[: int(0.8 * size // 2)] = 9
  if date == 1:
    scl[:, :2] = 3
  return scl


def _write(path: epath.Path, data: np.ndarray, factor: int, jp2: bool) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  profile = dict(driver="JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES") if jp2 else dict(
      driver="GTiff")
  transform = rasterio.Affine(10 * factor, 0, ORIGIN[0], 0, -10 * factor, ORIGIN[1])
  with rasterio.open(path, "w", width=data.shape[1], height=data.shape[0], count=1,
                     dtype=data.dtype, crs=CRS, transform=transform, **profile) as dst:
    dst.write(data, 1)


def write_safe(root: str, size: int = 72, dates: Sequence[datetime.date] = DATES,
               level: str = "2A", tile: str = "T31TFM", baseline: str = "0206") -> list[str]:
  """Writes one .SAFE product a date under `root`; returns their paths.

  L2A: bands at native resolution in R10m/R20m/R60m, SCL_20m, no B10, and a decoy B04_20m of
  zeros (readers must take the native 10 m file). Baseline >= 0400: values + 1000 and an
  MTD_MSIL2A.xml with BOA_ADD_OFFSET -1000, as real products.
  """
  paths = []
  offset = 1000 if int(baseline) >= 400 else 0
  for d, date in enumerate(dates):
    stamp = date.strftime("%Y%m%d")
    name = f"S2B_MSIL{level}_{stamp}T105429_N{baseline}_R051_{tile}_{stamp}T144215.SAFE"
    safe = epath.Path(root) / name
    img = safe / "GRANULE" / f"L{level}_{tile}_A004399_{stamp}T105433" / "IMG_DATA"
    for band, factor in resolution.BAND_FACTOR.items():
      if level == "2A" and band == "B10":
        continue
      data = band_array(d, band, size) + np.uint16(offset)
      if level == "2A":
        _write(img / f"R{10 * factor}m" / f"{tile}_{stamp}T105429_{band}_{10 * factor}m.jp2",
               data, factor, jp2=True)
      else:
        _write(img / f"{tile}_{stamp}T105429_{band}.jp2", data, factor, jp2=True)
    if level == "2A":
      _write(img / "R20m" / f"{tile}_{stamp}T105429_SCL_20m.jp2", scl_array(d, size), 2, True)
      _write(img / "R20m" / f"{tile}_{stamp}T105429_B04_20m.jp2",
             np.zeros((size // 2, size // 2), np.uint16), 2, jp2=True)
    if offset:
      (safe / f"MTD_MSIL{level}.xml").write_text(
          '<Product_Image_Characteristics><BOA_ADD_OFFSET_VALUES_LIST><BOA_ADD_OFFSET '
          'band_id="0">-1000</BOA_ADD_OFFSET></BOA_ADD_OFFSET_VALUES_LIST>'
          '</Product_Image_Characteristics>')
    paths.append(str(safe))
  return paths


def write_geotiffs(root: str, size: int = 72, dates: Sequence[datetime.date] = DATES,
                   scl: bool = True) -> None:
  """Writes per-date folders `<root>/<YYYY-MM-DD>/<BAND>.tif` (all 13 bands, SCL)."""
  for d, date in enumerate(dates):
    folder = epath.Path(root) / date.isoformat()
    for band, factor in resolution.BAND_FACTOR.items():
      _write(folder / f"{band}.tif", band_array(d, band, size), factor, jp2=False)
    if scl:
      _write(folder / "SCL.tif", scl_array(d, size), 2, jp2=False)


def _box(row0: float, col0: float, row1: float, col1: float) -> shapely.Polygon:
  """Rectangle between tile pixel coordinates (rows down, 10 m pixels) in UTM."""
  x0, y0 = ORIGIN
  return shapely.box(x0 + 10 * col0, y0 - 10 * row1, x0 + 10 * col1, y0 - 10 * row0)


def parcels(size: int = 72) -> gpd.GeoDataFrame:
  """Fake parcels on the fake tile, in UTM (see the tests for what each one checks).

  1 BTH: rows 6-30 x cols 6-30 with a hole rows 14-20 x cols 14-20.
  2 MIS: multipolygon, rows 6-20 x cols 40-60 and rows 40-60 x cols 6-20.
  3 PPH: rows 40.75-66 x cols 40.25-66 (row 40 covered 25 %, col 40 covered 75 %).
  4 MIS: rows 60-66 x cols 60-70, overlapping parcel 3 (a conflict at rows 60-66 x cols 60-66).
  5 BTH: a self-intersecting bow-tie near rows 30-36 x cols 60-70 (invalid, repaired).
  6 XXX: rows 0-4 x cols 0-4, a code absent from the label map.
  """
  del size
  x0, y0 = ORIGIN
  bowtie = shapely.Polygon([(x0 + 600, y0 - 300), (x0 + 700, y0 - 360), (x0 + 700, y0 - 300),
                            (x0 + 600, y0 - 360)])
  geometries = [
      shapely.Polygon(_box(6, 6, 30, 30).exterior.coords,
                      [_box(14, 14, 20, 20).exterior.coords]),
      shapely.MultiPolygon([_box(6, 40, 20, 60), _box(40, 6, 60, 20)]),
      _box(40.75, 40.25, 66, 66),
      _box(60, 60, 66, 70),
      bowtie,
      _box(0, 0, 4, 4),
  ]
  return gpd.GeoDataFrame(
      {"ID_PARCEL": ["1001", "1002", "1003", "1004", "1005", "1006"],
       "CODE_CULTU": ["BTH", "MIS", "PPH", "MIS", "BTH", "XXX"]},
      geometry=geometries, crs=CRS)


LABEL_MAP = {"BTH": "wheat", "MIS": "maize", "PPH": "meadow"}


def write_parcels(path: str, crs: str = "EPSG:2154") -> None:
  """Writes the fake parcels to `path` (format from the suffix) in `crs`."""
  frame = parcels().to_crs(crs)
  if path.endswith(".parquet"):
    frame.to_parquet(path)
  else:
    frame.to_file(path)


def write_label_map(path: str) -> None:
  epath.Path(path).write_text(json.dumps(LABEL_MAP))
