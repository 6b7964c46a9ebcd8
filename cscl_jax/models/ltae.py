"""L-TAE: the Lightweight Temporal Attention Encoder of U-TAE, on feature-map series.

Sainte Fare Garnot & Landrieu (2020, 2021; VSainteuf/utae-paps `src/backbones/ltae.py`
"LTAE2d"), applied independently to every pixel of [B, T, h, w, C]:

  1. GroupNorm(n_head groups) over (time, channels of the group) of each pixel's series,
     padded dates included (their features are zeros, as in the original).
  2. A 1x1 projection C -> d_model, plus the sinusoidal encoding of the dates (period
     1000, d_model / n_head frequencies repeated for every head).
  3. n_head attention heads with one learned master query each (d_k wide) against keys
     Linear(d_model -> n_head d_k); scores / sqrt(d_k); padded dates set to -1000 (the
     original's masked_fill) before the softmax over time. Head i averages channels
     [i d_model / n_head, (i + 1) d_model / n_head) of the values over time.
  4. The concatenated heads go through Linear(d_model -> C_out) + BatchNorm + ReLU,
     dropout, and a per-pixel GroupNorm(n_head).

Returns the feature map [B, h, w, C_out] and the attention masks [B, T, h, w, n_head]
that U-TAE reuses to aggregate its skip connections.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cscl_jax.models import layers

MASKED_SCORE = -1e3  # The original's masked_fill value for padded dates.


def positional_encoding(positions: jax.Array, channels: int, period: float = 1000.0,
                        repeat: int = 1) -> jax.Array:
  """Sinusoidal encoding of dates, as utae-paps' PositionalEncoder.

  Channel j of `channels` is sin (j even) or cos (j odd) of
  positions / period^(2 floor(j / 2) / channels); the table is tiled `repeat` times.

  Args:
    positions: dates [...], e.g. days [B, T].
    channels: frequencies per repeat (d_model / n_head in the L-TAE).
    period: the longest period T of the encoding.
    repeat: copies concatenated along the last axis (one per attention head).

  Returns:
    float32 [..., channels * repeat].
  """
  j = np.arange(channels)
  inv_denominator = (1.0 / np.power(period, 2 * (j // 2) / channels)).astype(np.float32)
  angles = positions.astype(jnp.float32)[..., None] * inv_denominator  # [..., channels]
  table = jnp.where(j % 2 == 0, jnp.sin(angles), jnp.cos(angles))
  return jnp.tile(table, (1,) * positions.ndim + (repeat,))


class LTAE(nn.Module):
  """L-TAE with the U-TAE defaults (16 heads, d_k 4, d_model 256, MLP [256, C_out]).

  Attributes:
    out_channels: output channels (the MLP's last width; U-TAE: its deepest width).
    n_head: attention heads; divides the input channels, d_model and out_channels.
    d_k: width of the queries and keys.
    d_model: width after the input projection; the attention's values.
    dropout_rate: dropout after the MLP (the original's 0.2).
    attention_dropout_rate: dropout on the attention weights (the original's 0.1).
    period: period T of the date encoding (1000).
    dtype: computation dtype; norms reduce and the softmax runs in float32.
    axis_name: pmap axis over which the MLP's BatchNorm averages its statistics.
  """
  out_channels: int = 128
  n_head: int = 16
  d_k: int = 4
  d_model: int = 256
  dropout_rate: float = 0.2
  attention_dropout_rate: float = 0.1
  period: float = 1000.0
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, pad_mask: jax.Array, *,
               train: bool) -> tuple[jax.Array, jax.Array]:
    """Encodes the series of every pixel.

    Args:
      x: features [B, T, h, w, C].
      positions: dates [B, T] (days).
      pad_mask: [B, T], True where the date is padding.
      train: dropout and BatchNorm batch statistics.

    Returns:
      (features [B, h, w, out_channels], attention [B, T, h, w, n_head] in float32).
    """
    heads, d_k = self.n_head, self.d_k
    init = layers.TORCH_DEFAULT_INIT
    # Per pixel: statistics over time and the channels of each of the n_head groups.
    out = nn.GroupNorm(num_groups=heads, epsilon=layers.NORM_EPSILON, reduction_axes=(1, -1),
                       use_fast_variance=False, dtype=self.dtype, name="in_norm")(x)
    out = nn.Dense(self.d_model, kernel_init=init, dtype=self.dtype, name="inconv")(out)
    encoding = positional_encoding(positions, self.d_model // heads, self.period, heads)
    out = out + encoding[:, :, None, None].astype(out.dtype)  # [B, T, h, w, d_model]

    # Keys [B, T, h, w, n_head, d_k] against one master query per head.
    normal = nn.initializers.normal(stddev=np.sqrt(2.0 / d_k))
    query = self.param("query", normal, (heads, d_k))  # the original's Q
    keys = nn.Dense(heads * d_k, kernel_init=normal, dtype=self.dtype, name="fc1_k")(out)
    keys = keys.reshape(*keys.shape[:-1], heads, d_k).astype(jnp.float32)
    scores = jnp.einsum("bthwnk,nk->bthwn", keys, query) / np.sqrt(d_k)
    scores = jnp.where(pad_mask[:, :, None, None, None], MASKED_SCORE, scores)
    attention = jax.nn.softmax(scores, axis=1)  # over time: [B, T, h, w, n_head]
    weights = nn.Dropout(self.attention_dropout_rate)(attention, deterministic=not train)

    values = out.reshape(*out.shape[:-1], heads, -1)  # [B, T, h, w, n_head, d_model/n]
    out = jnp.einsum("bthwn,bthwnc->bhwnc", weights.astype(values.dtype), values)
    out = out.reshape(*out.shape[:-2], self.d_model)  # heads concatenated: [B, h, w, d]
    out = nn.Dense(self.out_channels, kernel_init=init, dtype=self.dtype, name="mlp")(out)
    out = layers.batch_norm(train=train, axis_name=self.axis_name, dtype=self.dtype,
                            name="mlp_norm")(out)
    out = nn.Dropout(self.dropout_rate)(nn.relu(out), deterministic=not train)
    out = nn.GroupNorm(num_groups=heads, epsilon=layers.NORM_EPSILON, reduction_axes=(-1,),
                       use_fast_variance=False, dtype=self.dtype, name="out_norm")(out)
    return out, attention  # [B, h, w, out_channels], [B, T, h, w, n_head]
