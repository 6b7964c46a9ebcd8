"""Putting Sentinel-2 bands of 20 m and 60 m on the 10 m grid, shared by the builders.

Every builder that reads bands at their native resolution (t31tfm_1618, mtlcc) upsamples them
with this one function, as the reference does with torch `F.upsample(mode="bilinear")`
(align_corners=False), which is also `tf.image.resize(method="bilinear")`.
"""

import numpy as np


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes [..., h, w] to [..., height, width]: bilinear, half-pixel centres, edges clamped."""
  for axis, size in ((-2, height), (-1, width)):
    n = image.shape[axis]
    source = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, n - 1)
    shape = [1] * image.ndim
    shape[axis] = size
    weight = (source - low).reshape(shape)
    image = (np.take(image, low, axis=axis) * (1 - weight)
             + np.take(image, high, axis=axis) * weight)
  return image
