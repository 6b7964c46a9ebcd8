"""benchmarks/cscl_pairs.py: the kinds of CSCL entries against a plain loop."""

import numpy as np
import pytest

from benchmarks import cscl_pairs


def _kinds_loop(labels, known, k, s, d, out_hw):
  """The kind of every entry [B, H', W', k, k], one pixel pair at a time."""
  b_, h, w = labels.shape
  kinds = np.empty((b_,) + out_hw + (k, k), object)
  r = k // 2
  for b in range(b_):
    for i in range(out_hw[0]):
      for j in range(out_hw[1]):
        for a in range(k):
          for c in range(k):
            pi, pj = s * i, s * j
            qi, qj = pi + d * (a - r), pj + d * (c - r)
            if a == r and c == r:
              kind = "centre"
            elif not (0 <= qi < h and 0 <= qj < w):
              kind = "out of the image"
            else:
              same = labels[b, qi, qj] == labels[b, pi, pj]
              if known[b, pi, pj] and known[b, qi, qj]:
                kind = "same class" if same else "different class"
              else:
                kind = "unknown pixel, " + ("same label" if same else "different label")
            kinds[b, i, j, a, c] = kind
  return kinds


@pytest.mark.parametrize("k,s,d", [(3, 1, 1), (5, 2, 2), (3, 1, 2)])
def test_pair_kinds_match_a_loop(k, s, d):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=(2, 7, 6))  # 3 means unknown
  known = labels < 3
  kinds = cscl_pairs.pair_kinds(labels, known, kernel_size=k, stride=s, dilation=d)
  shape = next(iter(kinds.values())).shape
  expected = _kinds_loop(labels, known, k, s, d, shape[1:3])
  assert np.all(sum(v.astype(int) for v in kinds.values()) == 1)  # one kind an entry
  for kind, where in kinds.items():
    np.testing.assert_array_equal(where, expected == kind, err_msg=kind)
