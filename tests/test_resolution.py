"""cscl_jax.resolution against TensorFlow's bilinear resize."""

import numpy as np
import tensorflow as tf

from cscl_jax import resolution


def test_resize_bilinear_matches_tf():
  x = np.random.default_rng(0).random((2, 3, 8, 4))
  got = resolution.resize_bilinear(x, 48, 12)
  want = tf.image.resize(np.moveaxis(x, 1, -1), (48, 12), method="bilinear").numpy()
  np.testing.assert_allclose(got, np.moveaxis(want, -1, 1), rtol=1e-5)
