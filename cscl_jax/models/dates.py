"""Acquisition dates from the inputs: which dates are padding, and their day of year.

The input pipeline appends the day of year as the last channel, doy / DOY_SCALE with
doy in 1..366, the same value at every pixel of a date, and pads a series shorter than
max_seq_len with all-zero dates. A real date's channel is therefore at least
1 / DOY_SCALE > 0 and a padded date's is exactly 0: that is the padding signal the
sequence encoders (BiConvGRU, TSViT) read, with no extra input.
"""

import jax
import jax.numpy as jnp

DOY_SCALE = 365.0001  # = cscl_jax.features.DOY_SCALE (kept here: models do not import tfds).
NUM_DAYS = 366  # Rows of TSViT's day-of-year table: days 0 (padding) .. 365.


def valid_dates(x: jax.Array) -> jax.Array:
  """Which dates are real (not padding): bool [B, T] from inputs [B, T, H, W, C]."""
  return x[:, :, 0, 0, -1] > 0


def day_of_year(x: jax.Array) -> jax.Array:
  """The integer day of year of each date, int32 [B, T], from inputs [B, T, H, W, C].

  Rounds doy / DOY_SCALE * DOY_SCALE (exact for every day 0..366 in float32, where the
  reference's truncation gives the day before for 19 of them) and clips to
  0..NUM_DAYS - 1, so day 366 shares the row of day 365. Padded dates give 0.
  """
  scaled = x[:, :, 0, 0, -1].astype(jnp.float32) * jnp.float32(DOY_SCALE)
  return jnp.clip(jnp.round(scaled), 0, NUM_DAYS - 1).astype(jnp.int32)
