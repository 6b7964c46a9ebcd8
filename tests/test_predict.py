"""`cscl_jax.predict` on the fake products of `datagen.fake_products`, with a tiny saved model.

The model is a randomly initialised supervised UNet3Df of configs/test.py (12 x 12 windows,
4 dates) saved as a run would save it; the map is checked against `models.predict` on each
window's inputs, read alone from the products.
"""

import datetime
import os

import jax
import numpy as np
import pytest
import rasterio
import rasterio.warp
from rasterio.windows import Window

from cscl_jax import checkpoints
from cscl_jax import features
from cscl_jax import maps
from cscl_jax import models
from cscl_jax import predict
from cscl_jax import steps
from cscl_jax.datagen import fake_products
from cscl_jax.datagen import products
from configs import test as test_config

SIZE, WINDOW = 72, 12
HOLE = 12  # the top-left HOLE x HOLE pixels have no data on any date


def _config(tmp_path, stage="supervised"):
  config = test_config.get_config()
  config.model.stage = stage
  config.model.img_res = WINDOW
  config.dataset.data_dir = str(tmp_path / "no_tfds")  # class names: class_<i>
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, config, variables) of a saved, randomly initialised model."""
  tmp_path = tmp_path_factory.mktemp("run")
  config, workdir = _config(tmp_path), str(tmp_path / "workdir")
  model = models.create_model(config.model, axis_name=steps.AXIS)
  state = steps.create_train_state(jax.random.key(0, impl="rbg"), config, model,
                                   steps.learning_rate_schedule(config, 1))
  # Non-trivial BatchNorm statistics, so that eval mode matters.
  rng = np.random.default_rng(0)
  state = state.replace(batch_stats=jax.tree.map(
      lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32), state.batch_stats))
  checkpoints.check_config(workdir, config, has_checkpoint=False)
  manager = checkpoints.create_manager(workdir, keep=1, best_metric="miou", best_mode="max")
  checkpoints.save(manager, 3, state, {"miou": 0.5})
  manager.wait_until_finished()
  return workdir, config, {"params": state.params, "batch_stats": state.batch_stats}


@pytest.fixture(scope="module")
def tile_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("products"))
  fake_products.write_geotiffs(root, size=SIZE)
  for date in fake_products.DATES:  # No data in the top-left corner on every date.
    with rasterio.open(os.path.join(root, date.isoformat(), "B04.tif"), "r+") as dst:
      dst.write(np.zeros((HOLE, HOLE), np.uint16), 1, window=Window(0, 0, HOLE, HOLE))
  return root


def _window_predictions(tile_dir, config, variables, starts):
  """Classes [n, n, S, S] of every window at (row, col) in starts^2, each read alone."""
  with products.TileReader(products.discover_tile(tile_dir)) as reader:
    inputs = [predict.prepare_window(reader.read(Window(col, row, WINDOW, WINDOW)), config,
                                     0.5)[0] for row in starts for col in starts]
  logits = models.predict(config.model, variables, np.stack(inputs))
  return logits.argmax(-1).reshape(len(starts), len(starts), WINDOW, WINDOW)


def test_centre_map_is_the_window_predictions_on_the_products_grid(run, tile_dir, tmp_path):
  workdir, config, variables = run
  out = str(tmp_path / "map.tif")
  stats = predict.predict_tile(workdir, tile_dir, out, blending="centre", overlap=6,
                               batch_size=8, progress=False)
  starts = np.arange(0, SIZE - WINDOW + 1, 6)
  assert stats["windows"] == len(starts) ** 2 and stats["step"] == 3
  tile = products.discover_tile(tile_dir)
  with rasterio.open(out) as src:
    assert (src.crs, src.transform, src.shape) == (tile.crs, tile.transform, (SIZE, SIZE))
    assert src.nodata == maps.NODATA and src.dtypes == ("uint8",)
    assert src.tags()["CLASS_0"] == "class_0" and src.colormap(1)[0][3] == 255
    classes = src.read(1)
  # Independent of the tiling code: each pixel from the window whose centre is nearest.
  windows = _window_predictions(tile_dir, config, variables, starts)
  centres = starts + WINDOW / 2
  expected = np.zeros((SIZE, SIZE), int)
  for y in range(SIZE):
    for x in range(SIZE):
      i, j = (int(np.argmin(np.where(np.abs(p + 0.5 - centres) < WINDOW / 2,
                                     np.abs(p + 0.5 - centres), np.inf))) for p in (y, x))
      expected[y, x] = windows[i, j, y - starts[i], x - starts[j]]
  expected[:HOLE, :HOLE] = maps.NODATA
  np.testing.assert_array_equal(classes, expected)
  assert len(np.unique(classes[HOLE:])) > 1


def test_blended_part_with_probabilities(run, tile_dir, tmp_path):
  workdir, config, _ = run
  out, probs = str(tmp_path / "map.tif"), str(tmp_path / "probs.tif")
  tile = products.discover_tile(tile_dir)
  # Pixels (row 5.5, col 9.5) .. (46.5, 40.5), snapped outwards to 60 m pixels: rows 0-48,
  # cols 6-42.
  left, top = tile.transform @ (9.5, 5.5)
  right, bottom = tile.transform @ (40.5, 46.5)
  stats = predict.predict_tile(workdir, tile_dir, out, probabilities=probs,
                               bounds=(left, bottom, right, top), overlap=6,
                               windows_per_read=3, batch_size=16, progress=False)
  assert stats["windows"] == 7 * 5  # 48 x 36 pixels, windows every 6 pixels
  with rasterio.open(out) as src, rasterio.open(probs) as p:
    assert src.transform == tile.transform @ rasterio.Affine.translation(6, 0)
    assert src.shape == p.shape == (48, 36)
    classes, probabilities = src.read(1), p.read()  # [H, W], [N, H, W]
    assert p.count == config.model.num_classes and p.scales[0] == 1 / 254
  hole = np.zeros(classes.shape, bool)
  hole[:HOLE, :HOLE - 6] = True  # map column 0 is tile column 6
  np.testing.assert_array_equal(classes == maps.NODATA, hole)
  np.testing.assert_array_equal(probabilities[:, hole], maps.NODATA)
  assert set(np.unique(classes[~hole])) <= set(range(config.model.num_classes))
  probabilities = probabilities[:, ~hole].astype(int)  # [N, pixels]
  np.testing.assert_allclose(probabilities.sum(0), 254, atol=config.model.num_classes / 2)
  winners = np.take_along_axis(probabilities, classes[~hole][None], 0)[0]
  np.testing.assert_array_equal(winners, probabilities.max(0))


def test_products_that_do_not_fit_the_model(run, tile_dir, tmp_path):
  workdir, config, _ = run
  tile = products.discover_tile(tile_dir)
  predict.check_products(tile, config, min_dates=0)
  with pytest.raises(ValueError, match="2 dates .* lower --min_dates"):
    predict.check_products(tile.select(end=datetime.date(2018, 5, 31)), config, 0)
  pretrain = _config(tmp_path, "pretrain")
  pretrain.model.num_channels = 11
  with pytest.raises(ValueError, match="(?s)no classifier.*takes 11 channels"):
    predict.check_products(tile, pretrain, 0)
  with pytest.raises(ValueError, match="do not overlap tile"):
    predict.area_window(tile, (0, 0, 10, 10))
  # Pixels 12-24 in longitude / latitude: a slightly larger box, snapped to 60 m pixels.
  (left, top), (right, bottom) = tile.transform @ (12, 12), tile.transform @ (24, 24)
  lonlat = rasterio.warp.transform_bounds(tile.crs, "EPSG:4326", left, bottom, right, top)
  assert predict.area_window(tile, lonlat, "EPSG:4326") == Window(6, 6, 24, 24)
  with pytest.raises(ValueError, match="multiples of 6"):
    predict.predict_tile(workdir, tile_dir, str(tmp_path / "x.tif"), overlap=4)


def test_super_resolution_map_is_on_the_finer_grid(tile_dir, tmp_path):
  """A stand-in model whose class is the fake B04 value of the pixel, at 2x resolution."""
  config = _config(tmp_path)
  config.model.output_magnification = 2
  num_classes = config.model.num_classes

  def forward(inputs):  # [B, T, S, S, C] -> one-hot logits [B, 2S, 2S, N]
    classes = np.rint(inputs[:, 0, :, :, 0] / features.REFLECTANCE_SCALE).astype(int)
    logits = np.eye(num_classes, dtype=np.float32)[classes % num_classes]
    return np.repeat(np.repeat(logits, 2, 1), 2, 2)

  tile, out = products.discover_tile(tile_dir), str(tmp_path / "x2.tif")
  area = Window(6, 12, 36, 30)
  with products.TileReader(tile) as reader, maps.MapWriter(
      out, crs=tile.crs, transform=maps.map_transform(tile.transform, 6, 12, 2), width=72,
      height=60, class_names=[str(c) for c in range(num_classes)]) as writer:
    predict.predict_area(reader, area, config, forward, writer, stride=6, blending="blend",
                         batch_size=5, windows_per_read=2, max_cloud=0.5, progress=False)
  with rasterio.open(out) as src:
    classes, transform = src.read(1), src.transform
  rows, cols = np.mgrid[12:42, 6:42]  # tile pixels of the area
  expected = fake_products.encoded(0, 0, rows, cols, SIZE) % num_classes
  expected = np.repeat(np.repeat(expected, 2, 0), 2, 1)
  assert transform == tile.transform @ rasterio.Affine(5 / 10, 0, 6, 0, 5 / 10, 12)
  np.testing.assert_array_equal(classes, expected)
