"""Building blocks shared by the U-Net encoders, with PyTorch's numerics.

The reference encoders are PyTorch models; these helpers reproduce their layer
conventions in Flax so that our networks are the same functions with the same
parameter counts: BatchNorm eps 1e-5 / momentum 0.1 (Flax momentum 0.9),
LeakyReLU slope 0.01, 'same' zero padding, PyTorch's transposed-convolution
geometry and PyTorch's default weight initialisation.
"""

from collections.abc import Sequence
import os
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

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


def cpu_formulations() -> bool:
  """Whether convolutions take the CPU formulations below (decided when tracing).

  XLA:CPU runs matmuls and forward 2D convolutions of large images at its GEMM rate
  (YNNPACK), but 3D and transposed convolutions on a slow generic path
  (jax-ml/jax#31662), 2D convolution gradients on one core for small images and the
  kernel gradient at a quarter of the GEMM rate for large ones. There, a 3D convolution
  becomes a 2D one, a 2D convolution takes its gradients as matmuls and a stride-2
  transposed convolution runs in polyphase form. cuDNN and the TPU compiler handle all
  of them natively, so every other backend keeps the plain ops. The choice follows
  `jax.default_backend()`.
  """
  return jax.default_backend() == "cpu"


def conv3d_as_conv2d(x: jax.Array, kernel: jax.Array,
                     padding: Sequence[tuple[int, int]]) -> jax.Array:
  """Stride-1 3D convolution as one 2D convolution over (H, W) (`conv2d_matmul_grads`).

  The kt temporal neighbours of every frame are stacked on the channel axis, so the
  kernel [kt, kh, kw, C, O] becomes [kh, kw, kt*C, O]: the same sums in another
  order (float32 round-off apart).

  Args:
    x: [B, T, H, W, C].
    kernel: [kt, kh, kw, C, O].
    padding: zero padding ((low, high) for T, H and W).

  Returns:
    [B, T', H', W', O] as lax.conv_general_dilated with these paddings.
  """
  kt, kh, kw, c, o = kernel.shape
  x = jnp.pad(x, ((0, 0), padding[0], (0, 0), (0, 0), (0, 0)))
  b, t = x.shape[0], x.shape[1] - kt + 1
  # [B, T', H, W, kt*C]: frame t carries frames t .. t+kt-1 of the padded series.
  x = jnp.concatenate([x[:, i:i + t] for i in range(kt)], axis=-1)
  y = conv2d_matmul_grads(x.reshape(b * t, *x.shape[2:]),
                          jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * c, o),
                          padding[1:])
  return y.reshape(b, t, *y.shape[1:])  # [B, T', H', W', O]


def conv2d_matmul_grads(x: jax.Array, kernel: jax.Array,
                        padding: Sequence[tuple[int, int]]) -> jax.Array:
  """Stride-1 2D convolution (lax.conv_general_dilated) whose gradients are matmuls.

  Input pixel a reaches output a + pad - i through tap i, so the output gradient's
  kh*kw shifts side by side, g9 [N, H, W, kh*kw*O], give both gradients as one matmul
  each: input gradient = g9 @ kernel[kh*kw*O, C], kernel gradient = x^T @ g9. XLA:CPU
  runs matmuls at its GEMM rate on every core, but convolution gradients on one core for
  small images and the kernel gradient (a convolution over the batch) at a quarter of
  that rate for large ones (benchmarks/README.md).

  Args:
    x: [N, H, W, C].
    kernel: [kh, kw, C, O].
    padding: zero padding ((top, bottom), (left, right)), each below the kernel size.

  Returns:
    [N, H', W', O] with H' = H + top + bottom - kh + 1, likewise W'.
  """
  padding = tuple(tuple(int(p) for p in pad) for pad in padding)
  return _conv2d_matmul_grads(_vary_like(x, kernel), _vary_like(kernel, x), padding)


def _vary_like(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a`, marked as varying over b's manual mesh axes too (inside shard_map).

  A custom VJP must return each cotangent with its input's type, and the kernel
  gradient of a replicated kernel under a batch-sharded input varies over the batch
  axis: marked varying before the custom VJP, the kernel gets the sum over devices
  that JAX's own differentiation of that mark adds. Elsewhere a no-op.
  """
  varying = lambda v: jax.typeof(v).manual_axis_type.varying
  missing = tuple(sorted(varying(b) - varying(a)))
  return lax.pcast(a, missing, to="varying") if missing else a


def _conv2d(x, kernel, padding):
  return lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


_conv2d_matmul_grads = jax.custom_vjp(_conv2d, nondiff_argnums=(2,))


def _conv2d_fwd(x, kernel, padding):
  return _conv2d(x, kernel, padding), (x, kernel)


def _conv2d_bwd(padding, residuals, g):
  """Input and kernel gradients of `_conv2d`; g: [N, H', W', O]."""
  x, kernel = residuals
  kh, kw, c, o = kernel.shape
  (top, bottom), (left, right) = padding
  h, w = x.shape[1:3]
  # g9[a, (i, j)] = g[a + pad - (i, j)], zero outside: g padded by kernel - 1 - pad.
  g = jnp.pad(g, ((0, 0), (kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right),
                  (0, 0)))
  g9 = jnp.concatenate([g[:, kh - 1 - i:kh - 1 - i + h, kw - 1 - j:kw - 1 - j + w]
                        for i in range(kh) for j in range(kw)], -1)  # [N, H, W, kh*kw*O]
  taps = jnp.transpose(kernel, (0, 1, 3, 2)).reshape(kh * kw * o, c)  # [kh*kw*O, C]
  dx = jnp.einsum("nhwk,kc->nhwc", g9, taps)  # [N, H, W, C]
  # The kernel gradient contracts all N*H*W pixels into a small [C, kh*kw*O]: one
  # partial product per core, then their sum, keeps every core busy.
  p = _contraction_splits(x.shape[0])
  dtaps = jnp.einsum("pmc,pmk->pck", x.reshape(p, -1, c),
                     g9.reshape(p, -1, kh * kw * o)).sum(0)  # [C, kh*kw*O]
  return dx, jnp.transpose(dtaps.reshape(c, kh, kw, o), (1, 2, 0, 3))


def _contraction_splits(n: int) -> int:
  """The largest divisor of n that is at most this process's CPU core count."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(d for d in range(1, min(n, cores or 1) + 1) if n % d == 0)


_conv2d_matmul_grads.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, **kwargs) -> jax.Array:
  """lax.conv_general_dilated, in the CPU formulations above for plain 2D and 3D convs.

  The `conv_general_dilated` hook of nn.Conv: parameters, initialisation and dtype
  handling stay nn.Conv's. Only stride-1, undilated, ungrouped channels-last 2D and 3D
  convolutions with explicit padding below the kernel size change formulation: 3D ones
  to `conv3d_as_conv2d`, 2D ones to `conv2d_matmul_grads`.
  """
  if cpu_formulations() and _is_plain(lhs, rhs, window_strides, padding, **kwargs):
    if lhs.ndim == 5:
      return conv3d_as_conv2d(lhs, rhs, padding)
    return conv2d_matmul_grads(lhs, rhs, padding)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


def _is_plain(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
              *, dimension_numbers: Any = None, feature_group_count: int = 1,
              **dilations_and_precision) -> bool:
  """A stride-1, undilated, ungrouped channels-last 2D or 3D conv, padding < kernel."""
  if lhs.ndim not in (4, 5) or isinstance(padding, str):
    return False
  spec = "NDHWC"[:1] + "DHW"[5 - lhs.ndim:] + "C"
  channels_last = lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                             (spec, spec[1:-1] + "IO", spec))
  dilations = [dilations_and_precision.get(k) for k in ("lhs_dilation", "rhs_dilation")]
  return (set(window_strides) == {1} and feature_group_count == 1
          and all(d is None or set(d) == {1} for d in dilations)
          and dimension_numbers is not None
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == channels_last
          and all(0 <= p < k for pad, k in zip(padding, rhs.shape) for p in pad))


def _phase_taps(kernel_size: int, padding: int) -> tuple[int, np.ndarray]:
  """One axis of a stride-2 transposed convolution split by output parity.

  PyTorch's transposed convolution adds x[j] w[k] into output o = 2j - padding + k.
  Output o = 2i + r (parity r) therefore reads x[i + d] w[k] with
  k = r + padding - 2d, for the offsets d where 0 <= k < kernel_size.

  Returns:
    (first offset d0, taps [D, 2, kernel_size]): taps[d - d0, r, k] = 1 where
    output parity r reads tap k at input offset d.
  """
  pairs = [(r, k, (r + padding - k) // 2) for r in (0, 1) for k in range(kernel_size)
           if (r + padding - k) % 2 == 0]
  d0 = min(d for *_, d in pairs)
  taps = np.zeros((max(d for *_, d in pairs) - d0 + 1, 2, kernel_size), np.float32)
  for r, k, d in pairs:
    taps[d - d0, r, k] = 1.0
  return d0, taps


def conv_transpose_x2_polyphase(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  """PyTorch ConvTranspose(stride 2) whose output is exactly 2x the input, as 2^d phases.

  Every output parity (r_1..r_d) is an ordinary convolution of the undilated input
  with the taps of the kernel that land on it; all phases come out of one convolution
  (a matmul for kernel 2), then interleave (depth-to-space). This skips the
  multiplications by the zeros a dilated input would hold.

  Args:
    x: [N, *S, C] with d = len(S) spatial axes.
    kernel: the Flax transpose_kernel layout [*K, O, C] (PyTorch's weight [C, O, *K]).
    padding: PyTorch's padding; output_padding must make the output 2S.

  Returns:
    [N, *2S, O].
  """
  ndim, o, c = x.ndim - 2, kernel.shape[-2], kernel.shape[-1]
  d0, taps = _phase_taps(kernel.shape[0], padding)
  offsets, taps_k = "pqr"[:ndim], "klm"[:ndim]
  # [D, 2, K] per axis and [*K, O, C] -> [*D, C, *2, O]: the phase kernels side by side.
  phases = jnp.einsum(
      ",".join(f"{d}{d.upper()}{k}" for d, k in zip(offsets, taps_k))
      + f",{taps_k}oi->{offsets}i{offsets.upper()}o",
      *([jnp.asarray(taps, kernel.dtype)] * ndim), kernel)
  num_d = taps.shape[0]
  phases = phases.reshape(*phases.shape[:ndim], c, 2 ** ndim * o)
  pads = [(-d0, d0 + num_d - 1)] * ndim
  if ndim == 3 and cpu_formulations():
    y = conv3d_as_conv2d(x, phases, pads)
  else:
    spec = "NDHWC"[:1] + "DHW"[3 - ndim:] + "C"
    y = lax.conv_general_dilated(
        x, phases, (1,) * ndim, pads,
        dimension_numbers=(spec, spec[1:-1] + "IO", spec))
  spatial = x.shape[1:-1]
  y = y.reshape(x.shape[0], *spatial, *(2,) * ndim, o)  # [N, *S, *2, O]
  order = [0] + [i for a in range(ndim) for i in (1 + a, 1 + ndim + a)] + [2 * ndim + 1]
  return jnp.transpose(y, order).reshape(x.shape[0], *(2 * s for s in spatial), o)


class ConvTransposeX2(nn.Module):
  """PyTorch ConvTranspose{d}d(kernel, stride=2, padding, output_padding) on [N, *S, C].

  Parameters as nn.ConvTranspose(transpose_kernel=True): "kernel" [*K, O, C] (PyTorch's
  weight [C, O, *K] transposed) and "bias" [O]. PyTorch's output size is
  2 (n - 1) - 2 padding + kernel + output_padding; where that is 2n (the U-Nets' up
  convolutions) CPU runs `conv_transpose_x2_polyphase`; otherwise, and on other
  backends, lax.conv_transpose: the 2x-dilated input padded by
  (kernel - 1 - padding, kernel - 1 - padding + output_padding) per side, convolved
  with the flipped kernel.

  Attributes:
    features: output channels O.
    kernel_size: K, the same on every axis.
    ndim: number of spatial axes d.
    padding: PyTorch's padding.
    output_padding: PyTorch's output_padding.
    kernel_init: initialiser of the kernel; the bias starts at zero.
    dtype: computation dtype; parameters stay float32.
  """
  features: int
  kernel_size: int
  ndim: int
  padding: int
  output_padding: int
  kernel_init: Any = TORCH_DEFAULT_INIT
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [N, *S, C] to [N, *S', features]."""
    ndim, k = self.ndim, self.kernel_size
    if x.ndim != ndim + 2:
      raise ValueError(f"ConvTranspose{ndim}d expects [N, {ndim} spatial axes, C]; got "
                       f"shape {x.shape}.")
    kernel = self.param("kernel", self.kernel_init,
                        (k,) * ndim + (self.features, x.shape[-1]), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if cpu_formulations() and k - 2 * self.padding + self.output_padding == 2:
      y = conv_transpose_x2_polyphase(x, kernel, self.padding)
    else:
      low = k - 1 - self.padding
      y = lax.conv_transpose(x, kernel, (2,) * ndim,
                             ((low, low + self.output_padding),) * ndim,
                             transpose_kernel=True)
    return y + bias


def conv_transpose_x2(features: int, kernel_size: int, ndim: int, *, padding: int,
                      output_padding: int, dtype: Any, kernel_init: Any = TORCH_DEFAULT_INIT,
                      name: str | None = None) -> ConvTransposeX2:
  """PyTorch ConvTranspose{ndim}d(kernel, stride=2, padding, output_padding)."""
  return ConvTransposeX2(features, kernel_size, ndim, padding, output_padding,
                         kernel_init=kernel_init, dtype=dtype, name=name)


def conv(features: int, kernel_size: Sequence[int], *, kernel_init: Any, dtype: Any,
         name: str | None = None) -> nn.Conv:
  """PyTorch Conv{d}d(kernel, padding=kernel // 2): nn.Conv with the CPU formulation hook."""
  return nn.Conv(features, tuple(kernel_size), padding=[(k // 2, k // 2) for k in kernel_size],
                 kernel_init=kernel_init, dtype=dtype, name=name,
                 conv_general_dilated=conv_general_dilated)


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
      x = conv(features, kernel, kernel_init=self.kernel_init, dtype=self.dtype,
               name=f"conv{i}")(x)
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
