"""Tests for the CPU formulations in cscl_jax.models.layers.

On CPU, 3D convolutions run as 2D convolutions over stacked frames, 2D convolutions
take their gradients as matmuls and stride-2 transposed convolutions run as their
polyphase decomposition (`layers.cpu_formulations`).
All are checked against slow numpy loops and against XLA's native ops, values and
gradients, and whole encoders against themselves with the plain ops.
"""

import jax
from jax import lax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from cscl_jax import models
from cscl_jax.models import layers


def key(seed):
  return jax.random.key(seed, impl="rbg")


@pytest.fixture(params=[True, False], ids=["cpu_formulations", "plain_ops"])
def formulation(request, monkeypatch):
  """Runs a test with the CPU formulations on and off."""
  monkeypatch.setattr(layers, "cpu_formulations", lambda: request.param)
  return request.param


def np_conv3d(x, kernel, padding):
  """Stride-1 3D correlation by loops over the taps: x [N, T, H, W, C], kernel [a, b, c, C, O]."""
  xp = np.pad(x, ((0, 0), *padding, (0, 0)))
  out_shape = [xp.shape[1 + i] - kernel.shape[i] + 1 for i in range(3)]
  out = np.zeros((x.shape[0], *out_shape, kernel.shape[-1]))
  for a, b, c in np.ndindex(*kernel.shape[:3]):
    out += xp[:, a:a + out_shape[0], b:b + out_shape[1], c:c + out_shape[2]] @ kernel[a, b, c]
  return out


def np_conv_transpose(x, weight, *, stride, padding, output_padding):
  """PyTorch ConvTranspose semantics by scattering: x [N, *S, Cin], weight [Cin, Cout, *K]."""
  spatial, kernel = x.shape[1:-1], weight.shape[2:]
  full = np.zeros((x.shape[0], *[(s - 1) * stride + k + output_padding
                                 for s, k in zip(spatial, kernel)], weight.shape[1]))
  for i in np.ndindex(*spatial):
    for a in np.ndindex(*kernel):
      at = tuple(stride * ii + aa for ii, aa in zip(i, a))
      full[(slice(None), *at)] += x[(slice(None), *i)] @ weight[(slice(None), slice(None), *a)]
  sizes = [(s - 1) * stride - 2 * padding + k + output_padding
           for s, k in zip(spatial, kernel)]
  return full[(slice(None), *[slice(padding, padding + n) for n in sizes])]


@pytest.mark.parametrize("kernel_shape, padding", [
    ((3, 3, 3), ((1, 1), (1, 1), (1, 1))),  # the U-Nets' convolutions
    ((1, 3, 3), ((0, 0), (1, 1), (1, 1))),
    ((2, 2, 3), ((0, 1), (0, 1), (2, 0))),
])
def test_conv3d_as_conv2d_matches_loops_and_native_gradients(kernel_shape, padding):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 4, 5, 6, 3)).astype(np.float32)
  kernel = rng.normal(size=(*kernel_shape, 3, 4)).astype(np.float32)
  got = layers.conv3d_as_conv2d(x, kernel, padding)
  np.testing.assert_allclose(got, np_conv3d(x, kernel, padding), rtol=1e-5, atol=1e-5)

  native = lambda x, k: lax.conv_general_dilated(
      x, k, (1, 1, 1), padding, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  cotangent = rng.normal(size=got.shape).astype(np.float32)
  loss = lambda f: lambda x, k: jnp.sum(f(x, k) * cotangent)
  want = jax.grad(loss(native), argnums=(0, 1))(x, kernel)
  grads = jax.grad(loss(lambda x, k: layers.conv3d_as_conv2d(x, k, padding)),
                   argnums=(0, 1))(x, kernel)
  for g, w in zip(grads, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def np_conv2d_grads(x, kernel, padding, g):
  """Gradients of sum(conv2d(x, kernel) * g) by loops over the taps: (dx, dkernel)."""
  xp = np.pad(x, ((0, 0), *padding, (0, 0)))
  dxp, dk = np.zeros_like(xp), np.zeros_like(kernel)
  h, w = g.shape[1:3]
  for a, b in np.ndindex(*kernel.shape[:2]):
    dxp[:, a:a + h, b:b + w] += g @ kernel[a, b].T
    dk[a, b] = np.einsum("nhwc,nhwo->co", xp[:, a:a + h, b:b + w], g)
  (top, _), (left, _) = padding
  return dxp[:, top:top + x.shape[1], left:left + x.shape[2]], dk


@pytest.mark.parametrize("kernel_shape, padding", [
    ((3, 3), ((1, 1), (1, 1))),  # 'same', the encoders' convolutions
    ((2, 2), ((0, 1), (0, 1))),  # the polyphase transposed convolutions' phases
    ((3, 2), ((2, 0), (0, 0))),
    ((1, 1), ((0, 0), (0, 0))),
])
def test_conv2d_matmul_grads_matches_loops(kernel_shape, padding):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  kernel = rng.normal(size=(*kernel_shape, 3, 4)).astype(np.float32)
  y = layers.conv2d_matmul_grads(x, kernel, padding)
  np.testing.assert_allclose(y, np_conv3d(x[:, None], kernel[None], ((0, 0), *padding))[:, 0],
                             rtol=1e-5, atol=1e-5)
  g = rng.normal(size=y.shape).astype(np.float32)
  grads = jax.grad(lambda x, k: jnp.sum(layers.conv2d_matmul_grads(x, k, padding) * g),
                   argnums=(0, 1))(x, kernel)
  for got, want in zip(grads, np_conv2d_grads(x, kernel, padding, g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  jtu.check_grads(lambda x, k: layers.conv2d_matmul_grads(x, k, padding), (x, kernel),
                  order=1, modes=["rev"], atol=5e-2, rtol=5e-2)  # finite differences


@pytest.mark.parametrize("padding, routed", [
    ([(1, 1), (1, 1)], True), ("SAME", False), ([(3, 3), (1, 1)], False)])
def test_conv_hook_routes_only_plain_convs(monkeypatch, padding, routed):
  calls = []
  monkeypatch.setattr(layers, "cpu_formulations", lambda: True)
  monkeypatch.setattr(layers, "conv2d_matmul_grads",
                      lambda *a: calls.append(a) or layers._conv2d(*a))
  x, kernel = np.ones((1, 4, 4, 2), np.float32), np.ones((3, 3, 2, 2), np.float32)
  got = layers.conv_general_dilated(x, kernel, (1, 1), padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  want = lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(got, want)
  assert bool(calls) == routed


@pytest.mark.parametrize("ndim, kernel, padding, output_padding, size",
                         [(3, 3, 1, 1, (2, 3, 4)), (2, 2, 0, 0, (3, 5)), (1, 3, 1, 1, (5,)),
                          (2, 3, 1, 0, (3, 4))])  # the last: output 2n - 1, plain op only
def test_conv_transpose_is_pytorch_conv_transpose(formulation, ndim, kernel, padding,
                                                  output_padding, size):
  layer = layers.conv_transpose_x2(3, kernel, ndim, padding=padding,
                                   output_padding=output_padding, dtype=jnp.float32)
  x = np.random.default_rng(0).normal(size=(2, *size, 4)).astype(np.float32)
  params = layer.init(key(0), x)
  out = np.asarray(layer.apply(params, x))
  # Flax kernel [k..., out, in] -> PyTorch weight [in, out, k...].
  k = np.asarray(params["params"]["kernel"])
  weight = k.transpose(ndim + 1, ndim, *range(ndim))
  ref = np_conv_transpose(x, weight, stride=2, padding=padding,
                          output_padding=output_padding)
  ref += np.asarray(params["params"]["bias"])
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ndim, kernel, padding", [(3, 3, 1), (2, 2, 0), (2, 3, 1)])
def test_polyphase_gradients_equal_native_conv_transpose(ndim, kernel, padding):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, *(3, 4, 5)[:ndim], 4)).astype(np.float32)
  k = rng.normal(size=(*(kernel,) * ndim, 3, 4)).astype(np.float32)
  low = kernel - 1 - padding
  output_padding = 2 - kernel + 2 * padding
  native = lambda x, k: lax.conv_transpose(
      x, k, (2,) * ndim, ((low, low + output_padding),) * ndim, transpose_kernel=True)
  ours = lambda x, k: layers.conv_transpose_x2_polyphase(x, k, padding)
  cotangent = rng.normal(size=native(x, k).shape).astype(np.float32)
  np.testing.assert_allclose(ours(x, k), native(x, k), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, k: jnp.sum(f(x, k) * cotangent)
  for g, w in zip(jax.grad(loss(ours), argnums=(0, 1))(x, k),
                  jax.grad(loss(native), argnums=(0, 1))(x, k)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["unet3df", "unet3d", "unet2d_convlstm"])
def test_encoders_are_the_same_function_with_either_formulation(monkeypatch, name):
  # In float64: in float32 a pre-activation within round-off of LeakyReLU's kink
  # (slope 1 on one side, 0.01 on the other) can land on either side depending on the
  # summation order, and its gradient then differs by far more than round-off (seen on
  # an AVX2 CPU). In float64 the formulations agree to ~1e-12; a wrong tap or padding
  # would differ at O(1).
  config = common.get_config().model
  config.update(name=name, stage="supervised" if name == "unet3d" else "finetune",
                num_channels=3, max_seq_len=4, img_res=8, num_features=4,
                emb_channels=8, num_classes=3)
  with jax.enable_x64(True):
    x = np.random.default_rng(2).normal(size=(2, 4, 8, 8, 3))
    model = models.create_model(config, dtype=jnp.float64)
    variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64),
                             model.init(key(0), x, train=False))

    def loss_and_grads(cpu):
      monkeypatch.setattr(layers, "cpu_formulations", lambda: cpu)
      def loss(params):
        # The encoder alone: the Segmenter returns float32 whatever the encoder's dtype.
        out, _ = model.apply(dict(variables, params=params), x, train=True,
                             mutable=["batch_stats"],
                             method=lambda m, x, train: m.encoder(x, train=train))
        return jnp.sum(out ** 2), out
      return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    (_, out_cpu), grads_cpu = loss_and_grads(True)
    (_, out_plain), grads_plain = loss_and_grads(False)
  assert out_cpu.dtype == np.float64
  np.testing.assert_allclose(out_cpu, out_plain, rtol=1e-9, atol=1e-9)
  # Biases that feed a BatchNorm have zero gradient up to round-off: absolute
  # tolerance on the scale of the largest gradient.
  scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(grads_plain))
  for g, w in zip(jax.tree.leaves(grads_cpu), jax.tree.leaves(grads_plain)):
    assert g.dtype == np.float64
    np.testing.assert_allclose(g, w, rtol=1e-8, atol=1e-11 * scale)
