"""Evaluation metrics: confusion matrices on device, scores on the host.

Segmentation (SPEC.md §3): a confusion matrix over known pixels, summed over batches, gives
overall accuracy, per-class IoU, mean IoU (over the classes present in labels or
predictions) and macro F1, for all pixels and split into boundary pixels (some pixel of the
reflect-padded 3x3 neighbourhood has a different label) and interior pixels.

CSCL pre-training: the mean similarity of same-class and of different-class pairs, from sums
accumulated on device.

Device functions (`jnp`, run inside the train/eval steps) return sums that add up over
batches and devices; host functions (`numpy`) turn the summed numbers into a flat dict.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

# Order of the pixel subsets in `segmentation_confusions` and their metric-name prefixes.
PIXEL_SUBSETS = ("", "boundary/", "interior/")


def boundary_mask(labels: jnp.ndarray) -> jnp.ndarray:
  """Marks pixels whose 3x3 neighbourhood (reflect padding) holds another label.

  Args:
    labels: int [B, H, W] label maps (unknown counts as a label of its own).

  Returns:
    bool [B, H, W], True on boundary pixels.
  """
  height, width = labels.shape[1:]
  padded = jnp.pad(labels, ((0, 0), (1, 1), (1, 1)), mode="reflect")  # [B, H+2, W+2]
  boundary = jnp.zeros(labels.shape, bool)
  for di in range(3):
    for dj in range(3):
      boundary |= padded[:, di:di + height, dj:dj + width] != labels
  return boundary


def confusion_matrix(labels: jnp.ndarray, preds: jnp.ndarray, mask: jnp.ndarray,
                     num_classes: int) -> jnp.ndarray:
  """Counts (true class, predicted class) pairs over the masked pixels.

  Args:
    labels: int [...] true classes; values outside [0, num_classes) are ignored.
    preds: int [...] predicted classes in [0, num_classes).
    mask: bool [...] pixels to count.
    num_classes: number of classes N.

  Returns:
    int32 [N, N], rows true class, columns predicted class.
  """
  keep = mask & (labels >= 0) & (labels < num_classes)
  index = jnp.where(keep, labels * num_classes + preds, 0)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32)
  counts = counts.at[index.ravel()].add(keep.ravel().astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def segmentation_confusions(labels: jnp.ndarray, preds: jnp.ndarray, valid: jnp.ndarray,
                            num_classes: int) -> jnp.ndarray:
  """Confusion matrices of all, boundary and interior known pixels.

  Args:
    labels: int [B, H, W], num_classes = unknown.
    preds: int [B, H, W].
    valid: bool [B, H, W] pixels that may count at all.
    num_classes: number of classes N.

  Returns:
    int32 [3, N, N] in PIXEL_SUBSETS order (all, boundary, interior).
  """
  boundary = boundary_mask(labels)
  return jnp.stack([
      confusion_matrix(labels, preds, valid, num_classes),
      confusion_matrix(labels, preds, valid & boundary, num_classes),
      confusion_matrix(labels, preds, valid & ~boundary, num_classes),
  ])


def confusion_scores(confusion: np.ndarray,
                     class_names: Sequence[str] | None = None) -> dict[str, float]:
  """Overall accuracy, mean IoU, macro F1 (and per-class IoU) of one confusion matrix.

  Means run over the classes present in labels or predictions; a class absent from both
  has no IoU. With no pixel at all the scores are NaN.

  Args:
    confusion: [N, N] counts, rows true class, columns predicted class.
    class_names: if given, adds "iou/<name>" for every present class.

  Returns:
    {"oa", "miou", "macro_f1"} plus the per-class IoUs.
  """
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  true_count = confusion.sum(axis=1)
  pred_count = confusion.sum(axis=0)
  present = (true_count + pred_count) > 0
  union = true_count + pred_count - tp
  iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
  f1 = np.divide(2 * tp, true_count + pred_count, out=np.zeros_like(tp), where=present)
  total = confusion.sum()
  scores = {
      "oa": float(tp.sum() / total) if total else float("nan"),
      "miou": float(iou[present].mean()) if present.any() else float("nan"),
      "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
  }
  if class_names is not None:
    scores.update({f"iou/{name}": float(iou[c])
                   for c, name in enumerate(class_names) if present[c]})
  return scores


def segmentation_scores(confusions: np.ndarray,
                        class_names: Sequence[str]) -> dict[str, float]:
  """Flat metric dict from the summed `segmentation_confusions`.

  Args:
    confusions: [3, N, N] counts (all, boundary, interior).
    class_names: the N class names.

  Returns:
    "oa", "miou", "macro_f1", "iou/<class>" over all known pixels, and "boundary/..."
    and "interior/..." oa, miou and macro_f1.
  """
  scores = confusion_scores(confusions[0], class_names)
  for prefix, confusion in zip(PIXEL_SUBSETS[1:], confusions[1:]):
    scores.update({prefix + k: v for k, v in confusion_scores(confusion).items()})
  return scores


def similarity_sums(sim: jnp.ndarray, target: jnp.ndarray,
                    mask: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
  """Sums behind the mean similarity of same-class and different-class pairs.

  Args:
    sim: float [B, H', W', k, k] similarity map.
    target: float [B, H', W', k, k], 1 for same-class pairs, 0 otherwise.
    mask: optional bool [B, H', W', k, k] of the pairs to count.

  Returns:
    float32 scalars "sim_same_sum", "same_count", "sim_diff_sum", "diff_count".
  """
  weight = jnp.ones_like(sim) if mask is None else mask.astype(sim.dtype)
  same = target * weight
  diff = (1.0 - target) * weight
  return {"sim_same_sum": jnp.sum(sim * same), "same_count": jnp.sum(same),
          "sim_diff_sum": jnp.sum(sim * diff), "diff_count": jnp.sum(diff)}


def similarity_scores(sums: dict[str, float]) -> dict[str, float]:
  """Mean same-class and different-class similarity ("sim_same", "sim_diff")."""
  def ratio(num, den):
    return float(num / den) if den else float("nan")
  return {"sim_same": ratio(sums["sim_same_sum"], sums["same_count"]),
          "sim_diff": ratio(sums["sim_diff_sum"], sums["diff_count"])}


def per_class_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
  """Per-class pixel counts and scores of one confusion matrix.

  Args:
    confusion: [N, N] counts, rows true class, columns predicted class.

  Returns:
    float64 [N] arrays "pixels" (true count), "precision", "recall", "iou", "f1"; NaN where
    the denominator is 0 (e.g. precision of a class never predicted).
  """
  confusion = np.asarray(confusion, np.float64)
  tp, true_count, pred_count = np.diag(confusion), confusion.sum(1), confusion.sum(0)
  ratio = lambda num, den: np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)
  return {"pixels": true_count, "precision": ratio(tp, pred_count),
          "recall": ratio(tp, true_count), "iou": ratio(tp, true_count + pred_count - tp),
          "f1": ratio(2 * tp, true_count + pred_count)}
