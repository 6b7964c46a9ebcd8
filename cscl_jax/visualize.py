"""PNG figures of a few validation samples, written at every evaluation.

One row per sample: an RGB composite (the channels of B04, B03, B02 of a mid-season date,
2-98 percentile stretch), the labels, and then either the prediction and its errors
(fine-tuning / supervised) or the mean similarity of every pixel to its window neighbours
(pre-training: low values should trace parcel boundaries).
"""

from etils import epath
import matplotlib
matplotlib.use("Agg")
from matplotlib import colors  # pylint: disable=g-import-not-at-top
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def rgb_composite(inputs: np.ndarray, rgb: tuple[int, int, int] = (0, 1, 2)) -> np.ndarray:
  """RGB image [H, W, 3] in [0, 1] from one sample's inputs [T, H, W, C].

  Uses the middle one of the dates that hold data (zero-padded dates are skipped) and the
  channels `rgb` (those of B04, B03, B02) as red, green and blue.
  """
  has_data = np.abs(inputs).reshape(inputs.shape[0], -1).max(axis=1) > 0
  dates = np.flatnonzero(has_data)
  date = dates[len(dates) // 2] if len(dates) else 0
  image = inputs[date][..., list(rgb)].astype(np.float64)  # [H, W, 3]
  low, high = np.percentile(image, [2, 98])
  return np.clip((image - low) / max(high - low, 1e-6), 0, 1)


def class_colors(num_classes: int) -> np.ndarray:
  """RGBA colours in [0, 1] of the classes, [N, 4]: tab20 (repeating after 20 classes)."""
  return plt.get_cmap("tab20")(np.arange(num_classes) % 20)


def _label_colors(num_classes: int) -> colors.ListedColormap:
  """tab20 colours for the classes, black for unknown (index num_classes)."""
  return colors.ListedColormap(np.concatenate([class_colors(num_classes), [[0, 0, 0, 1]]]))


def _save(path: str | epath.Path, panels: list[list[tuple[str, np.ndarray, dict]]]) -> None:
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
  _write_png(fig, path, dpi=80)


def _write_png(fig: plt.Figure, path: str | epath.Path, dpi: int) -> None:
  """Saves and closes `fig` as a PNG, local or in a bucket (gs://...) alike."""
  fig.tight_layout()
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    fig.savefig(f, dpi=dpi, format="png")
  plt.close(fig)


def plot_segmentation(path: str, inputs: np.ndarray, labels: np.ndarray,
                      preds: np.ndarray, num_classes: int,
                      rgb: tuple[int, int, int] = (0, 1, 2)) -> None:
  """Saves RGB | labels | prediction | errors for each sample.

  Args:
    path: PNG file to write.
    inputs: float [B, T, H, W, C].
    labels: int [B, H, W], num_classes = unknown.
    preds: int [B, H, W].
    num_classes: number of classes N.
    rgb: the input channels of red, green and blue.
  """
  label_style = {"cmap": _label_colors(num_classes), "vmin": 0, "vmax": num_classes}
  error_style = {"cmap": colors.ListedColormap(["#2ca02c", "#d62728", "#7f7f7f"]),
                 "vmin": 0, "vmax": 2}
  panels = []
  for x, y, p in zip(inputs, labels, preds):
    errors = np.where(y == num_classes, 2, (p != y).astype(int))  # 0 ok, 1 wrong, 2 unknown
    panels.append([("RGB", rgb_composite(x, rgb), {}), ("labels", y, label_style),
                   ("prediction", p, label_style),
                   ("errors (red)", errors, error_style)])
  _save(path, panels)


def plot_similarity(path: str, inputs: np.ndarray, labels: np.ndarray, sim: np.ndarray,
                    num_classes: int, rgb: tuple[int, int, int] = (0, 1, 2)) -> None:
  """Saves RGB | labels | mean similarity to the window neighbours for each sample.

  Args:
    path: PNG file to write.
    inputs: float [B, T, H, W, C].
    labels: int [B, H, W], num_classes = unknown.
    sim: float [B, H', W', k, k] similarity maps.
    num_classes: number of classes N.
    rgb: the input channels of red, green and blue.
  """
  label_style = {"cmap": _label_colors(num_classes), "vmin": 0, "vmax": num_classes}
  k = sim.shape[-1]
  neighbours = np.delete(sim.reshape(sim.shape[:3] + (k * k,)), k * k // 2, axis=-1)
  panels = [[("RGB", rgb_composite(x, rgb), {}), ("labels", y, label_style),
             ("mean sim. to neighbours", s, {"cmap": "viridis"})]
            for x, y, s in zip(inputs, labels, neighbours.mean(axis=-1))]
  _save(path, panels)


def plot_confusion(path: str, confusion: np.ndarray, class_names: list[str]) -> None:
  """Saves the row-normalised confusion matrix (recall on the diagonal) with class names.

  Args:
    path: PNG file to write.
    confusion: [N, N] counts, rows true class, columns predicted class.
    class_names: the N class names.
  """
  confusion = np.asarray(confusion, np.float64)
  totals = confusion.sum(axis=1, keepdims=True)
  normalised = np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)
  n = len(class_names)
  fig, ax = plt.subplots(figsize=(2 + 0.45 * n, 1.5 + 0.45 * n))
  shown = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
  fig.colorbar(shown, ax=ax, fraction=0.046, label="fraction of the true class")
  ticks = np.arange(n)
  ax.set_xticks(ticks, class_names, rotation=90, fontsize=8)
  ax.set_yticks(ticks, class_names, fontsize=8)
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  if n <= 25:
    for (i, j), value in np.ndenumerate(normalised):
      if value >= 0.005:
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                color="white" if value > 0.5 else "black")
  _write_png(fig, path, dpi=100)
