"""Window grid, blending weights and the strip blender against a whole-tile numpy loop."""

import numpy as np
import pytest

from cscl_jax import tiling


def test_window_starts_cover_the_axis_and_end_flush():
  np.testing.assert_array_equal(tiling.window_starts(20, 8, 6), [0, 6, 12])
  np.testing.assert_array_equal(tiling.window_starts(21, 8, 6), [0, 6, 12, 13])
  np.testing.assert_array_equal(tiling.window_starts(8, 8, 3), [0])
  with pytest.raises(ValueError, match="smaller than one 8-pixel window"):
    tiling.window_starts(7, 8, 4)
  with pytest.raises(ValueError, match="leaves pixels without a prediction"):
    tiling.window_starts(30, 8, 9)


def test_blend_weights_ramp_over_the_overlap():
  weights = tiling.axis_weights(tiling.window_starts(20, 8, 6), 8, 20, "blend")
  # Overlap 2: ramp 1/3, 2/3 at each edge, flat 1 in the centre.
  np.testing.assert_allclose(weights[0], [1 / 3, 2 / 3, 1, 1, 1, 1, 2 / 3, 1 / 3])
  assert (weights > 0).all()


@pytest.mark.parametrize("length,window,stride", [(20, 8, 6), (21, 8, 6), (9, 4, 1), (8, 8, 8)])
def test_centre_weights_partition_the_axis(length, window, stride):
  starts = tiling.window_starts(length, window, stride)
  kept = tiling.axis_weights(starts, window, length, "centre")
  owners = np.zeros(length)
  for start, k in zip(starts, kept):
    owners[start:start + window] += k
  np.testing.assert_array_equal(owners, 1)  # every pixel taken from exactly one window
  for start, k in zip(starts, kept):  # ... the one whose centre is nearest
    for offset in np.flatnonzero(k):
      distances = np.abs(start + offset + 0.5 - (starts + window / 2))
      assert distances[starts == start] <= distances.min() + 0.5


def _reference(grid, window_logits, window_observed):
  """Weighted mean of the logits pixel by pixel over the whole tile."""
  m = grid.scale
  height, width = grid.height * m, grid.width * m
  num = np.zeros((height, width, window_logits.shape[-1]))
  den = np.zeros((height, width))
  observed = np.zeros((height, width), bool)
  for i, top in enumerate(grid.rows * m):
    for j, left in enumerate(grid.cols * m):
      for y in range(grid.window * m):
        for x in range(grid.window * m):
          w = grid.row_weights[i, y] * grid.col_weights[j, x]
          num[top + y, left + x] += w * window_logits[i, j, y, x]
          den[top + y, left + x] += w
          observed[top + y, left + x] |= bool(window_observed[i, j, y, x]) and w > 0
  return num / den[..., None], observed


@pytest.mark.parametrize("blending,scale", [("blend", 1), ("centre", 1), ("blend", 2)])
def test_strip_blender_equals_whole_tile_reference(blending, scale):
  grid = tiling.make_grid(13, 11, 6, 4, blending=blending, scale=scale)
  size = 6 * scale
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(len(grid.rows), len(grid.cols), size, size, 3)).astype(np.float32)
  observed = rng.random((len(grid.rows), len(grid.cols), size, size)) > 0.2
  blender = tiling.StripBlender(grid, num_classes=3)
  out = np.full((13 * scale, 11 * scale, 3), np.nan)
  out_observed = np.zeros((13 * scale, 11 * scale), bool)
  for i in range(len(grid.rows)):
    for j in range(len(grid.cols)):
      blender.add(i, j, logits[i, j], observed[i, j])
    top, strip, strip_observed = blender.finish_row(i)
    assert np.isnan(out[top:top + len(strip)]).all()  # each row is finished exactly once
    out[top:top + len(strip)], out_observed[top:top + len(strip)] = strip, strip_observed
  expected, expected_observed = _reference(grid, logits, observed)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out_observed, expected_observed)
