"""Sentinel-2 band resolutions and the one resampling of 20 m and 60 m bands to the 10 m grid.

Every path from raw bands to `cscl_jax.features` examples (the `t31tfm_1618` builder, dataset
generation, whole-tile prediction) brings coarse bands to 10 m with `resize_bilinear`, so the
inputs a model sees do not depend on where they came from.
"""

import numpy as np

# Native pixel size of each band in units of 10 m.
BAND_FACTOR = {**dict.fromkeys(("B02", "B03", "B04", "B08"), 1),
               **dict.fromkeys(("B05", "B06", "B07", "B8A", "B11", "B12"), 2),
               **dict.fromkeys(("B01", "B09", "B10"), 6)}
# A window on the 10 m grid covers whole pixels of every band when its offsets and sizes are
# multiples of this (the 60 m pixel).
ALIGNMENT = max(BAND_FACTOR.values())


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes [..., h, w] to [..., height, width]: bilinear, half-pixel centres, edges clamped.

  The reference pre-processing (torch `F.upsample(mode="bilinear")`, align_corners=False;
  also `tf.image.resize(method="bilinear")`). Returns float64.
  """
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
