"""3D U-Nets over (time, height, width): UNet3Df (the CSCL encoder) and UNet3D.

Both convolve the whole series [B, T, H, W, C] with 3x3x3 kernels, pool time and
space together twice, decode back with skip connections, and squeeze time with a
learned linear map T -> 1 at the end (SPEC.md §2). They share everything up to
the last decoder block:

  UNet3Df: dc3 = 8f -> 8f, final Conv3d(8f -> emb_channels): embeddings [B, H, W, E].
  UNet3D:  dc3 = 4f -> 2f, final Conv3d(2f -> num_classes), dropout: logits [B, H, W, K].

T, H and W must all be divisible by 4. UNet3Df can end in 1 or 2 up-blocks
(`output_magnification` 2 or 4, SPEC.md §5) that map the embeddings to a 2x or 4x finer
grid, [B, m H, m W, E], for crop maps at 5 m or 2.5 m from 10 m inputs.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cscl_jax.models import layers


class UNet3D(nn.Module):
  """Reference UNet3D: 3D U-Net segmenter with a linear squeeze of time.

  With the defaults and 14 channels, T = 16, 20 outputs: 6,183,429 parameters.

  Attributes:
    out_features: channels of the output (classes for UNet3D).
    num_channels: input channels C.
    time_steps: input length T (the time squeeze is a Linear(T -> 1)).
    num_features: base width f.
    dc3_features: the last decoder block's two conv widths, in units of f.
    dropout_rate: dropout before the time squeeze (reference default 0).
    dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    axis_name: pmap axis over which BatchNorm averages its statistics.
  """
  out_features: int
  num_channels: int = 14
  time_steps: int = 16
  num_features: int = 16
  dc3_features: tuple[int, int] = (4, 2)
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Maps [B, T, H, W, C] to [B, H, W, out_features]."""
    layers.check_input(type(self).__name__, x, num_channels=self.num_channels,
                       time_steps=self.time_steps, pooled_axes="THW")
    f = self.num_features
    norm = dict(axis_name=self.axis_name, dtype=self.dtype)

    def block(features, name):
      return layers.ConvBlock(tuple(features), name=name, **norm)

    def up(features, name):
      return layers.conv_transpose_x2(features, 3, 3, padding=1, output_padding=1,
                                      dtype=self.dtype, name=name)

    en3 = block((4 * f, 4 * f), "en3")(x, train=train)  # [B, T, H, W, 4f]
    en4 = block((8 * f, 8 * f), "en4")(layers.max_pool_x2(en3), train=train)
    # en4: [B, T/2, H/2, W/2, 8f]; center: [B, T/4, H/4, W/4, 16f]
    center = block((16 * f, 16 * f), "center")(layers.max_pool_x2(en4), train=train)
    up4 = up(8 * f, "center_up")(center)  # [B, T/2, H/2, W/2, 8f], no norm
    dc4 = block((8 * f, 8 * f), "dc4")(jnp.concatenate([up4, en4], -1), train=train)
    up3 = up(4 * f, "trans3")(dc4)  # [B, T, H, W, 4f]
    up3 = layers.batch_norm(train=train, name="trans3_norm", **norm)(up3)
    up3 = nn.leaky_relu(up3, layers.LEAKY_SLOPE)
    dc3 = block([m * f for m in self.dc3_features], "dc3")(
        jnp.concatenate([up3, en3], -1), train=train)
    out = layers.conv(self.out_features, (3, 3, 3), dtype=self.dtype,
                      kernel_init=layers.TORCH_DEFAULT_INIT, name="final")(dc3)
    out = nn.Dropout(self.dropout_rate)(out, deterministic=not train)
    out = jnp.moveaxis(out, 1, -1)  # [B, H, W, out_features, T]
    out = nn.Dense(1, dtype=self.dtype, kernel_init=layers.TORCH_DEFAULT_INIT,
                   name="time_fc")(out)
    return out[..., 0]  # [B, H, W, out_features]


class UpBlock(nn.Module):
  """ConvTranspose2d(E -> E, kernel 3, stride 2, pad 1, output_pad 1) + BatchNorm + LeakyReLU.

  The reference's `up_conv_block_2d`: [B, H, W, E] -> [B, 2H, 2W, E]; 147,840
  parameters for E = 128.

  Attributes:
    dtype: computation dtype.
    axis_name: pmap axis over which BatchNorm averages its statistics.
  """
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = layers.conv_transpose_x2(x.shape[-1], 3, 2, padding=1, output_padding=1,
                                 dtype=self.dtype, name="up")(x)  # [B, 2H, 2W, E]
    x = layers.batch_norm(train=train, axis_name=self.axis_name, dtype=self.dtype,
                          name="norm")(x)
    return nn.leaky_relu(x, layers.LEAKY_SLOPE)


MAGNIFICATIONS = (1, 2, 4)


class UNet3Df(UNet3D):
  """Reference UNet3Df: the CSCL encoder, a wider UNet3D that outputs embeddings.

  With the defaults and 14 channels, T = 16: 7,217,361 parameters, plus 147,840 per
  up-block ("conv_out_x2", "conv_out_x4", as the reference's UNet3D_CSCL names them).
  `out_features` is the embedding width E (8f in the reference).

  Attributes:
    output_magnification: 1, 2 or 4: embeddings [B, m H, m W, E].
  """
  out_features: int = 128
  dc3_features: tuple[int, int] = (8, 8)
  output_magnification: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Maps [B, T, H, W, C] to [B, m H, m W, out_features]."""
    if self.output_magnification not in MAGNIFICATIONS:
      raise ValueError(f"UNet3Df output_magnification={self.output_magnification}; "
                       f"choose one of {MAGNIFICATIONS} (model.output_magnification).")
    emb = super().__call__(x, train=train)  # [B, H, W, E]
    for m in (2, 4)[:MAGNIFICATIONS.index(self.output_magnification)]:
      emb = UpBlock(dtype=self.dtype, axis_name=self.axis_name, name=f"conv_out_x{m}")(
          emb, train=train)
    return emb  # [B, m H, m W, E]
