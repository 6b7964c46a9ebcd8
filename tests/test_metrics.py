"""Metrics against hand-computed confusion matrices and slow numpy references."""

import numpy as np
import pytest

from cscl_jax import metrics


def _boundary_reference(labels):
  """Pixel by pixel: some pixel of the reflect-padded 3x3 window differs from the centre."""
  batch, height, width = labels.shape
  out = np.zeros(labels.shape, bool)
  reflect = lambda i, n: -i if i < 0 else (2 * (n - 1) - i if i >= n else i)
  for b in range(batch):
    for i in range(height):
      for j in range(width):
        for di in (-1, 0, 1):
          for dj in (-1, 0, 1):
            ii, jj = reflect(i + di, height), reflect(j + dj, width)
            out[b, i, j] |= labels[b, ii, jj] != labels[b, i, j]
  return out


def _confusion_reference(labels, preds, mask, num_classes):
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for t, p, m in zip(labels.ravel(), preds.ravel(), mask.ravel()):
    if m and 0 <= t < num_classes:
      confusion[t, p] += 1
  return confusion


def test_boundary_mask_matches_reference():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, size=(2, 5, 7))
  labels[1] = 1  # a constant map has no boundary
  labels[1, 4, 6] = 2  # ... except around one corner pixel
  got = np.asarray(metrics.boundary_mask(labels))
  np.testing.assert_array_equal(got, _boundary_reference(labels))
  assert got[1].sum() == 4  # the corner and its three neighbours


def test_boundary_mask_by_hand():
  labels = np.array([[[0, 0, 0, 1],
                      [0, 0, 0, 1],
                      [0, 0, 0, 1]]])
  expected = np.array([[[0, 0, 1, 1],
                        [0, 0, 1, 1],
                        [0, 0, 1, 1]]], bool)
  np.testing.assert_array_equal(np.asarray(metrics.boundary_mask(labels)), expected)


def test_confusion_matrix_ignores_unknown_and_masked_pixels():
  rng = np.random.default_rng(1)
  num_classes = 4
  labels = rng.integers(0, num_classes + 1, size=(3, 6, 6))  # num_classes = unknown
  preds = rng.integers(0, num_classes, size=(3, 6, 6))
  mask = rng.random((3, 6, 6)) > 0.2
  got = np.asarray(metrics.confusion_matrix(labels, preds, mask, num_classes))
  np.testing.assert_array_equal(got, _confusion_reference(labels, preds, mask, num_classes))


def test_segmentation_confusions_split_boundary_and_interior():
  rng = np.random.default_rng(2)
  num_classes = 3
  labels = np.repeat(np.repeat(rng.integers(0, num_classes + 1, (2, 3, 3)), 3, 1), 3, 2)
  preds = rng.integers(0, num_classes, labels.shape)
  valid = np.ones(labels.shape, bool)
  got = np.asarray(metrics.segmentation_confusions(labels, preds, valid, num_classes))
  boundary = _boundary_reference(labels)
  assert boundary.any() and (~boundary).any()
  np.testing.assert_array_equal(got[0], _confusion_reference(labels, preds, valid, 3))
  np.testing.assert_array_equal(got[1], _confusion_reference(labels, preds, boundary, 3))
  np.testing.assert_array_equal(got[2], _confusion_reference(labels, preds, ~boundary, 3))
  np.testing.assert_array_equal(got[1] + got[2], got[0])


def test_confusion_scores_by_hand():
  # Class 0: tp 3, fn 1, fp 1; class 1: tp 2, fn 1, fp 1; class 2 absent; class 3: fp only.
  confusion = np.array([[3, 1, 0, 0],
                        [1, 2, 0, 0],
                        [0, 0, 0, 0],
                        [0, 0, 0, 0]])
  confusion[1, 3] = 1
  scores = metrics.confusion_scores(confusion, ["a", "b", "c", "d"])
  iou = {"a": 3 / 5, "b": 2 / 5, "d": 0.0}
  f1 = {"a": 6 / 8, "b": 4 / 7, "d": 0.0}
  assert scores["oa"] == pytest.approx(5 / 8)
  assert scores["miou"] == pytest.approx(np.mean(list(iou.values())))
  assert scores["macro_f1"] == pytest.approx(np.mean(list(f1.values())))
  assert {k: v for k, v in scores.items() if k.startswith("iou/")} == pytest.approx(
      {f"iou/{k}": v for k, v in iou.items()})


def test_confusion_scores_of_nothing_are_nan():
  scores = metrics.confusion_scores(np.zeros((3, 3)))
  assert all(np.isnan(v) for v in scores.values())


def test_segmentation_scores_keys():
  confusions = np.stack([np.eye(2) * 4, np.eye(2), np.eye(2) * 3])
  confusions[1, 0, 1] = 2
  scores = metrics.segmentation_scores(confusions, ["x", "y"])
  assert scores["miou"] == 1.0 and scores["interior/miou"] == 1.0
  assert scores["boundary/oa"] == pytest.approx(2 / 4)
  assert scores["boundary/miou"] == pytest.approx((1 / 3 + 1 / 3) / 2)  # [[1, 2], [0, 1]]
  assert "iou/x" in scores and "boundary/iou/x" not in scores


def test_similarity_sums_and_scores():
  rng = np.random.default_rng(3)
  sim = rng.normal(size=(2, 4, 4, 3, 3)).astype(np.float32)
  target = (rng.random(sim.shape) > 0.5).astype(np.float32)
  mask = rng.random(sim.shape) > 0.3
  sums = {k: float(v) for k, v in metrics.similarity_sums(sim, target, mask).items()}
  scores = metrics.similarity_scores(sums)
  assert scores["sim_same"] == pytest.approx(sim[(target == 1) & mask].mean(), rel=1e-5)
  assert scores["sim_diff"] == pytest.approx(sim[(target == 0) & mask].mean(), rel=1e-5)
  unmasked = metrics.similarity_scores(metrics.similarity_sums(sim, target))
  assert unmasked["sim_same"] == pytest.approx(sim[target == 1].mean(), rel=1e-5)
