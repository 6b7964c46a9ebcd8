"""UNet2D-ConvLSTM: a per-frame 2D U-Net followed by a ConvLSTM over time.

The reference "UNET2D-CLSTM" (FCN_CRNN, after Rustowicz et al. 2019) used for the
MTLCC experiments (SPEC.md §2):

  1. A 2D U-Net (encoder with GroupNorm, decoder with BatchNorm, E output
     features) maps every frame [H, W, C] to [H, W, E], shared weights over time.
  2. A one-layer ConvLSTM (hidden E, 3x3 kernels) runs over the T frames. Its
     three norms are recurrent BatchNorms (Cooijmans et al. 2016): one scale
     vector shared over time (initialised to 0.1, no offset) and separate running
     statistics for every time step.
  3. The T hidden states are averaged: embeddings [B, H, W, E].

H and W must be divisible by 4; T must equal `time_steps` (one set of BatchNorm
statistics per step).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cscl_jax.models import layers


class UNet2D(nn.Module):
  """Reference U-Net (UNet_Encode + UNet_Decode, late features) on [N, H, W, C].

  Attributes:
    out_features: output channels E.
    num_features: base width f (the reference hard-codes 16).
    dtype: computation dtype.
    axis_name: pmap axis over which BatchNorm averages its statistics.
  """
  out_features: int = 128
  num_features: int = 16
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Maps [N, H, W, C] to [N, H, W, out_features]."""
    f = self.num_features
    common = dict(kernel_init=layers.KAIMING_NORMAL_INIT, dtype=self.dtype)

    def block(features, norm, name):
      return layers.ConvBlock(features, norm=norm, axis_name=self.axis_name,
                              name=name, **common)

    def up(features, name):  # ConvTranspose2d(kernel 2, stride 2), PyTorch init.
      return layers.conv_transpose_x2(features, 2, 2, padding=0, output_padding=0,
                                      dtype=self.dtype, name=name)

    enc3 = block((4 * f, 4 * f), "group", "enc3")(x, train=train)  # [N, H, W, 4f]
    enc4 = block((8 * f, 8 * f), "group", "enc4")(layers.max_pool_x2(enc3), train=train)
    center = block((16 * f,), "group", "center")(layers.max_pool_x2(enc4), train=train)
    # Decoder; center: [N, H/4, W/4, 16f].
    center = block((16 * f,), "group", "center_decode")(center, train=train)
    dec4 = up(8 * f, "center_up")(center)  # [N, H/2, W/2, 8f]
    dec4 = block((8 * f, 8 * f), "batch", "dec4")(
        jnp.concatenate([dec4, enc4], -1), train=train)
    dec3 = up(4 * f, "dec4_up")(dec4)  # [N, H, W, 4f]
    out = block((4 * f, 2 * f), "batch", "final")(
        jnp.concatenate([dec3, enc3], -1), train=train)
    return nn.Conv(self.out_features, (3, 3), padding=1, name="final_conv",
                   **common)(out)  # [N, H, W, E]


class ConvLSTMCell(nn.Module):
  """One ConvLSTM step with recurrent BatchNorm; scanned over time by `nn.scan`.

  gates = BN_h(conv_h(h)) + BN_x(conv_x(x)), split into (i, f, o, g);
  c' = sigmoid(f) c + sigmoid(i) tanh(g); h' = sigmoid(o) BN_c(tanh(c')).
  Under `nn.scan` with variable_axes={"batch_stats": 0}, each norm keeps running
  statistics [T, channels], one row per step, and one shared scale.

  Attributes:
    hidden: hidden channels.
    train: batch statistics (True) or running statistics (False).
    dtype: computation dtype; the cell state c is kept in float32 (or wider).
    axis_name: pmap axis over which BatchNorm averages its statistics.
  """
  hidden: int
  train: bool
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, carry: tuple[jax.Array, jax.Array], x: jax.Array
               ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """(h [B, H, W, hidden], c [B, H, W, hidden]), x [B, H, W, C] -> (h', c'), h'."""
    h, c = carry

    def conv(name):
      return nn.Conv(4 * self.hidden, (3, 3), padding=1, dtype=self.dtype,
                     kernel_init=layers.KAIMING_NORMAL_INIT, name=name)

    def norm(name):  # RecurrentNorm2d: scale 0.1, no offset.
      return layers.batch_norm(train=self.train, axis_name=self.axis_name,
                               dtype=self.dtype, use_bias=False,
                               scale_init=nn.initializers.constant(0.1), name=name)

    gates = norm("h_norm")(conv("h_conv")(h)) + norm("x_norm")(conv("x_conv")(x))
    i, f, o, g = jnp.split(gates, 4, axis=-1)  # each [B, H, W, hidden]
    c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
    h = nn.sigmoid(o) * norm("c_norm")(jnp.tanh(c))
    return (h, c), h


class ConvLSTM(nn.Module):
  """One-layer ConvLSTM over [B, T, H, W, C] from a zero state; per-step BN statistics.

  Attributes:
    hidden: hidden channels.
    dtype: computation dtype.
    axis_name: pmap axis over which BatchNorm averages its statistics.
  """
  hidden: int
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Maps [B, T, H, W, C] to the hidden states [B, T, H, W, hidden]."""
    b, _, h, w, _ = x.shape
    # Fully unrolled: T is small, and XLA:CPU runs the gradients of convolutions
    # inside a loop ~60x slower than the same convolutions unrolled.
    scan = nn.scan(ConvLSTMCell, variable_axes={"batch_stats": 0},
                   variable_broadcast="params", split_rngs={"params": False},
                   in_axes=1, out_axes=1, unroll=x.shape[1])
    carry = (jnp.zeros((b, h, w, self.hidden), self.dtype),
             jnp.zeros((b, h, w, self.hidden), jnp.promote_types(self.dtype, jnp.float32)))
    _, hidden = scan(self.hidden, train, dtype=self.dtype, axis_name=self.axis_name,
                     name="cell")(carry, x)
    return hidden


class UNet2DConvLSTM(nn.Module):
  """Reference UNet2D-ConvLSTM encoder: [B, T, H, W, C] -> embeddings [B, H, W, E].

  With the defaults and 15 channels: 3,072,544 parameters (the U-Net 1,890,720,
  the ConvLSTM 1,181,824). The reference's initial (h, c) are zeros that are
  never trained (its nn.Parameters are not registered), so they are constants here.

  Attributes:
    num_channels: input channels C.
    time_steps: T; one set of ConvLSTM BatchNorm statistics per step.
    num_features: U-Net base width f; a multiple of 4 (GroupNorm of 16 channels).
    emb_channels: U-Net output and ConvLSTM hidden channels E.
    dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    axis_name: pmap axis over which BatchNorm averages its statistics.
  """
  num_channels: int = 15
  time_steps: int = 16
  num_features: int = 16
  emb_channels: int = 128
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Maps [B, T, H, W, C] to [B, H, W, emb_channels]."""
    if self.num_features % 4:
      raise ValueError(
          f"UNet2DConvLSTM needs num_features divisible by 4 (its GroupNorms have "
          f"{layers.GROUP_SIZE} channels a group, the first 4f channels); got "
          f"num_features={self.num_features}.")
    layers.check_input(type(self).__name__, x, num_channels=self.num_channels,
                       time_steps=self.time_steps, pooled_axes="HW")
    b, t, h, w, c = x.shape
    frames = UNet2D(self.emb_channels, self.num_features, dtype=self.dtype,
                    axis_name=self.axis_name, name="unet")(
                        x.reshape(b * t, h, w, c), train=train)
    frames = frames.reshape(b, t, h, w, self.emb_channels)  # [B, T, H, W, E]
    hidden = ConvLSTM(self.emb_channels, dtype=self.dtype, axis_name=self.axis_name,
                      name="clstm")(frames, train=train)  # [B, T, H, W, E]
    return jnp.mean(hidden, axis=1, dtype=jnp.float32).astype(self.dtype)  # [B, H, W, E]
