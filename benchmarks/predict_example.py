"""The README's example map: a simulated scene written as products, mapped by a trained run.

Simulates one `--size` x `--size` scene of the synthetic benchmark (its simulator, a seed
that no split uses), writes it as per-date GeoTIFF folders on a UTM 10 m grid (all 13 bands
at 10 m, no cloud mask, as the synthetic training data), runs `cscl_jax.predict` on it with
the checkpoint of `--workdir`, and saves RGB | labels | map | errors as a PNG; prints the
map's scores against the simulated labels.

  python -m cscl_jax.main --config=configs/supervised.py:quick --workdir=workdirs/sup_quick
  python -m benchmarks.predict_example --workdir=workdirs/sup_quick \
      --png=benchmarks/results/predict_example.png
"""

import argparse
import datetime
import os
import tempfile

import numpy as np
import rasterio

from cscl_jax import features
from cscl_jax import maps
from cscl_jax import metrics
from cscl_jax import predict
from cscl_jax import visualize
from tfds_builders.sits_synthetic import simulator

ORIGIN = (600000.0, 5000040.0)  # UTM 31N, the corner of Sentinel-2 tile T31TFM
YEAR = 2018


def write_products(root: str, example: dict[str, np.ndarray]) -> None:
  """Writes a simulated example as `<root>/<YYYY-MM-DD>/<BAND>.tif` at 10 m."""
  _, height, width, _ = example["image"].shape
  transform = rasterio.Affine(10, 0, ORIGIN[0], 0, -10, ORIGIN[1])
  for image, doy in zip(example["image"], example["doy"]):
    date = datetime.date(YEAR, 1, 1) + datetime.timedelta(days=int(doy) - 1)
    os.makedirs(os.path.join(root, date.isoformat()))
    for b, band in enumerate(features.BANDS):
      with rasterio.open(os.path.join(root, date.isoformat(), f"{band}.tif"), "w",
                         driver="GTiff", width=width, height=height, count=1, dtype="uint16",
                         crs="EPSG:32631", transform=transform) as dst:
        dst.write(image[..., b], 1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a finetune or supervised run")
  parser.add_argument("--png", required=True)
  parser.add_argument("--size", type=int, default=144)
  parser.add_argument("--seed", type=int, default=2026)
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  example = simulator.generate_sample(rng, args.size, args.size)
  with tempfile.TemporaryDirectory() as root:
    write_products(os.path.join(root, "products"), example)
    out = os.path.join(root, "map.tif")
    stats = predict.predict_tile(args.workdir, os.path.join(root, "products"), out,
                                 min_dates=1, progress=False)
    with rasterio.open(out) as src:
      classes = src.read(1)
  num_classes = len(simulator.CLASS_NAMES)
  labels = example["labels"]
  known = (labels < num_classes) & (classes != maps.NODATA)
  confusion = metrics.confusion_matrix(labels, np.minimum(classes, num_classes - 1), known,
                                       num_classes)
  scores = metrics.confusion_scores(np.asarray(confusion))
  print(f"{stats['windows']} windows in {stats['seconds']:.1f} s; map vs simulated labels: "
        f"OA {scores['oa']:.3f}, mIoU {scores['miou']:.3f}")
  inputs = example["image"][None].astype(np.float32) * features.REFLECTANCE_SCALE
  preds = np.where(classes == maps.NODATA, num_classes, classes)
  visualize.plot_segmentation(args.png, inputs, labels[None], preds[None], num_classes)


if __name__ == "__main__":
  main()
