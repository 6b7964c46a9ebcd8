"""GeoTIFF crop maps, written strip by strip as the windows of a tile are predicted.

The class map is uint8, one band: the class index, NODATA (255) where no date had a valid
observation; tiled, deflate-compressed, with a colour table and the class names in the
metadata (tag CLASS_NAMES, a JSON list, and CLASS_<i>=<name>), so QGIS shows the classes at
once. The optional probability map has one uint8 band per class (described by the class name):
round(p x 254) with a scale of 1/254 in the metadata, NODATA as above.
"""

import json
from typing import Any, Sequence

import numpy as np
import rasterio
from rasterio.windows import Window

from cscl_jax import visualize

NODATA = 255
PROBABILITY_SCALE = 254  # a stored value v means the probability v / 254
BLOCK = 256


def map_transform(transform: rasterio.Affine, col_off: int, row_off: int,
                  scale: int) -> rasterio.Affine:
  """Geotransform of a map starting at (col_off, row_off) of a grid, `scale` x finer."""
  return (transform @ rasterio.Affine.translation(col_off, row_off)
          @ rasterio.Affine.scale(1 / scale))


def softmax(logits: np.ndarray) -> np.ndarray:
  """Softmax over the last axis, float32."""
  shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)


class MapWriter:
  """Writes the class map (and probabilities) of an area; a context manager.

  Usage: with MapWriter(...) as writer: writer.write(top, logits, observed) for each strip.
  """

  def __init__(self, path: str, *, crs: Any, transform: rasterio.Affine, width: int,
               height: int, class_names: Sequence[str], probabilities_path: str | None = None,
               tags: dict[str, str] | None = None):
    """Opens the files.

    Args:
      path: the class map GeoTIFF.
      crs: the grid's CRS.
      transform: the map's geotransform (see `map_transform`).
      width, height: the map's size in pixels.
      class_names: the N < 255 class names.
      probabilities_path: if given, also write per-class probabilities there.
      tags: more metadata (e.g. the model and the dates used).
    """
    if len(class_names) >= NODATA:
      raise ValueError(f"{len(class_names)} classes do not fit a uint8 map with nodata "
                       f"{NODATA}.")
    profile = dict(driver="GTiff", width=width, height=height, dtype="uint8", crs=crs,
                   transform=transform, nodata=NODATA, tiled=True, blockxsize=BLOCK,
                   blockysize=BLOCK, compress="deflate", BIGTIFF="IF_SAFER")
    names = list(class_names)
    all_tags = {"CLASS_NAMES": json.dumps(names), **(tags or {}),
                **{f"CLASS_{i}": name for i, name in enumerate(names)}}
    self._classes = rasterio.open(path, "w", count=1, **profile)
    self._classes.update_tags(**all_tags)
    self._classes.set_band_description(1, "class")
    colours = np.round(visualize.class_colors(len(names)) * 255).astype(int)
    self._classes.write_colormap(1, {i: tuple(c) for i, c in enumerate(colours)})
    self._probabilities = None
    if probabilities_path:
      self._probabilities = rasterio.open(probabilities_path, "w", count=len(names),
                                          interleave="pixel", **profile)
      self._probabilities.update_tags(**all_tags)
      self._probabilities.scales = (1 / PROBABILITY_SCALE,) * len(names)
      for band, name in enumerate(names, start=1):
        self._probabilities.set_band_description(band, name)

  def write(self, top: int, logits: np.ndarray, observed: np.ndarray) -> None:
    """Writes map rows [top, top + h) from logits [h, W, N] and observed bool [h, W]."""
    height, width = observed.shape
    window = Window(0, top, width, height)
    classes = np.where(observed, np.argmax(logits, axis=-1), NODATA).astype(np.uint8)
    self._classes.write(classes, 1, window=window)
    if self._probabilities is not None:
      scaled = np.round(softmax(logits) * PROBABILITY_SCALE).astype(np.uint8)  # [h, W, N]
      scaled[~observed] = NODATA
      self._probabilities.write(np.moveaxis(scaled, -1, 0), window=window)

  def close(self) -> None:
    for dataset in (self._classes, self._probabilities):
      if dataset is not None:
        dataset.close()

  def __enter__(self) -> "MapWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
