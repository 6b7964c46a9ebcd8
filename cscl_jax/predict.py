"""Predicts a crop map of a whole Sentinel-2 tile (or part of it) to a GeoTIFF.

  python -m cscl_jax.predict --workdir=workdirs/finetune --products=products/T31TFM \
      --out=map.tif [--checkpoint=best] [--start=2018-01-01 --end=2018-12-31] \
      [--bounds=minx,miny,maxx,maxy [--bounds_crs=EPSG:4326]] [--probabilities=probs.tif]

Reads the products as `cscl_jax.datagen` does (`datagen.products`: .SAFE folders or per-date
GeoTIFF folders of one tile) and slides `img_res` windows over the tile with `--overlap`
pixels of overlap, in row-major order. Each window is prepared as its training examples were:
the window's dates whose unusable (cloud, shadow, no data) fraction exceeds `--max_cloud` are
dropped, then `input_pipeline.preprocess` selects `max_seq_len` dates
(config.dataset.time_sampling) and scales bands and day of year. Windows are batched over the
local devices (pmap, as training), their logits blended (`tiling`: "blend" weights falling off
towards window edges, or "centre": each pixel from the window whose centre is nearest) and
written strip by strip (`maps`): uint8 classes on the products' 10 m grid
(x output_magnification), 255 where no kept date had a valid observation. Memory holds one
strip of the map and one batch of windows, whatever the tile's size.

By default each window is read alone, exactly as dataset generation reads its examples;
`--windows_per_read=N` reads N neighbouring windows at once (faster; the 20 m / 60 m bands
are then interpolated with their true neighbours at window edges instead of clamped, so
inputs differ within one coarse pixel of the edges).
"""

import datetime
import functools
import itertools
import json
import math
import time
from typing import Any, Callable, Iterator

from absl import app
from absl import flags
from absl import logging
from flax import jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import rasterio
import rasterio.warp
from rasterio.windows import Window
import tensorflow_datasets as tfds
import tqdm

from cscl_jax import checkpoints
from cscl_jax import console
from cscl_jax import features
from cscl_jax import input_pipeline
from cscl_jax import maps
from cscl_jax import models
from cscl_jax import resolution
from cscl_jax import tiling
from cscl_jax import train
from cscl_jax.datagen import products


def area_window(tile: products.Tile, bounds: tuple[float, ...] | None = None,
                bounds_crs: str | None = None) -> Window:
  """The tile's pixels to map: `bounds` snapped outwards to 60 m pixels, within the tile.

  Raises:
    ValueError: if the bounds do not overlap the tile.
  """
  a = resolution.ALIGNMENT
  if bounds is None:
    return Window(0, 0, tile.width // a * a, tile.height // a * a)
  if bounds_crs:
    bounds = rasterio.warp.transform_bounds(bounds_crs, tile.crs, *bounds)
  w = rasterio.windows.from_bounds(*bounds, transform=tile.transform)
  col0, row0 = (max(0, math.floor(v / a) * a) for v in (w.col_off, w.row_off))
  col1 = min(tile.width // a * a, math.ceil((w.col_off + w.width) / a) * a)
  row1 = min(tile.height // a * a, math.ceil((w.row_off + w.height) / a) * a)
  if col1 <= col0 or row1 <= row0:
    left, top = tile.transform @ (0, 0)
    right, bottom = tile.transform @ (tile.width, tile.height)
    raise ValueError(f"--bounds={bounds} (in {tile.crs}) do not overlap tile {tile.name} "
                     f"({left}, {bottom}, {right}, {top}); pass --bounds_crs if they are in "
                     "another CRS.")
  return Window(col0, row0, col1 - col0, row1 - row0)


def check_products(tile: products.Tile, config: ml_collections.ConfigDict,
                   min_dates: int) -> None:
  """One clear error where the products or the run cannot make a map."""
  m, problems = config.model, []
  if m.stage == "pretrain":
    problems.append("the run is a CSCL pre-training (no classifier): pass the workdir of a "
                    "finetune or supervised run")
  if m.num_channels != features.NUM_BANDS + 1:
    problems.append(f"the model takes {m.num_channels} channels, the products give "
                    f"{features.NUM_BANDS} bands + day of year = {features.NUM_BANDS + 1}")
  if not tile.crs or not tile.crs.is_projected:
    problems.append(f"the products' CRS {tile.crs} is not a projected (metric) one")
  min_dates = min_dates or m.max_seq_len
  if len(tile.dates) < min_dates:
    problems.append(f"{len(tile.dates)} dates {[str(d) for d in tile.dates]}, the model "
                    f"was trained on {m.max_seq_len}: widen --start/--end, add products, or "
                    f"lower --min_dates (now {min_dates})")
  if problems:
    raise ValueError(f"Cannot map {tile.source} with {m.name}/{m.stage}:\n  "
                     + "\n  ".join(problems))
  if not tile.has_mask:
    logging.warning("Some products have no cloud mask (L1C, or no SCL.tif): only their "
                    "no-data pixels count as unusable.")


def prepare_window(stack: products.Stack, config: ml_collections.ConfigDict,
                   max_cloud: float) -> tuple[np.ndarray, np.ndarray]:
  """A window's model inputs, as its training examples were made.

  Args:
    stack: the window's [T, S, S, 13] digital numbers and unusable pixels over all dates.
    config: the run's config.
    max_cloud: dates with a larger unusable fraction are dropped (dataset generation's rule).

  Returns:
    (inputs float32 [max_seq_len, S, S, 14], observed bool [S, S]: some kept date is usable).
  """
  stack = stack.keep(stack.cloud_fraction <= max_cloud)
  m = config.dataset.label_magnification
  size = stack.bad.shape[1:]  # no labels to predict from: placeholders on the label grid
  example = {"image": stack.image, "doy": stack.doy,
             features.label_key(m): np.zeros((m * size[0], m * size[1]), np.int32)}
  if m > 1:
    example["labels"] = np.zeros(size, np.int32)
  inputs = input_pipeline.preprocess(example, config)["inputs"]
  return inputs.numpy(), (~stack.bad).any(axis=0)


def make_forward(config: ml_collections.ConfigDict, variables: Any,
                 batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
  """Eval-mode logits of up to `batch_size` windows, split over the local devices.

  Returns:
    forward(inputs [B, T, S, S, C]) -> float32 logits [B, S*m, S*m, N].
  """
  devices = jax.local_device_count()
  if batch_size % devices:
    raise ValueError(f"--batch_size={batch_size} must be a multiple of the {devices} devices.")
  model = models.create_model(config.model, dtype=jnp.dtype(config.dtype))
  apply = jax.pmap(functools.partial(model.apply, train=False))
  replicated = jax_utils.replicate(variables)

  def forward(inputs):
    padded = np.zeros((batch_size,) + inputs.shape[1:], np.float32)
    padded[:len(inputs)] = inputs
    logits = apply(replicated, padded.reshape((devices, -1) + inputs.shape[1:]))
    return np.asarray(logits, np.float32).reshape((batch_size,) + logits.shape[2:])[
        :len(inputs)]

  return forward


def _windows(reader: products.TileReader, area: Window, grid: tiling.Grid,
             config: ml_collections.ConfigDict, windows_per_read: int, max_cloud: float
             ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
  """Yields (i, j, inputs, observed) of the grid's windows in row-major order."""
  size = grid.window
  for i, row in enumerate(grid.rows):
    for first in range(0, len(grid.cols), windows_per_read):
      cols = range(first, min(first + windows_per_read, len(grid.cols)))
      left = grid.cols[cols[0]]
      stack = reader.read(Window(area.col_off + left, area.row_off + row,
                                 grid.cols[cols[-1]] + size - left, size))
      for j in cols:
        c = grid.cols[j] - left
        window = products.Stack(stack.image[:, :, c:c + size], stack.bad[:, :, c:c + size],
                                stack.dates)
        yield (i, j, *prepare_window(window, config, max_cloud))


def predict_area(reader: products.TileReader, area: Window, config: ml_collections.ConfigDict,
                 forward: Callable[[np.ndarray], np.ndarray], writer: maps.MapWriter, *,
                 stride: int, blending: str, batch_size: int, windows_per_read: int,
                 max_cloud: float, progress: bool = True) -> int:
  """Predicts `area` of the reader's tile window by window into `writer`; returns #windows.

  Batches run across window rows (no batch is padded but the last); a row of the map is
  written as soon as the windows of the next row start to arrive.
  """
  scale = config.model.get("output_magnification", 1)
  grid = tiling.make_grid(int(area.height), int(area.width), config.model.img_res, stride,
                          blending=blending, scale=scale)
  blender = tiling.StripBlender(grid, config.model.num_classes)
  windows = _windows(reader, area, grid, config, windows_per_read, max_cloud)
  row = 0  # the first row of windows not yet written
  with tqdm.tqdm(total=grid.num_windows, unit="window", disable=not progress) as bar:
    while batch := list(itertools.islice(windows, batch_size)):
      logits = forward(np.stack([inputs for _, _, inputs, _ in batch]))
      for (i, j, _, observed), window_logits in zip(batch, logits):
        while row < i:  # Row `row` has all its windows: write what it finished.
          writer.write(*blender.finish_row(row))
          row += 1
        observed = np.repeat(np.repeat(observed, scale, 0), scale, 1)
        blender.add(i, j, window_logits, observed)
      bar.update(len(batch))
  writer.write(*blender.finish_row(row))
  return grid.num_windows


def class_names(config: ml_collections.ConfigDict) -> list[str]:
  """The class names of the run's dataset if it is on disk, else class_0, class_1, ...

  Never builds a dataset: a registered one (synthetic, T31TFM) must be prepared; any other
  name is a dataset written by `cscl_jax.datagen`, read through `input_pipeline`.
  """
  d, num_classes = config.dataset, config.model.num_classes
  names = None
  try:
    builder = tfds.builder(f"{d.name}/{d.config}", data_dir=d.data_dir)
    if builder.is_prepared():
      names = list(builder.info.metadata["class_names"])
  except tfds.core.registered.DatasetNotFoundError:
    try:
      names = list(input_pipeline.dataset_info(config).class_names)
    except (ValueError, FileNotFoundError) as e:
      logging.warning("%s", e)
  if names is not None and len(names) == num_classes:
    return names
  logging.warning("Dataset %s/%s is not on disk (config.dataset.data_dir=%s): classes are "
                  "named class_<i>.", d.name, d.config, d.data_dir)
  return [f"class_{i}" for i in range(num_classes)]


def _date(text: str | None) -> datetime.date | None:
  return datetime.date.fromisoformat(text) if text else None


def predict_tile(workdir: str, products_dir: str, out: str, *, checkpoint: str = "best",
                 probabilities: str | None = None, bounds: tuple[float, ...] | None = None,
                 bounds_crs: str | None = None, start: str | None = None,
                 end: str | None = None, overlap: int = 12, blending: str = "blend",
                 batch_size: int = 0, windows_per_read: int = 1, max_cloud: float = 0.5,
                 min_dates: int = 0, progress: bool = True) -> dict[str, Any]:
  """Writes the crop map of a tile's products with a run's checkpoint (see the flags).

  Returns:
    {"windows", "seconds", "windows_per_second", "step"} of the prediction.
  """
  config = checkpoints.load_config(workdir)
  tile = products.discover_tile(products_dir, _date(start), _date(end))
  check_products(tile, config, min_dates)
  size, a = config.model.img_res, resolution.ALIGNMENT
  stride = size - overlap
  if size % a or stride % a or not 0 < stride <= size:
    raise ValueError(f"--overlap={overlap}: the window ({size} pixels) and the stride "
                     f"between windows ({stride}) must be positive multiples of {a} pixels "
                     "(one 60 m pixel), with the overlap >= 0.")
  area = area_window(tile, bounds, bounds_crs)
  state, step = train.restore_state(workdir, config, checkpoint)
  batch_size = batch_size or config.batch_size
  forward = make_forward(config, {"params": state.params, "batch_stats": state.batch_stats},
                         batch_size)
  scale = config.model.get("output_magnification", 1)
  tags = {"MODEL": f"{workdir} step {step} ({config.model.name}/{config.model.stage})",
          "DATES": json.dumps([str(d) for d in tile.dates]), "BLENDING": blending}
  logging.info("Mapping %s (%d x %d pixels, %d dates) with step %d of %s.", tile.name,
               area.width, area.height, len(tile.dates), step, workdir)
  started = time.perf_counter()
  with products.TileReader(tile) as reader, maps.MapWriter(
      out, crs=tile.crs, transform=maps.map_transform(tile.transform, area.col_off,
                                                      area.row_off, scale),
      width=int(area.width) * scale, height=int(area.height) * scale,
      class_names=class_names(config), probabilities_path=probabilities, tags=tags) as writer:
    windows = predict_area(reader, area, config, forward, writer, stride=stride,
                           blending=blending, batch_size=batch_size,
                           windows_per_read=windows_per_read, max_cloud=max_cloud,
                           progress=progress)
  seconds = time.perf_counter() - started
  logging.info("Wrote %s: %d windows in %.1f s (%.1f windows/s).", out, windows, seconds,
               windows / seconds)
  return {"windows": windows, "seconds": seconds, "windows_per_second": windows / seconds,
          "step": step}


def _define_flags() -> None:
  """The command line (defined only when run, so that tests import several entry points)."""
  for name, default, text in (
      ("workdir", None, "Directory of the training run (finetune or supervised stage)."),
      ("products", None, "Folder of one tile's products (.SAFE or per-date GeoTIFF folders)."),
      ("out", None, "Class map GeoTIFF to write."),
      ("checkpoint", "best", "'best', 'latest' or a step number."),
      ("probabilities", None, "If set, also write per-class probabilities to this GeoTIFF."),
      ("bounds", None, "minx,miny,maxx,maxy of the area to map (default: the whole tile)."),
      ("bounds_crs", None, "CRS of --bounds, e.g. EPSG:4326 (default: the tile's)."),
      ("start", None, "First date to use, YYYY-MM-DD (default: the first product's)."),
      ("end", None, "Last date to use, YYYY-MM-DD (default: the last product's)."),
      ("blending", "blend", "'blend' (weights falling off to window edges) or 'centre'.")):
    flags.DEFINE_string(name, default, text)
  flags.DEFINE_integer("overlap", 12, "Pixels of overlap between neighbouring windows.")
  flags.DEFINE_integer("batch_size", 0, "Windows per step, all devices (0: the run's).")
  flags.DEFINE_integer("windows_per_read", 1, "Neighbouring windows read at once.")
  flags.DEFINE_float("max_cloud", 0.5, "Drop a window's dates with a larger unusable "
                     "fraction (as dataset generation; its default is 0.5).")
  flags.DEFINE_integer("min_dates", 0, "Refuse products with fewer dates (0: max_seq_len).")
  flags.mark_flags_as_required(["workdir", "products", "out"])


def main(argv):
  console.start_tool(argv)
  f = flags.FLAGS
  bounds = tuple(float(v) for v in f.bounds.split(",")) if f.bounds else None
  if bounds is not None and len(bounds) != 4:
    raise app.UsageError(f"--bounds={f.bounds!r}: give minx,miny,maxx,maxy.")
  predict_tile(f.workdir, f.products, f.out, checkpoint=f.checkpoint,
               probabilities=f.probabilities, bounds=bounds, bounds_crs=f.bounds_crs,
               start=f.start, end=f.end, overlap=f.overlap, blending=f.blending,
               batch_size=f.batch_size, windows_per_read=f.windows_per_read,
               max_cloud=f.max_cloud, min_dates=f.min_dates)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
