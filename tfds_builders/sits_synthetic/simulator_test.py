"""Tests of the synthetic SITS simulator: contract, determinism and the physics it claims."""

import numpy as np
import pytest

from tfds_builders.sits_synthetic import simulator


def _sample(index, split="train", seed=0, size=48):
  return simulator.generate_sample(simulator.sample_rng(seed, split, index), size, size)


@pytest.fixture(scope="module")
def samples():
  return [_sample(i) for i in range(12)]


def _ndvi(sample):  # [T, H, W]
  red, nir = (sample["image"][..., b].astype(np.float32) for b in (0, 3))  # B04, B08
  return (nir - red) / (nir + red + 1e-6)


def _boundary(ids):
  """True where the 3x3 neighbourhood (edges replicated) holds another id."""
  h, w = ids.shape
  padded = np.pad(ids, 1, mode="edge")
  return np.any([padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] != ids
                 for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def test_contract(samples):
  assert len(simulator.CLASS_NAMES) == simulator.UNKNOWN == 12
  for s in samples:
    t = s["doy"].shape[0]
    assert 20 <= t <= 40
    assert s["image"].shape == (t, 48, 48, 13) and s["image"].dtype == np.uint16
    assert s["doy"].dtype == s["labels"].dtype == s["parcel_ids"].dtype == np.int32
    assert np.all(np.diff(s["doy"]) > 0) and 1 <= s["doy"][0] and s["doy"][-1] <= 365
    assert s["labels"].min() >= 0 and s["labels"].max() <= simulator.UNKNOWN
    # Crop pixels and only they belong to a parcel.
    np.testing.assert_array_equal(s["parcel_ids"] > 0, s["labels"] < simulator.UNKNOWN)
    # Reflectance x 1e4: vegetation and soil stay well below 1.0, clouds may reach ~0.6.
    assert 100 < np.median(s["image"]) < 4000 and s["image"].max() < 9000
  labels = np.stack([s["labels"] for s in samples])
  assert len(np.unique(labels)) == 13  # every crop and unknown appear in 12 scenes
  assert 0.05 < np.mean(labels == simulator.UNKNOWN) < 0.5


def test_deterministic_from_seed_split_and_index(samples):
  again = _sample(3)
  for key in again:
    np.testing.assert_array_equal(again[key], samples[3][key])
  for other in (_sample(3, split="validation"), _sample(3, seed=1), _sample(4)):
    assert other["doy"].shape != again["doy"].shape or np.any(other["doy"] != again["doy"])
    assert np.any(other["labels"] != again["labels"])


def test_acquisition_days_irregular_and_denser_in_summer():
  rng = np.random.default_rng(0)
  days = np.concatenate([simulator.acquisition_days(rng, 30) for _ in range(200)])
  assert days.min() >= 1 and days.max() <= 365
  summer, winter = np.mean((days > 150) & (days < 240)), np.mean((days < 60) | (days > 330))
  assert summer > 1.5 * winter
  gaps = np.diff(simulator.acquisition_days(rng, 30))
  assert np.all(gaps % 5 == 0) and len(np.unique(gaps)) > 2


def test_edge_pixels_mix_their_neighbours(samples):
  """Pixels on a parcel boundary stray further from the parcel's spectrum than its interior."""
  edge_dev, inner_dev = [], []
  for s in samples:
    x, ids = s["image"].astype(np.float32), s["parcel_ids"]
    boundary = _boundary(ids)
    for pid in np.unique(ids[ids > 0]):
      inner, edge = (ids == pid) & ~boundary, (ids == pid) & boundary
      if inner.sum() < 30 or edge.sum() < 5:
        continue
      ref = np.median(x[:, inner], axis=1)[:, None]  # [T, 1, 13]
      deviation = lambda m: np.median(np.abs(x[:, m] - ref) / (ref + 1), axis=(0, 2)).mean()
      edge_dev.append(deviation(edge))
      inner_dev.append(deviation(inner))
  assert len(edge_dev) > 20
  assert np.mean(edge_dev) > 1.5 * np.mean(inner_dev)


@pytest.mark.parametrize("crop, green_days, bare_days", [
    ("maize", (190, 240), (40, 110)),  # summer crop
    ("winter_wheat", (90, 140), (220, 280)),  # green in spring, harvested in July
])
def test_phenology_of_crops(samples, crop, green_days, bare_days):
  c = simulator.CLASS_NAMES.index(crop)
  green, bare = [], []
  for s in samples:
    inner = (s["labels"] == c) & ~_boundary(s["labels"])
    if not inner.any():
      continue
    ndvi = np.median(_ndvi(s)[:, inner], axis=1)  # [T]
    green.extend(ndvi[(s["doy"] >= green_days[0]) & (s["doy"] <= green_days[1])])
    bare.extend(ndvi[(s["doy"] >= bare_days[0]) & (s["doy"] <= bare_days[1])])
  assert len(green) > 5 and len(bare) > 5
  assert np.median(green) > np.median(bare) + 0.3


def test_tent_blur_matches_direct_convolution():
  rng = np.random.default_rng(0)
  planes = rng.random((2, 3, 9, 7)).astype(np.float32)
  for radius in (2, 6):
    taps = radius - np.abs(np.arange(1 - radius, radius))
    kernel = np.outer(taps, taps) / taps.sum() ** 2
    want = np.zeros_like(planes)
    for i in range(9):
      for j in range(7):
        for a, dy in enumerate(range(1 - radius, radius)):
          for b, dx in enumerate(range(1 - radius, radius)):
            want[..., i, j] += kernel[a, b] * planes[..., min(max(i + dy, 0), 8),
                                                     min(max(j + dx, 0), 6)]
    np.testing.assert_allclose(simulator._tent_blur(planes, radius), want, rtol=1e-5)


def _mode_per_cell(entity, num_entities, block):
  """Largest coverage in each block x block cell by plain loops (lowest index on ties)."""
  h, w = entity.shape[0] // block, entity.shape[1] // block
  out = np.zeros((h, w), int)
  for i in range(h):
    for j in range(w):
      cell = entity[i * block:(i + 1) * block, j * block:(j + 1) * block]
      out[i, j] = np.argmax(np.bincount(cell.ravel(), minlength=num_entities))
  return out


@pytest.mark.parametrize("magnification", [1, 2, 4])
def test_cell_fractions_count_the_render_cells(magnification):
  rng = np.random.default_rng(0)
  entity = rng.integers(0, 5, (3 * simulator.RENDER, 2 * simulator.RENDER))
  fractions = simulator.cell_fractions(entity, 5, magnification)
  block = simulator.RENDER // magnification
  assert fractions.shape == (3 * magnification, 2 * magnification, 5)
  np.testing.assert_allclose(fractions.sum(-1), 1, rtol=1e-6)
  np.testing.assert_array_equal(fractions.argmax(-1), _mode_per_cell(entity, 5, block))
  # The 10 m fractions are the area averages of the finer ones.
  coarse = fractions.reshape(3, magnification, 2, magnification, 5).mean((1, 3))
  np.testing.assert_allclose(coarse, simulator.cell_fractions(entity, 5, 1), atol=1e-6)


def test_fine_ground_truths_come_from_the_same_parcels(samples):
  """x2 / x4 labels are rasterised parcels: consistent ids, finer than 10 m, not upsampled."""
  finer_than_10m = 0
  for s in samples[:6]:
    for m in (2, 4):
      labels, ids = s[f"labels_x{m}"], s[f"parcel_ids_x{m}"]
      assert labels.shape == ids.shape == (48 * m, 48 * m) and labels.dtype == np.int32
      np.testing.assert_array_equal(ids > 0, labels < simulator.UNKNOWN)
      # A parcel id has one class on every grid.
      for pid in np.unique(ids[ids > 0])[:5]:
        assert np.unique(labels[ids == pid]).size == 1
        if (s["parcel_ids"] == pid).any():
          assert labels[ids == pid][0] == s["labels"][s["parcel_ids"] == pid][0]
      # Mostly the 10 m label, but not a nearest upsampling of it.
      up = np.kron(s["labels"], np.ones((m, m), int))
      assert 0.8 < np.mean(up == labels) < 1.0
      finer_than_10m += np.sum(up != labels)
    # Where the 16 x4 cells of a 10 m pixel agree, the pixel (their largest cover) agrees.
    cells = s["labels_x4"].reshape(48, 4, 48, 4).transpose(0, 2, 1, 3).reshape(48, 48, 16)
    pure = (cells == cells[..., :1]).all(-1)
    np.testing.assert_array_equal(s["labels"][pure], cells[pure, 0])
  assert finer_than_10m > 100
