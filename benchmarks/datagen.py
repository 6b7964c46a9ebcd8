"""Dataset generation speed: windows/s at 1, 2 and N workers, extrapolated to tiles.

  python -m benchmarks.datagen [--size=480 --dates=6 --window=48 --workers=1,2,4 \
      --layouts=jp2,tif]

Writes fake L2A products (JPEG 2000, as Copernicus ships them) and per-date GeoTIFFs (tiled
deflate, as STAC downloaders write COGs) of one `size`² tile, fields of 20 x 20 pixels all
over it, then times `cscl_jax.datagen.generate` end to end (planning, reads, labels, TFDS
writing): in this process for 1 worker, on the Beam DirectRunner (multi-processing) for more.
From the per-window cost at 1 worker it extrapolates to one full tile (10,980², 30 dates) and
to 100 tiles on a Dataflow-sized fleet, assuming the cost grows with the dates (reads dominate)
and workers scale linearly (windows are independent).
"""

import datetime
import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

from cscl_jax.datagen import fake_products
from cscl_jax.datagen import generate
from cscl_jax.datagen import pipeline
from cscl_jax.datagen import products

_SIZE = flags.DEFINE_integer("size", 480, "Tile side in 10 m pixels (multiple of 6).")
_DATES = flags.DEFINE_integer("dates", 6, "Dates of the fake products.")
_WINDOW = flags.DEFINE_integer("window", 48, "Window size.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2", str(os.cpu_count())], "Worker counts.")
_LAYOUTS = flags.DEFINE_list("layouts", ["jp2", "tif"], "Product layouts to time.")
_FLEET = flags.DEFINE_integer("fleet_cores", 400, "Dataflow fleet, e.g. 100 x n1-standard-4.")

FULL_TILE = 10980
FULL_DATES = 30


def _run(root: str, layout: str, workers: int, out: str) -> tuple[int, float]:
  tiles = products.discover_tiles([os.path.join(root, layout)])
  options = pipeline.Options(parcels=os.path.join(root, "parcels.gpkg"),
                             class_column="CODE_CULTU", window=_WINDOW.value,
                             label_map=fake_products.LABEL_MAP)
  start = time.perf_counter()
  _, summary = generate.generate(tiles, options, out, f"{layout}_{workers}", {"train": 1.0},
                                 workers=workers)
  return sum(summary["windows"].values()), time.perf_counter() - start


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  size, window = _SIZE.value, _WINDOW.value
  dates = [datetime.date(2018, 3, 1) + datetime.timedelta(days=10 * i)
           for i in range(_DATES.value)]
  with tempfile.TemporaryDirectory() as root:
    fake_products.write_safe(os.path.join(root, "jp2"), size, dates)
    fake_products.write_geotiffs(os.path.join(root, "tif"), size, dates)
    fake_products.grid_parcels(size).to_file(os.path.join(root, "parcels.gpkg"))
    rows = []
    for layout in _LAYOUTS.value:
      for workers in map(int, _WORKERS.value):
        n, seconds = _run(root, layout, workers, os.path.join(root, "out"))
        rows.append((layout, workers, n, seconds))
  full_windows = (FULL_TILE // window) ** 2
  print(f"\nTile {size}² px, {len(dates)} dates, {window}² windows, {os.cpu_count()} CPUs "
        f"(shared machine: wall times)\n")
  print("| layout | workers | runner | windows | seconds | windows/s | speed-up |")
  print("|---|---|---|---|---|---|---|")
  base = {}
  for layout, workers, n, seconds in rows:
    base.setdefault(layout, n / seconds)
    runner = "loop" if workers == 1 else "Beam DirectRunner"
    print(f"| {layout} | {workers} | {runner} | {n} | {seconds:.1f} | {n / seconds:.2f} | "
          f"{n / seconds / base[layout]:.2f} |")
  print(f"\nExtrapolation: one tile = {full_windows:,} windows x {FULL_DATES} dates; "
        f"{_FLEET.value} cores for 100 tiles.\n")
  print("| layout | s / window (30 dates) | 1 tile, 1 core | 100 tiles, fleet |")
  print("|---|---|---|---|")
  for layout, rate in base.items():
    per_window = FULL_DATES / len(dates) / rate
    tile_s = per_window * full_windows
    print(f"| {layout} | {per_window:.3f} | {tile_s / 3600:.1f} h | "
          f"{100 * tile_s / _FLEET.value / 3600:.1f} h |")


if __name__ == "__main__":
  app.run(main)
