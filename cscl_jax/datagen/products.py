"""Sentinel-2 products of one tile: discovery in two layouts and windowed reads at 10 m.

Layouts read (one tile per folder; several products of one date are merged into one date):

* `.SAFE` folders, unzipped: L2A (`GRANULE/*/IMG_DATA/R10m|R20m|R60m/*_B??_??m.jp2`, each band
  taken at its native resolution, scene classification `SCL_20m.jp2`) or L1C
  (`GRANULE/*/IMG_DATA/*_B??.jp2`, no cloud mask). The radiometric offset of processing
  baseline 04.00+ (`BOA_ADD_OFFSET` / `RADIO_ADD_OFFSET` in `MTD_MSI*.xml`, -1000) is added back,
  so digital numbers mean reflectance x 1e4 across baselines.
* Per-date folders of single-band GeoTIFF/COG files, `<YYYY-MM-DD or YYYYMMDD>/<BAND>.tif`,
  BAND in B01..B12, B8A and optionally `SCL` (what STAC downloaders write), read as given.

B10 (cirrus) is absent from L2A products; it is read as zeros (nodata) then. Every other band
is required.

API (stable; `cscl_jax.predict` and `cscl_jax.datagen` build on it):

  tile = discover_tile("products/T31TFM", start=None, end=None)   # -> Tile, or ValueError
  tile.name, tile.crs, tile.transform, tile.width, tile.height    # the tile's 10 m grid
  tile.dates, tile.has_mask, tile.product_names
  with TileReader(tile) as reader:                                # caches open files
    stack = reader.read(rasterio.windows.Window(col, row, width, height))
  stack.image  uint16 [T, H, W, 13]  digital numbers in `features.BANDS` order at 10 m; 20 m and
                                     60 m bands resized by `resolution.resize_bilinear`
  stack.bad    bool   [T, H, W]      cloud, cloud shadow, snow, saturated (SCL) or no data
  stack.dates  tuple of datetime.date; stack.doy int32 [T]
  stack.keep(stack.cloud_fraction <= max_cloud)                   # drops cloudy dates

Window offsets and sizes are in 10 m pixels and must be multiples of 6 (one 60 m pixel), so the
window covers whole pixels of every band; parts outside the tile read as no data.
"""

import dataclasses
import datetime
import re
from typing import Sequence

from etils import epath
import numpy as np
import rasterio
from rasterio.windows import Window

from cscl_jax import features
from cscl_jax import resolution

# Scene classification (SCL) classes that make a pixel unusable: no data, saturated/defective,
# cloud shadow, cloud medium and high probability, thin cirrus, snow.
SCL_BAD = (0, 1, 3, 8, 9, 10, 11)
OPTIONAL_BANDS = ("B10",)
_SAFE_NAME = re.compile(
    r"S2[A-D]_MSIL(?P<level>1C|2A)_(?P<date>\d{8})T\d{6}_N(?P<baseline>\d{4})_R\d{3}_"
    r"T(?P<tile>\d{2}[A-Z]{3})_\w+")
_DATE_DIR = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")
_L2A_FILE = re.compile(r"_(B\d[\dA]|SCL)_(\d\d)m\.jp2$")
_L1C_FILE = re.compile(r"_(B\d[\dA])\.jp2$")
_OFFSET = re.compile(r"<(?:BOA|RADIO)_ADD_OFFSET[^>]*>\s*(-?\d+)\s*<")
_LAYOUT_HELP = ("expected unzipped Sentinel-2 *.SAFE folders (L2A or L1C) or per-date folders "
                "<YYYY-MM-DD or YYYYMMDD>/<BAND>.tif with BAND in B01..B12, B8A (+ SCL)")


@dataclasses.dataclass(frozen=True)
class Product:
  """The files of one product (one tile, one date).

  Attributes:
    name: product (or date folder) name.
    date: acquisition date.
    bands: band name -> file; every band of `features.BANDS` but the optional ones.
    scl: scene classification file, or None.
    offset: added to every non-zero digital number (-1000 for baseline 04.00+, else 0).
  """
  name: str
  date: datetime.date
  bands: dict[str, str]
  scl: str | None = None
  offset: int = 0


@dataclasses.dataclass(frozen=True)
class Tile:
  """A tile's 10 m grid and its products, grouped by date (sorted)."""
  name: str
  crs: rasterio.crs.CRS
  transform: rasterio.Affine
  width: int
  height: int
  acquisitions: tuple[tuple[Product, ...], ...]  # [dates][products of the date]
  source: str = ""

  @property
  def dates(self) -> tuple[datetime.date, ...]:
    return tuple(products[0].date for products in self.acquisitions)

  @property
  def has_mask(self) -> bool:
    """Whether every product has a scene classification (cloud) mask."""
    return all(p.scl for products in self.acquisitions for p in products)

  @property
  def product_names(self) -> tuple[str, ...]:
    return tuple(p.name for products in self.acquisitions for p in products)

  def select(self, start: datetime.date | None = None,
             end: datetime.date | None = None) -> "Tile":
    """Returns the tile with only the dates in [start, end]."""
    kept = tuple(a for a in self.acquisitions
                 if (start is None or a[0].date >= start) and (end is None or a[0].date <= end))
    return dataclasses.replace(self, acquisitions=kept)


@dataclasses.dataclass(frozen=True)
class Stack:
  """A window of a tile over its dates (see the module docstring)."""
  image: np.ndarray  # uint16 [T, H, W, 13]
  bad: np.ndarray  # bool [T, H, W]
  dates: tuple[datetime.date, ...]

  @property
  def doy(self) -> np.ndarray:
    return np.array([d.timetuple().tm_yday for d in self.dates], np.int32)  # [T]

  @property
  def cloud_fraction(self) -> np.ndarray:
    """Fraction of unusable pixels of each date, float [T]."""
    return self.bad.mean(axis=(1, 2)) if self.bad.size else np.zeros(len(self.dates))

  def keep(self, mask: np.ndarray) -> "Stack":
    """Returns the stack with only the dates where `mask` [T] is true."""
    mask = np.asarray(mask, bool)
    return Stack(self.image[mask], self.bad[mask],
                 tuple(d for d, m in zip(self.dates, mask) if m))


def _read_offset(safe: epath.Path) -> int | None:
  for metadata in list(safe.glob("MTD_MSI*.xml")):
    found = _OFFSET.search(metadata.read_text())
    return int(found.group(1)) if found else 0
  return None


def _safe_product(safe: epath.Path) -> tuple[str, Product]:
  """Returns (tile id, product) of one .SAFE folder."""
  name = _SAFE_NAME.match(safe.name)
  if not name:
    raise ValueError(f"{safe}: not a Sentinel-2 product name (S2?_MSIL2A|MSIL1C_<date>T..._N.."
                     f"_R..._T<tile>_....SAFE).")
  l2a = name["level"] == "2A"
  pattern = "GRANULE/*/IMG_DATA/R*m/*.jp2" if l2a else "GRANULE/*/IMG_DATA/*.jp2"
  found: dict[str, dict[int, str]] = {}
  for path in safe.glob(pattern):
    match = (_L2A_FILE if l2a else _L1C_FILE).search(path.name)
    if match:
      res = int(match.group(2)) if l2a else 10 * resolution.BAND_FACTOR.get(match.group(1), 1)
      found.setdefault(match.group(1), {})[res] = str(path)
  # Each band at its native resolution (L2A also holds coarser resamplings of finer bands).
  bands = {b: found[b].get(10 * f) for b, f in resolution.BAND_FACTOR.items() if b in found}
  scl = found.get("SCL", {}).get(20)
  offset = _read_offset(safe)
  if offset is None:  # No metadata file: the offset follows from the processing baseline.
    offset = -1000 if int(name["baseline"]) >= 400 else 0
  date = datetime.datetime.strptime(name["date"], "%Y%m%d").date()
  return "T" + name["tile"], Product(safe.name, date, {b: p for b, p in bands.items() if p},
                                     scl, offset)


def _dated_product(folder: epath.Path) -> Product:
  """Returns the product of one per-date folder of GeoTIFFs."""
  year, month, day = map(int, _DATE_DIR.match(folder.name).groups())
  files = {p.name.split(".")[0].upper(): str(p) for p in folder.iterdir()
           if p.name.lower().endswith((".tif", ".tiff"))}
  return Product(folder.name, datetime.date(year, month, day),
                 {b: files[b] for b in resolution.BAND_FACTOR if b in files}, files.get("SCL"))


def _grid(path: str) -> tuple[rasterio.crs.CRS, rasterio.Affine, int, int]:
  with rasterio.open(path) as src:
    return src.crs, src.transform, src.width, src.height


def discover_tile(root: str | epath.Path, start: datetime.date | None = None,
                  end: datetime.date | None = None) -> Tile:
  """Finds the products of one tile under `root` (a folder, or one .SAFE folder).

  Args:
    root: folder of *.SAFE products or of per-date GeoTIFF folders (local or gs://).
    start: first date kept (inclusive), or None.
    end: last date kept (inclusive), or None.

  Returns:
    The tile: its 10 m grid (from the first product's B04) and its products by date.

  Raises:
    ValueError: no products, a product lacking a band, or products of several tiles / grids.
  """
  root = epath.Path(root)
  if not root.is_dir():
    raise ValueError(f"--products: {root} is not a folder; {_LAYOUT_HELP}.")
  children = [root] if root.name.endswith(".SAFE") else sorted(root.iterdir())
  tiles, products = set(), []
  for child in children:
    if child.name.endswith(".SAFE") and child.is_dir():
      tile_id, product = _safe_product(child)
      tiles.add(tile_id)
      products.append(product)
    elif _DATE_DIR.match(child.name) and child.is_dir():
      products.append(_dated_product(child))
  if len(tiles) > 1:
    raise ValueError(f"{root} holds products of several tiles {sorted(tiles)}; one tile a "
                     f"folder: give each tile its own folder (--products=DIR1,DIR2).")
  if not products:
    raise ValueError(f"No Sentinel-2 products in {root}: {_LAYOUT_HELP}.")
  for p in products:
    missing = [b for b in features.BANDS if b not in p.bands and b not in OPTIONAL_BANDS]
    if missing:
      raise ValueError(f"{root}/{p.name}: bands {missing} not found; {_LAYOUT_HELP}.")
  products.sort(key=lambda p: (p.date, p.name))
  crs, transform, width, height = _grid(products[0].bands["B04"])
  if not np.isclose(abs(transform.a), 10) or not np.isclose(abs(transform.e), 10):
    raise ValueError(f"{products[0].bands['B04']}: B04 has {transform.a, -transform.e} m "
                     f"pixels; the grid must be the 10 m one.")
  for p in products[1:]:
    grid = _grid(p.bands["B04"])
    if grid != (crs, transform, width, height):
      raise ValueError(
          f"{root}: products of several tiles or grids: {products[0].name} is {crs} "
          f"{tuple(transform)[:6]} {width}x{height}, {p.name} is {grid[0]} "
          f"{tuple(grid[1])[:6]} {grid[2]}x{grid[3]}. Give each tile its own folder.")
  by_date: dict[datetime.date, list[Product]] = {}
  for p in products:
    by_date.setdefault(p.date, []).append(p)
  name = tiles.pop() if tiles else root.name
  tile = Tile(name, crs, transform, width, height,
              tuple(tuple(ps) for ps in by_date.values()), str(root))
  return tile.select(start, end)


def discover_tiles(roots: Sequence[str], start: datetime.date | None = None,
                   end: datetime.date | None = None) -> list[Tile]:
  """Returns `discover_tile` of each root; roots may be globs (`products/T31*`)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (gfile globs gs:// too)
  expanded = []
  for root in roots:
    matches = sorted(tf.io.gfile.glob(root)) if any(c in root for c in "*?[") else [root]
    if not matches:
      raise ValueError(f"--products: no folder matches {root!r}.")
    expanded.extend(matches)
  return [discover_tile(root, start, end) for root in expanded]


class TileReader:
  """Reads windows of a tile; keeps its files open. Use as a context manager."""

  def __init__(self, tile: Tile):
    self.tile = tile
    self._open: dict[str, rasterio.DatasetReader] = {}

  def __enter__(self) -> "TileReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    for src in self._open.values():
      src.close()
    self._open.clear()

  def _source(self, path: str) -> tuple[rasterio.DatasetReader, int]:
    """Returns the open file and its pixel size in 10 m pixels, checking its grid."""
    if path not in self._open:
      src = rasterio.open(path)
      factor = int(round(src.transform.a / self.tile.transform.a))
      if (factor not in (1, 2, 6) or src.crs != self.tile.crs
          or not np.allclose([src.transform.c, src.transform.f],
                             [self.tile.transform.c, self.tile.transform.f])):
        src.close()
        raise ValueError(f"{path}: not on the grid of tile {self.tile.name} ({self.tile.crs}, "
                         f"origin {self.tile.transform.c, self.tile.transform.f}).")
      self._open[path] = src
    src = self._open[path]
    return src, int(round(src.transform.a / self.tile.transform.a))

  def _read(self, path: str, window: Window, offset: int = 0) -> np.ndarray:
    """Reads one file's window at its native resolution, [h / f, w / f]."""
    src, factor = self._source(path)
    native = Window(window.col_off // factor, window.row_off // factor,
                    window.width // factor, window.height // factor)
    inside = (native.col_off >= 0 and native.row_off >= 0
              and native.col_off + native.width <= src.width
              and native.row_off + native.height <= src.height)
    data = src.read(1, window=native, boundless=not inside, fill_value=0)
    if offset:
      data = np.where(data > 0, np.maximum(data.astype(np.int32) + offset, 1), 0)
    return data

  def _product(self, product: Product, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image [H, W, 13] float, bad [H, W]) of one product."""
    height, width = int(window.height), int(window.width)
    bands = []
    for band in features.BANDS:
      if band not in product.bands:
        bands.append(np.zeros((height, width)))
        continue
      data = self._read(product.bands[band], window, product.offset).astype(np.float64)
      if data.shape != (height, width):
        data = resolution.resize_bilinear(data, height, width)
      bands.append(data)
    image = np.clip(np.rint(np.stack(bands, axis=-1)), 0, 65535)  # [H, W, 13]
    bad = (image[..., :4] == 0).any(axis=-1)  # no data in a 10 m band
    if product.scl:
      scl = self._read(product.scl, window)
      repeat = height // scl.shape[0]
      scl = np.repeat(np.repeat(scl, repeat, axis=0), repeat, axis=1)  # [H, W], nearest
      bad |= np.isin(scl, SCL_BAD)
    return image, bad

  def read(self, window: Window) -> Stack:
    """Reads `window` (10 m pixels, multiples of 6) of every band over every date."""
    parts = (window.col_off, window.row_off, window.width, window.height)
    if any(int(v) != v or v % resolution.ALIGNMENT for v in parts) or min(parts[2:]) <= 0:
      raise ValueError(f"Window {parts} (col, row, width, height): every value must be a "
                       f"multiple of {resolution.ALIGNMENT} 10 m pixels (one 60 m pixel).")
    images, bads = [], []
    for products in self.tile.acquisitions:
      image, bad = self._product(products[0], window)
      for other in products[1:]:  # Fill the first product's gaps from the others.
        more, more_bad = self._product(other, window)
        use = bad & ~more_bad
        image = np.where(use[..., None], more, image)
        bad &= more_bad
      images.append(image.astype(np.uint16))
      bads.append(bad)
    height, width = int(window.height), int(window.width)
    return Stack(
        np.stack(images) if images else np.zeros((0, height, width, features.NUM_BANDS),
                                                 np.uint16),
        np.stack(bads) if bads else np.zeros((0, height, width), bool),
        self.tile.dates)
