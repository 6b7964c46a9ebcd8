"""Tests of the Sentinel-2 product reader on fake L2A, L1C and GeoTIFF products."""

import shutil

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from cscl_jax import features
from cscl_jax import resolution
from cscl_jax.datagen import fake_products
from cscl_jax.datagen import products

SIZE = 36


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  root = tmp_path_factory.mktemp("products")
  fake_products.write_safe(str(root / "l2a"), SIZE, baseline="0400")
  fake_products.write_safe(str(root / "l1c"), SIZE, fake_products.DATES[:2], level="1C")
  fake_products.write_geotiffs(str(root / "tif"), SIZE)
  return root


def _expected(window: Window, dates: int, b10: bool) -> np.ndarray:
  """The fake products' bands on the 10 m grid, from the encoding alone. [T, H, W, 13]."""
  rows = slice(window.row_off, window.row_off + window.height)
  cols = slice(window.col_off, window.col_off + window.width)
  out = []
  for d in range(dates):
    bands = []
    for band, f in resolution.BAND_FACTOR.items():
      native = fake_products.band_array(d, band, SIZE).astype(np.float64)
      native = native[rows.start // f: rows.stop // f, cols.start // f: cols.stop // f]
      if band == "B10" and not b10:
        native = np.zeros_like(native)
      bands.append((band, resolution.resize_bilinear(native, window.height, window.width)))
    bands = dict(bands)
    out.append(np.stack([bands[b] for b in features.BANDS], axis=-1))
  return np.rint(np.stack(out)).astype(np.uint16)


def test_both_layouts_read_the_encoded_pixels(roots):
  window = Window(12, 6, 18, 24)
  l2a = products.discover_tile(str(roots / "l2a"))
  tif = products.discover_tile(str(roots / "tif"))
  assert l2a.name == "T31TFM" and l2a.crs == tif.crs == "EPSG:32631"
  assert (l2a.width, l2a.height, l2a.transform.a) == (SIZE, SIZE, 10)
  assert l2a.dates == tif.dates == fake_products.DATES and l2a.has_mask and tif.has_mask
  with products.TileReader(l2a) as reader:
    got = reader.read(window)
  with products.TileReader(tif) as reader:
    got_tif = reader.read(window)
  # The baseline 04.00 offset is removed; B10 is absent from L2A (zeros).
  np.testing.assert_array_equal(got.image, _expected(window, 4, b10=False))
  np.testing.assert_array_equal(got_tif.image, _expected(window, 4, b10=True))
  # A 10 m pixel at tile (row, col) holds B04's code of exactly that pixel.
  b04 = features.BANDS.index("B04")
  assert got.image[0, 3, 5, b04] == fake_products.encoded(0, b04, 6 + 3, 12 + 5, SIZE)
  np.testing.assert_array_equal(got.doy, [d.timetuple().tm_yday for d in fake_products.DATES])


def test_scl_marks_clouds_and_keep_drops_dates(roots):
  tile = products.discover_tile(str(roots / "tif"))
  with products.TileReader(tile) as reader:
    stack = reader.read(Window(0, 0, SIZE, SIZE))
  # Date 1: SCL shadow on 20 m columns 0-1; date 2: SCL cloud on 20 m rows 0-13 (of 18).
  np.testing.assert_allclose(stack.cloud_fraction, [0, 4 / SIZE, 28 / SIZE, 0])
  np.testing.assert_array_equal(stack.bad[1, :, :4], True)  # SCL 3 (shadow), 20 m -> 10 m
  kept = stack.keep(stack.cloud_fraction <= 0.5)
  assert kept.dates == tuple(d for i, d in enumerate(fake_products.DATES)
                             if i != fake_products.CLOUDY)
  np.testing.assert_array_equal(kept.image, np.delete(stack.image, fake_products.CLOUDY, 0))


def test_l1c_reads_b10_and_has_no_mask(roots):
  tile = products.discover_tile(str(roots / "l1c"))
  assert not tile.has_mask and len(tile.dates) == 2
  window = Window(6, 6, 12, 12)
  with products.TileReader(tile) as reader:
    np.testing.assert_array_equal(reader.read(window).image, _expected(window, 2, b10=True))


def test_products_of_one_date_are_merged(tmp_path):
  fake_products.write_geotiffs(str(tmp_path / "a"), SIZE, fake_products.DATES[:1])
  # A second product of the same date (YYYYMMDD name) fills the first one's no-data.
  fake_products.write_geotiffs(str(tmp_path / "b"), SIZE, fake_products.DATES[:1])
  first = tmp_path / "a" / fake_products.DATES[0].isoformat()
  shutil.move(tmp_path / "b" / fake_products.DATES[0].isoformat(),
              tmp_path / "a" / fake_products.DATES[0].strftime("%Y%m%d"))
  with rasterio.open(first / "B04.tif", "r+") as dst:
    data = dst.read(1)
    data[:6] = 0
    dst.write(data, 1)
  tile = products.discover_tile(str(tmp_path / "a"))
  assert len(tile.dates) == 1 and len(tile.product_names) == 2
  with products.TileReader(tile) as reader:
    stack = reader.read(Window(0, 0, SIZE, SIZE))
  np.testing.assert_array_equal(stack.image, _expected(Window(0, 0, SIZE, SIZE), 1, True))
  assert not stack.bad.any()


def test_errors(roots, tmp_path):
  with pytest.raises(ValueError, match="No Sentinel-2 products"):
    products.discover_tile(str(tmp_path))
  with pytest.raises(ValueError, match="not a folder"):
    products.discover_tile(str(tmp_path / "missing"))
  mixed = tmp_path / "mixed"
  fake_products.write_safe(str(mixed), SIZE, fake_products.DATES[:1])
  fake_products.write_safe(str(mixed), SIZE, fake_products.DATES[1:2], tile="T31TFN")
  with pytest.raises(ValueError, match=r"several tiles \['T31TFM', 'T31TFN'\]"):
    products.discover_tile(str(mixed))
  grids = tmp_path / "grids"
  fake_products.write_geotiffs(str(grids), SIZE, fake_products.DATES[:1])
  fake_products.write_geotiffs(str(grids), SIZE + 6, fake_products.DATES[1:2])
  with pytest.raises(ValueError, match="several tiles or grids"):
    products.discover_tile(str(grids))
  (grids / fake_products.DATES[1].isoformat() / "B8A.tif").unlink()
  with pytest.raises(ValueError, match=r"bands \['B8A'\] not found"):
    products.discover_tile(str(grids))
  with products.TileReader(products.discover_tile(str(roots / "tif"))) as reader:
    with pytest.raises(ValueError, match="multiple of 6"):
      reader.read(Window(0, 3, 12, 12))


def test_discover_tiles_expands_globs_and_selects_dates(roots):
  tiles = products.discover_tiles([str(roots / "l*")], start=fake_products.DATES[1])
  assert [len(t.dates) for t in tiles] == [1, 3]  # l1c, l2a
  with pytest.raises(ValueError, match="no folder matches"):
    products.discover_tiles([str(roots / "nothing*")])
