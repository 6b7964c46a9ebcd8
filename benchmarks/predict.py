"""Whole-tile prediction throughput: windows/s and the extrapolated time of a 10,980^2 tile.

Writes fake Sentinel-2 L2A products (`datagen.fake_products`: JP2 bands at native
resolution, SCL masks) of a `--size` x `--size` tile over `--dates` dates, then times
`predict.predict_area` (read, prepare, model, blend, write) on it with a randomly initialised
UNet3Df classifier at the reference shapes (48x48, 16 dates, f = 16, 20 classes; `--small`:
24x24, 8 dates, f = 4), 12 pixels of overlap:

  * input only: reading and preparing the windows (model replaced by zeros), each window read
    alone (the default, as dataset generation reads them; the naive baseline) and
    `--windows_per_read` neighbours at once;
  * model only: the forward pass of one batch on the local devices;
  * end to end, both read modes, the GeoTIFF written.

Each phase runs twice (the first warms up the compile and file caches); the table shows the
second. A full tile has `tiling.window_starts(10980, S, S - 12)` windows per axis.

  python -m benchmarks.predict --small            # a CPU
  python -m benchmarks.predict --size=480         # reference shapes, on an accelerator
"""

import argparse
import datetime
import tempfile
import time

import jax
import numpy as np

from benchmarks import train_step
from cscl_jax import maps
from cscl_jax import predict
from cscl_jax import steps
from cscl_jax import tiling
from cscl_jax import train
from cscl_jax.datagen import fake_products
from cscl_jax.datagen import products

FULL_TILE = 10980
OVERLAP = 12


def _time_area(tile, config, forward, out, **kwargs) -> tuple[int, float]:
  """(windows, seconds) of the second of two predictions of the whole fake tile."""
  area = predict.area_window(tile)
  for _ in range(2):
    with products.TileReader(tile) as reader, maps.MapWriter(
        out, crs=tile.crs, transform=tile.transform, width=int(area.width),
        height=int(area.height), class_names=[str(c) for c in range(20)][
            :config.model.num_classes]) as writer:
      start = time.perf_counter()
      windows = predict.predict_area(reader, area, config, forward, writer, progress=False,
                                     stride=config.model.img_res - OVERLAP, blending="blend",
                                     max_cloud=0.5, **kwargs)
      seconds = time.perf_counter() - start
  return windows, seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=240, help="fake tile size (10 m pixels)")
  parser.add_argument("--dates", type=int, default=16)
  parser.add_argument("--batch_size", type=int, default=8, help="windows per step")
  parser.add_argument("--windows_per_read", type=int, default=8)
  parser.add_argument("--small", action="store_true", help="smaller model (CPU)")
  args = parser.parse_args()

  config = train_step.make_config("unet3df", "finetune", "float32", args.small)
  config.model.max_seq_len = min(config.model.max_seq_len, args.dates)
  config.batch_size = args.batch_size
  size = config.model.img_res
  model = train.models.create_model(config.model)
  state = steps.create_train_state(jax.random.key(0, impl="rbg"), config, model,
                                   steps.learning_rate_schedule(config, 1))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  forward = predict.make_forward(config, variables, args.batch_size)
  zeros = lambda x: np.zeros((len(x), size, size, config.model.num_classes), np.float32)

  with tempfile.TemporaryDirectory() as root:
    dates = [datetime.date(2018, 3, 1) + datetime.timedelta(days=10 * d)
             for d in range(args.dates)]
    fake_products.write_safe(root, size=args.size, dates=dates)
    tile = products.discover_tile(root)
    inputs = np.random.default_rng(0).normal(size=(args.batch_size, config.model.max_seq_len,
                                                   size, size, 14)).astype(np.float32)
    for _ in range(2):
      start = time.perf_counter()
      forward(inputs)
      model_seconds = time.perf_counter() - start
    out = f"{root}/map.tif"
    rows = {"model only (one batch)": (args.batch_size, model_seconds)}
    for name, fn in (("input only", zeros), ("end to end", forward)):
      for per_read in (1, args.windows_per_read):
        rows[f"{name}, {per_read} window(s) a read"] = _time_area(
            tile, config, fn, out, batch_size=args.batch_size, windows_per_read=per_read)

  full = len(tiling.window_starts(FULL_TILE, size, size - OVERLAP)) ** 2
  print(f"# backend {jax.default_backend()}, {jax.local_device_count()} device(s), "
        f"jax {jax.__version__}; UNet3Df {size}x{size}, T={config.model.max_seq_len}, "
        f"f={config.model.num_features}; fake {args.size}^2 tile, {args.dates} dates (JP2); "
        f"full tile = {full} windows")
  print("| phase | windows | seconds | windows/s | full tile (h) |")
  print("|---|---:|---:|---:|---:|")
  for name, (windows, seconds) in rows.items():
    rate = windows / seconds
    print(f"| {name} | {windows} | {seconds:.2f} | {rate:.1f} | {full / rate / 3600:.2f} |")


if __name__ == "__main__":
  main()
