"""The per-window work of dataset generation, as a plain loop or as Apache Beam transforms.

`generate` plans the windows of every (tile, year) in the driver (parcels read once a tile,
windows touching a parcel, splits by spatial block), then builds each window's example with
`WindowBuilder.build`: rasterise its labels (skip it if too few are labelled), read its bands
over the year's dates (windowed reads; no process ever holds a whole tile), drop the dates
whose unusable fraction exceeds `max_cloud`. With `workers=1` and no Beam options a plain loop
in this process builds the examples; otherwise each split is `beam.Create(windows) |
beam.Reshuffle() | beam.ParDo(_BuildWindows)` run by TFDS's Beam writer (the DirectRunner in
multi-processing mode for `workers=N`, or any runner given in `beam_options`). Both write the
same examples under the same keys "<tile>/<year>/r<row>c<col>".

The output is a TFDS dataset `<out>/<name>/default/1.0.0`, written by TFDS into a temporary
folder renamed when complete (a half-written output never looks complete).
"""

import collections
import dataclasses
import datetime
import json
import uuid

import apache_beam as beam
from etils import epath
import numpy as np
import rasterio
from rasterio.windows import Window
import tensorflow_datasets as tfds
from tensorflow_datasets.core.dataset_builders import adhoc_builder
import tqdm

from cscl_jax import features
from cscl_jax.datagen import parcels as parcels_lib
from cscl_jax.datagen import products
from cscl_jax.datagen import windows as windows_lib

VERSION = "1.0.0"
CHUNK = 16  # windows a Beam element
CONFIG = "default"


@dataclasses.dataclass(frozen=True)
class Options:
  """Settings of the per-window work (see `python -m cscl_jax.datagen --help`)."""
  parcels: str
  class_column: str
  class_names: tuple[str, ...] = ()  # filled by generate.plan
  label_map: dict[str, str] | None = None
  id_column: str | None = None
  window: int = 48
  label_res: float = 10.0
  max_cloud: float = 0.5
  min_labelled: float = 0.05
  min_coverage: float = 0.5
  supersample: int = 4

  @property
  def magnification(self) -> int:
    return int(round(10 / self.label_res))


def dataset_features(magnification: int) -> tfds.features.FeaturesDict:
  """`features.sits_features()`, plus `labels_x{m}` / `parcel_ids_x{m}` at 10 / m metres."""
  return features.sits_features(
      label_magnifications=(magnification,) if magnification > 1 else ())


def tile_parcels(tile: products.Tile, options: Options) -> parcels_lib.Parcels:
  """The parcels of a tile, in its CRS, mapped to `options.class_names`."""
  bounds = tile.bounds
  frame = parcels_lib.read(options.parcels, options.class_column, options.id_column, bounds,
                           tile.crs)
  return parcels_lib.for_tile(frame, tile.crs, bounds, options.label_map, options.class_names)


class WindowBuilder:
  """Builds the examples of windows of `tiles`; keeps the current tile's files and parcels.

  Counts what it does in `stats`; `flush(folder)` adds them as one JSON file to `folder`
  (each worker writes its own, `generate` sums them into the summary).
  """

  def __init__(self, tiles: list[products.Tile], options: Options):
    self.tiles = tiles
    self.options = options
    self.stats = collections.Counter()
    self._tile = None  # index of the tile whose reader is open
    self._source = None  # folder of the tile whose parcels are held (one for all its years)
    self._reader: products.TileReader | None = None
    self._parcels = None

  def _use(self, index: int) -> None:
    if index == self._tile:
      return
    tile = self.tiles[index]
    if self._reader is not None:
      self._reader.close()
    self._reader, self._tile = products.TileReader(tile), index
    if tile.source != self._source:
      self._parcels, self._source = tile_parcels(tile, self.options).frame, tile.source

  def flush(self, folder: str) -> None:
    """Writes `stats` to a new JSON file in `folder` and clears them."""
    if self.stats:
      path = epath.Path(folder)
      path.mkdir(parents=True, exist_ok=True)
      (path / f"{uuid.uuid4().hex}.json").write_text(json.dumps(dict(self.stats)))
      self.stats.clear()

  def close(self) -> None:
    if self._reader is not None:
      self._reader.close()
    self._tile, self._source, self._reader, self._parcels = None, None, None, None

  def _labels(self, spec: windows_lib.WindowSpec, m: int) -> tuple[np.ndarray, np.ndarray]:
    o = self.options
    transform = (self.tiles[self._tile].transform * rasterio.Affine.translation(
        spec.col, spec.row) * rasterio.Affine.scale(1 / m))
    return parcels_lib.rasterize(self._parcels, transform, (o.window * m, o.window * m),
                                 len(o.class_names), o.min_coverage, o.supersample)

  def build(self, task: tuple[int, windows_lib.WindowSpec]
            ) -> tuple[str, dict[str, np.ndarray]] | None:
    """Returns (key, example) of a window, or None if it has too few labels or no clear date."""
    index, spec = task
    self._use(index)
    o = self.options
    labels, ids = self._labels(spec, 1)  # [S, S] each
    if np.mean(labels != len(o.class_names)) < o.min_labelled:
      self.stats["windows_few_labels"] += 1
      return None
    stack = self._reader.read(Window(spec.col, spec.row, o.window, o.window))
    clear = stack.cloud_fraction <= o.max_cloud
    self.stats.update(dates_kept=int(clear.sum()), dates_dropped=int((~clear).sum()))
    stack = stack.keep(clear)
    if not stack.dates:
      self.stats["windows_no_clear_date"] += 1
      return None
    self.stats[f"windows_{spec.split}"] += 1
    for c, n in enumerate(np.bincount(labels.ravel(), minlength=len(o.class_names) + 1)):
      self.stats[f"pixels_{c}"] += int(n)
    example = {"image": stack.image, "doy": stack.doy, "labels": labels, "parcel_ids": ids}
    if o.magnification > 1:
      fine_labels, fine_ids = self._labels(spec, o.magnification)  # [mS, mS] each
      example[f"labels_x{o.magnification}"] = fine_labels
      example[f"parcel_ids_x{o.magnification}"] = fine_ids
    return spec.key, example


class _BuildWindows(beam.DoFn):
  """Beam form of `WindowBuilder.build`: one builder per worker."""

  def __init__(self, tiles: list[products.Tile], options: Options, stats_dir: str):
    super().__init__()
    self._tiles, self._options, self._stats_dir = tiles, options, stats_dir
    self._builder = None

  def setup(self):
    self._builder = WindowBuilder(self._tiles, self._options)

  def process(self, chunk):
    for task in chunk:
      result = self._builder.build(task)
      if result is not None:
        yield result

  def finish_bundle(self):
    self._builder.flush(self._stats_dir)

  def teardown(self):
    if self._builder is not None:
      self._builder.close()


def loop(tiles: list[products.Tile], options: Options, tasks: list, split: str,
         stats_dir: str):
  """Yields (key, example) of `tasks` [(tile index, WindowSpec)] in this process."""
  builder = WindowBuilder(tiles, options)
  try:
    for task in tqdm.tqdm(tasks, desc=f"datagen {split}", unit="window", mininterval=10):
      result = builder.build(task)
      if result is not None:
        yield result
  finally:
    builder.flush(stats_dir)
    builder.close()


def build_transform(tiles: list[products.Tile], options: Options, tasks: list,
                    stats_dir: str) -> beam.PTransform:
  """The Beam transform yielding (key, example) of `tasks` [(tile index, WindowSpec)].

  Beam elements are runs of `CHUNK` consecutive tasks (neighbouring windows, see
  `windows.plan`), so that a worker reads neighbouring windows from GDAL's block cache.
  """
  chunks = [tasks[i:i + CHUNK] for i in range(0, len(tasks), CHUNK)]
  return (beam.Create(chunks) | "Reshuffle" >> beam.Reshuffle()
          | "BuildWindows" >> beam.ParDo(_BuildWindows(tiles, options, stats_dir)))


class DatasetBuilder(adhoc_builder.AdhocBuilder, skip_registration=True):
  """AdhocBuilder that records metadata (class names, products, parcels, options)."""

  def __init__(self, *, metadata: dict, **kwargs):
    self._metadata = metadata
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self._description, features=self._feature_spec,
        metadata=tfds.core.MetadataDict(self._metadata))


def tile_years(tiles: list[products.Tile]) -> list[tuple[int, products.Tile]]:
  """Each tile split into one tile a calendar year of its dates: [(year, tile)]."""
  return [(year, tile.select(datetime.date(year, 1, 1), datetime.date(year, 12, 31)))
          for tile in tiles for year in sorted({d.year for d in tile.dates})]
