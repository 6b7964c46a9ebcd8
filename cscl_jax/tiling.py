"""Sliding windows over a raster and the blending of their outputs into one map.

Pure numpy, no I/O. A tile of H x W pixels is covered by `window` x `window` windows whose
starts step by `stride` along each axis, the last one flush with the far edge (so every
pixel is covered and no window reads outside the tile). Window outputs may be at
`scale` x the input resolution (super-resolution models): output pixel coordinates are
input coordinates x scale.

Two ways to combine overlapping windows, both as per-window weights [S, S]:
  "blend":  a weight that ramps up from the window's edges over the overlap and is flat in
            its centre; the map is the weighted mean of the logits, so no seams show.
  "centre": each pixel is taken from exactly one window, the one whose centre is nearest
            (the kept regions split every overlap at its middle). The map inside a kept
            region is exactly that window's prediction.

`StripBlender` accumulates weighted logits for one row of windows at a time and hands back
the rows that no later window touches, so memory is bounded by the tile's width.
"""

import dataclasses
import numpy as np

BLENDINGS = ("blend", "centre")


def window_starts(length: int, window: int, stride: int) -> np.ndarray:
  """Start offsets of windows covering [0, length) every `stride`, the last flush at the end.

  Args:
    length: pixels along the axis.
    window: window size S.
    stride: step between window starts, 1 <= stride <= window.

  Returns:
    int64 [n] increasing starts; starts[-1] == length - window.

  Raises:
    ValueError: if the window does not fit or the stride leaves gaps.
  """
  if not 1 <= stride <= window:
    raise ValueError(f"The stride must be in [1, window={window}], got {stride}: a larger "
                     "one leaves pixels without a prediction.")
  if length < window:
    raise ValueError(f"The area is {length} pixels across, smaller than one {window}-pixel "
                     "window: choose larger --bounds.")
  starts = np.arange(0, length - window + 1, stride)
  if starts[-1] != length - window:
    starts = np.append(starts, length - window)
  return starts


def _ramp(window: int, overlap: int) -> np.ndarray:
  """[S] weights: (d + 1) / (overlap + 1) at distance d from the nearer edge, at most 1."""
  distance = np.minimum(np.arange(window), np.arange(window)[::-1])
  return np.minimum(1.0, (distance + 1) / (overlap + 1)).astype(np.float32)


def _kept(starts: np.ndarray, window: int, length: int) -> np.ndarray:
  """[n, S] 0/1: window i keeps the pixels nearer its centre than any other window's."""
  ends = starts + window
  # The border between windows i and i+1 is the middle of their overlap.
  borders = np.concatenate([[0], (starts[1:] + ends[:-1]) // 2, [length]])
  pixels = starts[:, None] + np.arange(window)[None, :]  # [n, S] tile coordinates
  return ((pixels >= borders[:-1, None]) & (pixels < borders[1:, None])).astype(np.float32)


def axis_weights(starts: np.ndarray, window: int, length: int, blending: str) -> np.ndarray:
  """Per-window weights along one axis; a window's 2-D weight is the outer product.

  Args:
    starts: from `window_starts(length, window, stride)`.
    window: window size S.
    length: pixels along the axis.
    blending: "blend" or "centre" (see the module docstring).

  Returns:
    float32 [n, S]; in every covered pixel the weights of the windows sum to > 0.
  """
  if blending not in BLENDINGS:
    raise ValueError(f"blending={blending!r}; use one of {BLENDINGS}.")
  if blending == "centre":
    return _kept(starts, window, length)
  overlap = window - (starts[1] - starts[0]) if len(starts) > 1 else 0
  return np.tile(_ramp(window, overlap), (len(starts), 1))


def upsample_weights(weights: np.ndarray, scale: int) -> np.ndarray:
  """[n, S] input-pixel weights -> [n, S * scale] output-pixel weights (each repeated)."""
  return np.repeat(weights, scale, axis=1)


@dataclasses.dataclass(frozen=True)
class Grid:
  """The windows over an H x W area (input pixels) and their per-axis weights.

  Attributes:
    rows, cols: window starts along each axis (`window_starts`).
    row_weights, col_weights: [n, S * scale] output-pixel weights (`axis_weights`).
    window: S.
    scale: output pixels per input pixel along each axis.
    height, width: area size in input pixels.
  """
  rows: np.ndarray
  cols: np.ndarray
  row_weights: np.ndarray
  col_weights: np.ndarray
  window: int
  scale: int
  height: int
  width: int

  @property
  def num_windows(self) -> int:
    return len(self.rows) * len(self.cols)


def make_grid(height: int, width: int, window: int, stride: int, *, blending: str = "blend",
              scale: int = 1) -> Grid:
  """Windows and weights over an H x W area; see `window_starts` and `axis_weights`."""
  rows = window_starts(height, window, stride)
  cols = window_starts(width, window, stride)
  weights = lambda starts, length: upsample_weights(
      axis_weights(starts, window, length, blending), scale)
  return Grid(rows=rows, cols=cols, row_weights=weights(rows, height),
              col_weights=weights(cols, width), window=window, scale=scale, height=height,
              width=width)


class StripBlender:
  """Weighted mean of window logits, one row of windows at a time.

  Usage, for each window row i in order:
    blender.add(i, j, logits, observed) for the windows (i, j) of the row, then
    top, logits, observed = blender.finish_row(i); write rows [top, top + h).
  Holds [S * scale, W * scale, K] floats, whatever the tile's height.
  """

  def __init__(self, grid: Grid, num_classes: int):
    self.grid = grid
    size, width = grid.window * grid.scale, grid.width * grid.scale
    self._logits = np.zeros((size, width, num_classes), np.float32)  # weighted sums
    self._weights = np.zeros((size, width), np.float32)
    self._observed = np.zeros((size, width), bool)

  def add(self, i: int, j: int, logits: np.ndarray, observed: np.ndarray) -> None:
    """Adds window (i, j): logits [S*m, S*m, K]; observed bool [S*m, S*m] (any valid date)."""
    g = self.grid
    weight = np.outer(g.row_weights[i], g.col_weights[j])  # [S*m, S*m]
    left = g.cols[j] * g.scale
    cols = slice(left, left + g.window * g.scale)
    self._logits[:, cols] += weight[..., None] * logits
    self._weights[:, cols] += weight
    self._observed[:, cols] |= observed & (weight > 0)

  def finish_row(self, i: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Returns (top, mean logits [h, W*m, K], observed [h, W*m]) of the rows now final.

    Rows that no window covers with a positive weight get logits 0 and observed False.
    """
    g = self.grid
    top = g.rows[i] * g.scale
    last = i == len(g.rows) - 1
    done = g.window * g.scale if last else (g.rows[i + 1] - g.rows[i]) * g.scale
    covered = self._weights[:done] > 0
    logits = self._logits[:done] / np.where(covered, self._weights[:done], 1.0)[..., None]
    finished = (top, logits, self._observed[:done] & covered)
    for buffer in (self._logits, self._weights, self._observed):
      buffer[:] = np.roll(buffer, -done, axis=0)
      buffer[buffer.shape[0] - done:] = 0
    return finished
