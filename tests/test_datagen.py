"""Dataset generation end to end on fake products: labels, alignment, clouds, splits, errors.

The fake tile is 72 x 72 pixels at 10 m (EPSG:32631); the parcels (EPSG:2154) are described in
`fake_products.parcels`. Windows are 12 x 12, so the key r<row>c<col> names tile pixels.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio
import shapely
import tensorflow_datasets as tfds

from configs import test as test_config
from cscl_jax import features
from cscl_jax import train
from cscl_jax.datagen import fake_products
from cscl_jax.datagen import generate
from cscl_jax.datagen import parcels
from cscl_jax.datagen import pipeline
from cscl_jax.datagen import products
from cscl_jax.datagen import windows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEAT, MAIZE, MEADOW, UNKNOWN = 0, 1, 2, 3
B04 = features.BANDS.index("B04")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("datagen")
  fake_products.write_safe(str(root / "l2a"), baseline="0400")
  # A second "tile" (the same grid) in the GeoTIFF layout, a year later.
  fake_products.write_geotiffs(str(root / "T31TFM_tif"), dates=[
      d.replace(year=2019) for d in fake_products.DATES[:2]])
  fake_products.write_parcels(str(root / "parcels.gpkg"))
  fake_products.write_label_map(str(root / "map.json"))
  return root


def _options(inputs, **kwargs) -> pipeline.Options:
  return pipeline.Options(parcels=str(inputs / "parcels.gpkg"), class_column="CODE_CULTU",
                          id_column="ID_PARCEL", window=12,
                          label_map=parcels.load_label_map(str(inputs / "map.json")), **kwargs)


def _build(inputs, row, col, **kwargs):
  """WindowBuilder's (key, example) of the window at tile pixel (row, col)."""
  tile = products.discover_tile(str(inputs / "l2a"))
  options = _options(inputs, **kwargs)
  options, _, _, _, _ = generate.plan([tile], options, 3840, {"train": 1.0}, 0)
  builder = pipeline.WindowBuilder([tile], options)
  try:
    return builder.build((0, windows.WindowSpec(f"k/r{row}c{col}", row, col, "train")))
  finally:
    builder.close()


def test_labels_at_known_points(inputs):
  _, ex = _build(inputs, 12, 12)  # rows 12-24, cols 12-24: parcel 1 with its hole 14-20
  want = np.full((12, 12), WHEAT)
  want[2:8, 2:8] = UNKNOWN
  np.testing.assert_array_equal(ex["labels"], want)
  np.testing.assert_array_equal(ex["parcel_ids"], np.where(want == WHEAT, 1001, 0))
  _, ex = _build(inputs, 48, 12)  # the multipolygon's second part: rows 40-60, cols 6-20
  np.testing.assert_array_equal(ex["labels"][:, :8], MAIZE)
  np.testing.assert_array_equal(ex["labels"][:, 8:], UNKNOWN)
  _, ex = _build(inputs, 60, 60)  # parcel 3 (meadow) overlapped by parcel 4 (maize) at 60-66
  np.testing.assert_array_equal(ex["labels"][:6, :6], UNKNOWN)  # conflict
  np.testing.assert_array_equal(ex["labels"][:6, 6:10], MAIZE)
  np.testing.assert_array_equal(ex["parcel_ids"][:6, 6:10], 1004)
  _, ex = _build(inputs, 36, 36)  # parcel 3 starts at row 40.75 (25 %), col 40.25 (75 %)
  assert ex["labels"][4, 6] == UNKNOWN and ex["labels"][5, 4] == MEADOW
  assert ex["labels"][5, 3] == UNKNOWN


def test_pixels_and_dates_align(inputs):
  key, ex = _build(inputs, 60, 48)
  assert key == "k/r60c48"
  rows, cols = np.mgrid[60:72, 48:60]
  for d in range(4):  # no cloud below row 57: every date kept
    np.testing.assert_array_equal(ex["image"][d, ..., B04],
                                  fake_products.encoded(d, B04, rows, cols, 72))
  np.testing.assert_array_equal(ex["doy"], [d.timetuple().tm_yday
                                            for d in fake_products.DATES])
  _, ex = _build(inputs, 12, 24)  # under the cloud of date 2: dropped
  kept = [d for d in range(4) if d != fake_products.CLOUDY]
  assert len(ex["doy"]) == 3 and ex["image"].shape == (3, 12, 12, 13)
  np.testing.assert_array_equal(ex["image"][:, 0, 0, B04],
                                [fake_products.encoded(d, B04, 12, 24, 72) for d in kept])
  assert _build(inputs, 12, 24, max_cloud=1.0)[1]["image"].shape[0] == 4


@pytest.mark.parametrize("res", [5.0, 2.5])
def test_fine_labels_agree_with_10m(inputs, res):
  m = int(10 / res)
  for row, col in ((12, 12), (36, 36), (60, 60), (48, 12)):
    _, ex = _build(inputs, row, col, label_res=res)
    fine = ex[f"labels_x{m}"]
    assert fine.shape == (12 * m, 12 * m)
    blocks = fine.reshape(12, m, 12, m).transpose(0, 2, 1, 3).reshape(12, 12, m * m)
    uniform = (blocks == blocks[..., :1]).all(-1)
    np.testing.assert_array_equal(ex["labels"][uniform], blocks[..., 0][uniform])
    assert uniform.mean() > 0.8
  _, ex = _build(inputs, 36, 36, label_res=res)  # parcel 3's edge at col 40.25, row 40.75
  fine, r = ex[f"labels_x{m}"], int(6 * m)
  assert fine[r, int(4.25 * m) - 1] == UNKNOWN and fine[r, int(4.25 * m)] == MEADOW
  assert fine[int(4.75 * m) - 1, r] == UNKNOWN and fine[int(4.75 * m), r] == MEADOW


def test_splits_are_spatial_blocks_that_never_touch():
  transform = rasterio.Affine(10, 0, 600000, 0, -10, 5000040)
  everywhere = [shapely.box(600000, 5000040 - 4800, 604800, 5000040)]
  splits = windows.parse_splits("train=0.6,validation=0.2,test=0.2")
  crs = rasterio.crs.CRS.from_epsg(32631)
  plan, guard = windows.plan("T", 2018, crs, transform, 480, 480, everywhere, 12, 480, splits,
                             seed=0)
  assert plan == windows.plan("T", 2018, crs, transform, 480, 480, everywhere, 12, 480,
                              splits, seed=0)[0]
  grid = np.full((40, 40), "", object)
  for w in plan:
    grid[w.row // 12, w.col // 12] = w.split
  assert {w.split for w in plan} == {"train", "validation", "test"} and guard > 0
  assert len(plan) + guard == 1600
  for r, c in zip(*np.nonzero(grid == "train")):  # no train window touches another split
    around = grid[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2]
    assert set(around.ravel()) <= {"train", ""}
  with pytest.raises(ValueError, match="sum to 1"):
    windows.parse_splits("train=0.5,test=0.2")


def test_bad_inputs(inputs, tmp_path):
  tiles = [products.discover_tile(str(inputs / "l2a"))]
  with pytest.raises(ValueError, match=r"no column \['CULTURE'\]; its columns are"):
    generate.plan(tiles, pipeline.Options(str(inputs / "parcels.gpkg"), "CULTURE"), 3840,
                  {"train": 1.0}, 0)
  far = fake_products.parcels()
  far.geometry = far.geometry.translate(50000, 0)
  far.to_crs("EPSG:2154").to_file(tmp_path / "far.gpkg")
  with pytest.raises(ValueError, match="No parcel of .* intersects the tiles"):
    generate.plan(tiles, pipeline.Options(str(tmp_path / "far.gpkg"), "CODE_CULTU"), 3840,
                  {"train": 1.0}, 0)
  with pytest.raises(ValueError, match="No Sentinel-2 products"):
    products.discover_tiles([str(tmp_path)])
  fake_products.write_safe(str(tmp_path / "again"), dates=fake_products.DATES[:1])
  with pytest.raises(ValueError, match="Tile T31TFM has 2018 dates in two --products folders"):
    generate.plan(tiles + [products.discover_tile(str(tmp_path / "again"))],
                  _options(inputs), 3840, {"train": 1.0}, 0)


def _examples(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def test_beam_two_workers_equals_single_process(inputs, tmp_path):
  tiles = products.discover_tiles([str(inputs / "l2a"), str(inputs / "T31*")])
  splits = {"train": 0.5, "validation": 0.5}
  options = _options(inputs, label_res=5.0)
  single, summary = generate.generate(tiles, options, str(tmp_path / "a"), "fake", splits,
                                      block=240)
  beam, _ = generate.generate(tiles, options, str(tmp_path / "b"), "fake", splits, block=240,
                              workers=2)
  assert summary["dates"]["dropped_cloudy"] > 0
  assert summary["parcels"][str(inputs / "l2a")] == {
      "read": 6, "empty": 0, "invalid": 1, "unrepairable": 0, "in_tile": 6, "unmapped": 1}
  assert single.info.metadata["class_names"] == ["wheat", "maize", "meadow"]
  assert [(p["tile"], p["year"], len(p["products"]))
          for p in single.info.metadata["products"]] == [("T31TFM", 2018, 4),
                                                         ("T31TFM_tif", 2019, 2)]
  with pytest.raises(ValueError, match="already holds a dataset"):
    generate.generate(tiles, options, str(tmp_path / "a"), "fake", splits, block=240)
  for split in single.info.splits:
    assert beam.info.splits[split].num_examples == single.info.splits[split].num_examples > 0
    # TFDS stores examples in the order of their hashed keys: the same order = the same keys.
    for x, y in zip(_examples(single, split), _examples(beam, split)):
      assert x.keys() == y.keys()
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])


def _train_config(data_dir, stage, init_from=None):
  config = test_config.get_config()
  config.dataset.name, config.dataset.config = "fake", "default"
  config.dataset.data_dir, config.dataset.eval_split = str(data_dir), "train"
  config.model.num_classes, config.model.stage = 3, stage
  config.num_train_steps, config.eval_every_steps = 2, 2
  config.num_eval_batches = config.num_plot_samples = 1
  if init_from:
    config.init_from = str(init_from)
  return config


def test_main_pretrains_and_finetunes_on_it(inputs, tmp_path):
  tiles = products.discover_tiles([str(inputs / "l2a")])
  generate.generate(tiles, _options(inputs), str(tmp_path / "data"), "fake", {"train": 1.0})
  train.train_and_evaluate(_train_config(tmp_path / "data", "pretrain"), str(tmp_path / "pre"))
  train.train_and_evaluate(_train_config(tmp_path / "data", "finetune", tmp_path / "pre"),
                           str(tmp_path / "ft"))
  with open(tmp_path / "ft" / "metrics.json") as f:
    scores = json.load(f)
  assert scores["step"] == 2 and 0 <= scores["miou"] <= 1


def test_command_line(inputs, tmp_path):
  command = [sys.executable, "-m", "cscl_jax.datagen", f"--products={inputs / 'l2a'}",
             f"--parcels={inputs / 'parcels.gpkg'}", "--class_column=CODE_CULTU",
             f"--label_map={inputs / 'map.json'}", "--label_res=5", f"--out={tmp_path}",
             "--name=cli", "--splits=train=1", "--window=12"]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert ("--config.dataset.name=cli --config.dataset.data_dir="
          f"{tmp_path} --config.model.num_classes=3") in result.stdout
  summary = json.loads((tmp_path / "cli" / "default" / "1.0.0" / "summary.json").read_text())
  assert summary["windows"]["train"] == summary["windows_planned"]["train"] > 0
