"""Building blocks shared by the U-Net encoders, with PyTorch's numerics.

The reference encoders are PyTorch models; these helpers reproduce their layer
conventions in Flax so that our networks are the same functions with the same
parameter counts: BatchNorm eps 1e-5 / momentum 0.1 (Flax momentum 0.9),
LeakyReLU slope 0.01, 'same' zero padding, PyTorch's transposed-convolution
geometry and PyTorch's default weight initialisation.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_MOMENTUM = 0.9  # Flax keeps `momentum` of the old value: PyTorch momentum 0.1.
NORM_EPSILON = 1e-5  # PyTorch default for BatchNorm and GroupNorm.
LEAKY_SLOPE = 0.01  # PyTorch LeakyReLU default.
GROUP_SIZE = 16  # Reference GroupNorm(channels // 16, channels): 16 channels a group.

# PyTorch's default Conv/Linear weight init, kaiming_uniform(a=sqrt(5)), is
# U(+-1/sqrt(fan_in)), i.e. variance 1 / (3 fan_in). Biases start at zero here
# (PyTorch draws them from the same uniform); nearly all of them feed a norm.
TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# nn.init.kaiming_normal_ (fan_in, gain sqrt(2)), used by the reference 2D U-Net
# and ConvLSTM for every Conv2d.
KAIMING_NORMAL_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def batch_norm(*, train: bool, axis_name: str | None, dtype: Any,
               name: str | None = None, **kwargs) -> nn.BatchNorm:
  """PyTorch-equivalent BatchNorm; statistics pmean-ed over `axis_name`."""
  return nn.BatchNorm(
      use_running_average=not train, momentum=BN_MOMENTUM, epsilon=NORM_EPSILON,
      axis_name=axis_name, dtype=dtype, name=name, **kwargs)


def conv_transpose_x2(features: int, kernel_size: int, ndim: int, *, padding: int,
                      output_padding: int, dtype: Any, kernel_init: Any = TORCH_DEFAULT_INIT,
                      name: str | None = None) -> nn.ConvTranspose:
  """PyTorch ConvTranspose{ndim}d(kernel, stride=2, padding, output_padding).

  PyTorch's output size is 2 (n - 1) - 2 padding + kernel + output_padding; the
  same map is a convolution of the 2x-dilated input padded by
  (kernel - 1 - padding, kernel - 1 - padding + output_padding) per side with
  the spatially flipped kernel, which is what `transpose_kernel=True` does. The
  Flax kernel [k..., out, in] is PyTorch's weight [in, out, k...] transposed.
  """
  low = kernel_size - 1 - padding
  return nn.ConvTranspose(
      features, (kernel_size,) * ndim, strides=(2,) * ndim,
      padding=((low, low + output_padding),) * ndim, transpose_kernel=True,
      kernel_init=kernel_init, dtype=dtype, name=name)


def max_pool_x2(x: jax.Array) -> jax.Array:
  """MaxPool(kernel 2, stride 2) over every axis between batch and channels."""
  window = (2,) * (x.ndim - 2)
  return nn.max_pool(x, window, strides=window)


class ConvBlock(nn.Module):
  """[Conv 3^d ('same') -> BatchNorm or GroupNorm -> LeakyReLU] per entry of `features`.

  Works on [N, ..., C] for any number d of spatial axes (3 for Conv3d on
  [B, T, H, W, C], 2 for Conv2d on [N, H, W, C]).

  Attributes:
    features: output channels of each conv in turn.
    norm: "batch" (BatchNorm) or "group" (GroupNorm, 16 channels a group).
    kernel_init: initialiser of the conv kernels.
    dtype: computation dtype.
    axis_name: pmap axis over which BatchNorm averages its statistics.
  """
  features: Sequence[int]
  norm: str = "batch"
  kernel_init: Any = TORCH_DEFAULT_INIT
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kernel = (3,) * (x.ndim - 2)
    for i, features in enumerate(self.features):
      x = nn.Conv(features, kernel, padding=1, kernel_init=self.kernel_init,
                  dtype=self.dtype, name=f"conv{i}")(x)
      if self.norm == "batch":
        x = batch_norm(train=train, axis_name=self.axis_name, dtype=self.dtype,
                       name=f"norm{i}")(x)
      else:
        x = nn.GroupNorm(num_groups=features // GROUP_SIZE, epsilon=NORM_EPSILON,
                         dtype=self.dtype, name=f"norm{i}")(x)
      x = nn.leaky_relu(x, LEAKY_SLOPE)
    return x


def check_input(model: str, x: jax.Array, *, num_channels: int, time_steps: int,
                pooled_axes: str) -> None:
  """Raises ValueError unless x is [B, time_steps, H, W, num_channels] and fits the U-Net.

  Args:
    model: model name for the message.
    x: the input.
    num_channels: required C.
    time_steps: required T.
    pooled_axes: the axes ("THW" or "HW") that two 2x max-poolings halve and two
      2x up-convolutions double back, so each must be divisible by 4.
  """
  if x.ndim != 5:
    raise ValueError(f"{model} expects inputs [B, T, H, W, C]; got shape {x.shape}.")
  _, t, h, w, c = x.shape
  if c != num_channels:
    raise ValueError(f"{model} was built for {num_channels} input channels "
                     f"(model.num_channels) but got C={c} in input shape {x.shape}.")
  if t != time_steps:
    raise ValueError(f"{model} was built for T={time_steps} time steps "
                     f"(model.max_seq_len) but got T={t}; pad or cut the series.")
  sizes = {"T": t, "H": h, "W": w}
  for axis in pooled_axes:
    if sizes[axis] % 4:
      raise ValueError(
          f"{model} needs {axis} divisible by 4 (its U-Net halves {pooled_axes} twice "
          f"and doubles them back); got {axis}={sizes[axis]} in input shape {x.shape}.")
