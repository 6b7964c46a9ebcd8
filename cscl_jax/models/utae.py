"""U-TAE: a U-Net over space with an L-TAE over time (Sainte Fare Garnot & Landrieu, 2021).

The reference is VSainteuf/utae-paps `src/backbones/utae.py` ("UTAE", agg_mode
"att_group", encoder_norm "group", padding_mode "reflect"):

  1. Spatial encoder, shared over dates: in_conv = 2 x [conv 3x3 + GroupNorm(4) + ReLU]
     to w0, then per level a DownBlock (conv k4 s2 p1 + GN + ReLU, then conv1 and a
     residual conv2, each 3x3 + GN + ReLU) to w1, w2, w3. Padded dates are not encoded:
     their feature maps are zeros (the original's `pad_value`).
  2. Temporal encoder: the L-TAE (`ltae.LTAE`) on the deepest maps, with the dates'
     sinusoidal encoding, padded dates masked -> [B, H/8, W/8, w3] and attention masks
     [B, T, H/8, W/8, 16].
  3. Decoder with attention-driven skips: each skip's series is averaged over time with
     the L-TAE's masks (bilinearly upsampled to its resolution, head i weighting channel
     group i, padded dates zeroed) and joins an UpBlock (ConvTranspose k4 s2 p1 + BN +
     ReLU; skip 1x1 conv + BN + ReLU; conv1 and residual conv2, 3x3 + BN + ReLU).

`UTAE` returns the decoder's output [B, H, W, d0], what the original returns with
`encoder=True`; it is the per-pixel embedding that the CSCL head reads in pre-training.
The original's classifier `out_conv` = 2 x [conv 3x3 + BatchNorm + ReLU] (d0 -> d0 ->
classes; its logits are ReLU-ed too) is `ConvLayer((d0, classes), norm="batch")`, the
stage head of finetune / supervised (models.create_model). PASTIS defaults: 10 bands,
widths [64, 64, 64, 128] / [32, 32, 64, 128], out_conv [32, 20]: 1,087,260 parameters.

Inputs are ours: [B, T, H, W, C], C - 1 bands then the day-of-year channel doy / 365.0001
(the original takes the bands and the dates separately). The dates are recovered as whole
days, not clipped to 365 (the PASTIS weights count days from 2018-09-01). A date is padding
where all its bands equal `pad_value` (0), the original's test; for our pipeline, which
zero-pads missing dates, that is `dates.valid_dates`' doy channel = 0. H and W must be
divisible by 8; T is free.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cscl_jax.models import dates
from cscl_jax.models import layers
from cscl_jax.models import ltae

ENCODER_GROUPS = 4  # The original's GroupNorm(4) in the spatial encoder.


class ConvLayer(nn.Module):
  """[Conv k x k, stride s, reflect padding p -> GroupNorm(4) or BatchNorm -> ReLU] per width.

  utae-paps' ConvLayer (last_relu=True) on [N, H, W, C].

  Attributes:
    features: output channels of each conv in turn.
    kernel_size: k.
    stride: s.
    padding: reflect padding p on each side.
    norm: "group" (GroupNorm(4)) or "batch".
    dtype: computation dtype.
    axis_name: pmap axis over which BatchNorm averages its statistics.
  """
  features: Sequence[int]
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  norm: str = "batch"
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    p, k = self.padding, self.kernel_size
    for i, features in enumerate(self.features):
      x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
      x = nn.Conv(features, (k, k), strides=self.stride, padding="VALID",
                  kernel_init=layers.TORCH_DEFAULT_INIT, dtype=self.dtype,
                  name=f"conv{i}")(x)
      if self.norm == "group":
        x = nn.GroupNorm(num_groups=ENCODER_GROUPS, epsilon=layers.NORM_EPSILON,
                         use_fast_variance=False, dtype=self.dtype, name=f"norm{i}")(x)
      else:
        x = layers.batch_norm(train=train, axis_name=self.axis_name, dtype=self.dtype,
                              name=f"norm{i}")(x)
      x = nn.relu(x)
    return x


class DownBlock(nn.Module):
  """Strided conv (k4 s2 p1) keeping the width, then conv1 -> width and conv1 + conv2(conv1).

  Attributes:
    features: output width.
    dtype: computation dtype.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [N, H, W, C] to [N, H/2, W/2, features]."""
    conv = lambda width, name, **kw: ConvLayer((width,), norm="group", dtype=self.dtype,
                                               name=name, **kw)
    # GroupNorm keeps no statistics: the same in training and evaluation.
    x = conv(x.shape[-1], "down", kernel_size=4, stride=2)(x, train=False)
    x = conv(self.features, "conv1")(x, train=False)
    return x + conv(self.features, "conv2")(x, train=False)


class UpBlock(nn.Module):
  """ConvTranspose (k4 s2 p1) + BN + ReLU, concatenated with the 1x1-convolved skip.

  Attributes:
    features: output width.
    dtype: computation dtype.
    axis_name: pmap axis over which BatchNorm averages its statistics.
  """
  features: int
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, *, train: bool) -> jax.Array:
    """Maps [N, h, w, C] and the skip [N, 2h, 2w, S] to [N, 2h, 2w, features]."""
    norm = lambda name: layers.batch_norm(train=train, axis_name=self.axis_name,
                                          dtype=self.dtype, name=name)
    skip = nn.Conv(skip.shape[-1], (1, 1), kernel_init=layers.TORCH_DEFAULT_INIT,
                   dtype=self.dtype, name="skip_conv")(skip)
    skip = nn.relu(norm("skip_norm")(skip))
    up = layers.conv_transpose_x2(self.features, 4, 2, padding=1, output_padding=0,
                                  dtype=self.dtype, name="up")(x)
    up = nn.relu(norm("up_norm")(up))
    conv = lambda name: ConvLayer((self.features,), norm="batch", dtype=self.dtype,
                                  axis_name=self.axis_name, name=name)
    out = conv("conv1")(jnp.concatenate([up, skip], -1), train=train)
    return out + conv("conv2")(out, train=train)


def aggregate_skip(x: jax.Array, attention: jax.Array, pad_mask: jax.Array) -> jax.Array:
  """The original's "att_group" temporal aggregation of a skip connection.

  Args:
    x: the skip's feature series [B, T, Hs, Ws, C], C divisible by the heads n.
    attention: L-TAE masks [B, T, h, w, n] at the deepest resolution (h <= Hs).
    pad_mask: [B, T], True at padded dates.

  Returns:
    [B, Hs, Ws, C]: channel group i averaged over time with head i's mask, resized
    bilinearly (half-pixel centres, as PyTorch's align_corners=False) to Hs x Ws.
  """
  b, t, hs, ws, c = x.shape
  heads = attention.shape[-1]
  if attention.shape[2:4] != (hs, ws):
    attention = jax.image.resize(attention, (b, t, hs, ws, heads), "bilinear")
  attention = attention * ~pad_mask[:, :, None, None, None]
  groups = x.reshape(b, t, hs, ws, heads, c // heads)
  out = jnp.einsum("bthwn,bthwnc->bhwnc", attention.astype(x.dtype), groups)
  return out.reshape(b, hs, ws, c)


class UTAE(nn.Module):
  """U-TAE encoder: [B, T, H, W, C] -> the decoder's per-pixel embedding [B, H, W, d0].

  Attributes:
    num_channels: input channels C, the day-of-year channel included (PASTIS: 11).
    encoder_widths: widths of the spatial encoder's levels, top to bottom.
    decoder_widths: widths of the decoder's levels, top to bottom (last = encoder's).
    n_head: L-TAE heads (divides encoder_widths[0..-2] and the last width).
    d_model: L-TAE width.
    d_k: L-TAE query/key width.
    dropout_rate: L-TAE dropout after its MLP (original 0.2).
    attention_dropout_rate: L-TAE dropout on the attention weights (original 0.1).
    pad_value: band value of padded dates.
    dtype: computation dtype; parameters and statistics stay float32.
    axis_name: pmap axis over which BatchNorm averages its statistics.
  """
  num_channels: int = 11
  encoder_widths: Sequence[int] = (64, 64, 64, 128)
  decoder_widths: Sequence[int] = (32, 32, 64, 128)
  n_head: int = 16
  d_model: int = 256
  d_k: int = 4
  dropout_rate: float = 0.2
  attention_dropout_rate: float = 0.1
  pad_value: float = 0.0
  dtype: Any = jnp.float32
  axis_name: str | None = None

  def _check(self, x: jax.Array) -> None:
    """Raises ValueError for an input or configuration this network cannot take."""
    if x.ndim != 5:
      raise ValueError(f"UTAE expects inputs [B, T, H, W, C]; got shape {x.shape}.")
    if x.shape[-1] != self.num_channels:
      raise ValueError(f"UTAE was built for {self.num_channels} input channels (bands + "
                       f"day of year; model.num_channels) but got C={x.shape[-1]} in "
                       f"input shape {x.shape}.")
    scale = 2 ** (len(self.encoder_widths) - 1)
    if x.shape[2] % scale or x.shape[3] % scale:
      raise ValueError(f"UTAE needs H and W divisible by {scale} (it halves them "
                       f"{len(self.encoder_widths) - 1} times); got input shape {x.shape}.")
    widths = (*self.encoder_widths[:-1], self.encoder_widths[-1], self.d_model)
    if any(w % self.n_head for w in widths) or self.encoder_widths[0] % ENCODER_GROUPS:
      raise ValueError(
          f"UTAE's widths {self.encoder_widths} and d_model={self.d_model} must be "
          f"divisible by its {self.n_head} L-TAE heads (and the first by {ENCODER_GROUPS});"
          " here model.num_features must be a multiple of 4.")

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Maps [B, T, H, W, C] to the embedding [B, H, W, decoder_widths[0]]."""
    self._check(x)
    b, t, h, w, _ = x.shape
    bands = x[..., :-1].reshape(b * t, h, w, -1)  # dates as a batch: [BT, H, W, C-1]
    days = x[:, :, 0, 0, -1].astype(jnp.float32) * dates.DOY_SCALE
    positions = jnp.round(days)  # [B, T]
    pad_mask = jnp.all(x[..., :-1] == self.pad_value, axis=(2, 3, 4))  # [B, T]
    keep = ~pad_mask.reshape(b * t, 1, 1, 1)

    maps = [jnp.where(keep, ConvLayer(  # [BT, H, W, w0]
        (self.encoder_widths[0],) * 2, norm="group", dtype=self.dtype,
        name="in_conv")(bands, train=train), self.pad_value)]
    for i, width in enumerate(self.encoder_widths[1:]):  # [BT, H / 2^(i+1), ., width]
      down = DownBlock(width, dtype=self.dtype, name=f"down{i}")(maps[-1])
      maps.append(jnp.where(keep, down, self.pad_value))
    series = lambda m: m.reshape(b, t, *m.shape[1:])  # [B, T, h, w, c]

    out, attention = ltae.LTAE(  # [B, H/8, W/8, w3], [B, T, H/8, W/8, n_head]
        out_channels=self.encoder_widths[-1], n_head=self.n_head, d_k=self.d_k,
        d_model=self.d_model, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
        axis_name=self.axis_name, name="temporal_encoder")(
            series(maps[-1]), positions, pad_mask, train=train)
    for i in range(len(self.encoder_widths) - 1):  # up{i}: level L-2-i, coarse to fine
      level = len(self.encoder_widths) - 2 - i
      skip = aggregate_skip(series(maps[level]), attention, pad_mask)
      out = UpBlock(self.decoder_widths[level], dtype=self.dtype, axis_name=self.axis_name,
                    name=f"up{i}")(out, skip, train=train)
    return out  # [B, H, W, decoder_widths[0]]
