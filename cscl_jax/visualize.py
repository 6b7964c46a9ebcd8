"""PNG figures of a few validation samples, written at every evaluation.

One row per sample: an RGB composite (B04, B03, B02 = channels 0, 1, 2 of a mid-season
date, 2-98 percentile stretch), the labels (at their own resolution: 4x finer than the RGB
for x4 super-resolution, the titles give the sizes), and then either the prediction and its errors
(fine-tuning / supervised) or the mean similarity of every pixel to its window neighbours
(pre-training: low values should trace parcel boundaries).
"""

import os

import matplotlib
matplotlib.use("Agg")
from matplotlib import colors  # pylint: disable=g-import-not-at-top
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def rgb_composite(inputs: np.ndarray) -> np.ndarray:
  """RGB image [H, W, 3] in [0, 1] from one sample's inputs [T, H, W, C].

  Uses the middle one of the dates that hold data (zero-padded dates are skipped).
  """
  has_data = np.abs(inputs).reshape(inputs.shape[0], -1).max(axis=1) > 0
  dates = np.flatnonzero(has_data)
  date = dates[len(dates) // 2] if len(dates) else 0
  rgb = inputs[date, :, :, :3].astype(np.float64)
  low, high = np.percentile(rgb, [2, 98])
  return np.clip((rgb - low) / max(high - low, 1e-6), 0, 1)


def _label_colors(num_classes: int) -> colors.ListedColormap:
  """tab20 colours for the classes, black for unknown (index num_classes)."""
  palette = plt.get_cmap("tab20")(np.arange(num_classes) % 20)
  return colors.ListedColormap(np.concatenate([palette, [[0, 0, 0, 1]]]))


def _grid(title: str, image: np.ndarray) -> str:
  """The panel title with the map's size: super-resolution maps are finer than the RGB."""
  return f"{title} {image.shape[0]}x{image.shape[1]}"


def _save(path: str, panels: list[list[tuple[str, np.ndarray, dict]]]) -> None:
  """Saves a grid of images: panels[row][col] = (title, image, imshow kwargs)."""
  rows, cols = len(panels), len(panels[0])
  fig, axes = plt.subplots(rows, cols, figsize=(2.5 * cols, 2.5 * rows), squeeze=False)
  for ax_row, row in zip(axes, panels):
    for ax, (title, image, kwargs) in zip(ax_row, row):
      shown = ax.imshow(image, interpolation="nearest", **kwargs)
      if "cmap" in kwargs and isinstance(kwargs["cmap"], str):
        fig.colorbar(shown, ax=ax, fraction=0.046)
      ax.set_title(title, fontsize=9)
      ax.axis("off")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_segmentation(path: str, inputs: np.ndarray, labels: np.ndarray,
                      preds: np.ndarray, num_classes: int) -> None:
  """Saves RGB | labels | prediction | errors for each sample.

  Args:
    path: PNG file to write.
    inputs: float [B, T, H, W, C].
    labels: int [B, H, W], num_classes = unknown.
    preds: int [B, H, W].
    num_classes: number of classes N.
  """
  label_style = {"cmap": _label_colors(num_classes), "vmin": 0, "vmax": num_classes}
  error_style = {"cmap": colors.ListedColormap(["#2ca02c", "#d62728", "#7f7f7f"]),
                 "vmin": 0, "vmax": 2}
  panels = []
  for x, y, p in zip(inputs, labels, preds):
    errors = np.where(y == num_classes, 2, (p != y).astype(int))  # 0 ok, 1 wrong, 2 unknown
    panels.append([("RGB", rgb_composite(x), {}), (_grid("labels", y), y, label_style),
                   (_grid("prediction", p), p, label_style),
                   ("errors (red)", errors, error_style)])
  _save(path, panels)


def plot_similarity(path: str, inputs: np.ndarray, labels: np.ndarray, sim: np.ndarray,
                    num_classes: int) -> None:
  """Saves RGB | labels | mean similarity to the window neighbours for each sample.

  Args:
    path: PNG file to write.
    inputs: float [B, T, H, W, C].
    labels: int [B, H, W], num_classes = unknown.
    sim: float [B, H', W', k, k] similarity maps.
    num_classes: number of classes N.
  """
  label_style = {"cmap": _label_colors(num_classes), "vmin": 0, "vmax": num_classes}
  k = sim.shape[-1]
  neighbours = np.delete(sim.reshape(sim.shape[:3] + (k * k,)), k * k // 2, axis=-1)
  panels = [[("RGB", rgb_composite(x), {}), (_grid("labels", y), y, label_style),
             ("mean sim. to neighbours", s, {"cmap": "viridis"})]
            for x, y, s in zip(inputs, labels, neighbours.mean(axis=-1))]
  _save(path, panels)
