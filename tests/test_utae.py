"""U-TAE (cscl_jax.models.utae, ltae): exact count, shapes, date encoding and masking, modes.

Parity with the original network is in tests/test_convert_utae.py (needs torch).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from cscl_jax import features
from cscl_jax import models
from cscl_jax.models import ltae
from cscl_jax.models import utae

PASTIS = dict(name="utae", num_channels=11, num_classes=20, img_res=128, max_seq_len=16)
SMALL = dict(name="utae", num_channels=4, num_classes=3, num_features=4, attn_channels=8,
             img_res=16, max_seq_len=5)


def key(seed):
  return jax.random.key(seed, impl="rbg")


def model_config(stage, fields):
  config = common.get_config().model
  config.update(fields, stage=stage)
  return config


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def inputs(shape, *, padded=((0, 3),), seed=0):
  """[B, T, H, W, C] bands + doy / DOY_SCALE; (sample, first date) pairs padded to the end."""
  rng = np.random.default_rng(seed)
  b, t, h, w, c = shape
  bands = rng.normal(size=(b, t, h, w, c - 1)).astype(np.float32)
  doy = np.sort(rng.choice(np.arange(1, 366), size=(b, t)), axis=1)
  for sample, first in padded:
    bands[sample, first:], doy[sample, first:] = 0, 0
  doy_channel = np.broadcast_to((doy / features.DOY_SCALE).astype(np.float32)[
      :, :, None, None, None], (b, t, h, w, 1))
  return np.concatenate([bands, doy_channel], -1), doy


@pytest.mark.parametrize("stage, encoder, total, out_shape", [
    ("supervised", 1_072_128, 1_087_260, (2, 128, 128, 20)),
    ("finetune", 1_072_128, 1_087_260, (2, 128, 128, 20)),
    ("pretrain", 1_072_128, 1_072_128 + 8_576, (2, 128, 128, 3, 3)),
])
def test_pastis_defaults_have_the_original_parameter_count(stage, encoder, total, out_shape):
  # SPEC.md §2: 10 bands (+ day of year), widths [64, 64, 64, 128] / [32, 32, 64, 128],
  # L-TAE 16 heads, d_model 256, d_k 4, out_conv [32, 20]: 1,087,260.
  model = models.create_model(model_config(stage, PASTIS))
  x = jax.ShapeDtypeStruct((2, 16, 128, 128, 11), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(key(0), x, train=False), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert count(variables["params"]["encoder"]) == encoder
  assert count(variables["params"]) == total
  assert out.shape == out_shape and out.dtype == jnp.float32
  # CSCL head on the 32-channel decoder output: 2 x 32 x 128 + 2 x 64 x 3.
  head_stats = "head" in variables["batch_stats"]
  assert head_stats == (stage != "pretrain")  # out_conv's BatchNorms


def test_positional_encoding_against_numpy_loops():
  days = np.array([[0, 17, 250], [365, 1, 99]])
  got = np.asarray(ltae.positional_encoding(jnp.asarray(days), 6, 1000.0, repeat=2))
  want = np.zeros((2, 3, 12))
  for b, t, r, j in np.ndindex(2, 3, 2, 6):
    angle = days[b, t] / 1000.0 ** (2 * (j // 2) / 6)
    want[b, t, 6 * r + j] = np.sin(angle) if j % 2 == 0 else np.cos(angle)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ltae_attention_ignores_padded_dates():
  layer = ltae.LTAE(out_channels=16, n_head=4, d_k=2, d_model=8)
  x = jax.random.normal(key(0), (3, 5, 2, 2, 16))
  pad = np.array([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  positions = jnp.tile(jnp.arange(5) * 30.0, (3, 1))
  variables = layer.init(key(1), x, positions, pad, train=False)
  out, attention = layer.apply(variables, x, positions, pad, train=False)
  assert out.shape == (3, 2, 2, 16) and attention.shape == (3, 5, 2, 2, 4)
  assert np.all(np.asarray(attention)[0, 3:] == 0)  # exp(-1000) underflows: exactly 0
  np.testing.assert_allclose(attention[:2].sum(1), 1, rtol=1e-6)
  np.testing.assert_allclose(attention[2], 0.2, rtol=1e-6)  # all padded: uniform, finite
  assert np.all(np.isfinite(out))


def test_skip_aggregation_against_numpy():
  # Two heads at 2x2 resized to 4x4; head i weights channels [2i, 2i + 2); padded date 2.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 3, 4, 4, 4)).astype(np.float32)
  attention = rng.random(size=(1, 3, 2, 2, 2)).astype(np.float32)
  pad = np.array([[False, False, True]])
  got = np.asarray(utae.aggregate_skip(jnp.asarray(x), jnp.asarray(attention), pad))

  def upsample(a):  # bilinear, half-pixel centres, edges clamped (PyTorch align_corners=False)
    src = np.clip((np.arange(4) + 0.5) / 2 - 0.5, 0, 1)
    lo, frac = np.floor(src).astype(int), src - np.floor(src)
    hi = np.minimum(lo + 1, 1)
    rows = a[lo] * (1 - frac)[:, None] + a[hi] * frac[:, None]
    return rows[:, lo] * (1 - frac) + rows[:, hi] * frac

  want = np.zeros((4, 4, 4))
  for t, head in np.ndindex(2, 2):  # date 2 is padding
    want[..., 2 * head:2 * head + 2] += (upsample(attention[0, t, :, :, head])[..., None]
                                         * x[0, t, ..., 2 * head:2 * head + 2])
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, fields, message", [
    ((1, 5, 12, 16, 4), {}, "H and W divisible by 8"),
    ((1, 5, 16, 16, 6), {}, "4 input channels"),
    ((5, 16, 16, 4), {}, r"\[B, T, H, W, C\]"),
    ((1, 5, 16, 16, 4), {"num_features": 2}, "multiple of 4"),
])
def test_unsupported_inputs_raise(shape, fields, message):
  model = models.create_model(model_config("supervised", dict(SMALL, **fields)))
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda: model.init(key(0), jnp.zeros(shape), train=False))


@pytest.fixture(scope="module")
def probe():
  """A small U-TAE + out_conv: variables, batch, train outputs, updates and gradients."""
  config = model_config("finetune", SMALL)
  model = models.create_model(config)
  x, _ = inputs((4, 5, 16, 16, 4), padded=((0, 3), (2, 4)))
  variables = jax.jit(lambda x: model.init(key(0), x, train=False))(x)
  readout = jax.random.normal(key(2), (4, 16, 16, 3))

  @jax.jit
  def run(variables, rng):
    def loss(params):
      out, updates = model.apply(dict(variables, params=params), x, train=True,
                                 mutable=["batch_stats"], rngs={"dropout": rng})
      return jnp.sum(out * readout), (out, updates)
    grads, (out, updates) = jax.grad(loss, has_aux=True)(variables["params"])
    return out, updates, grads

  out, updates, grads = run(variables, key(3))
  return dict(config=config, model=model, x=x, variables=variables, run=run, out=out,
              updates=updates, grads=grads)


def test_gradients_reach_every_parameter_and_statistics_update(probe):
  for path, g in jax.tree_util.tree_leaves_with_path(probe["grads"]):
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), name
    if not name.endswith("['bias']"):  # a conv bias feeding a norm gets no gradient
      assert np.any(g != 0), name
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)),
                         probe["variables"]["batch_stats"], probe["updates"]["batch_stats"])
  assert all(jax.tree.leaves(changed))


def test_dropout_is_on_in_training_only(probe):
  other, _, _ = probe["run"](probe["variables"], key(4))
  assert not np.allclose(probe["out"], other, atol=1e-4)
  out = models.predict(probe["config"], probe["variables"], probe["x"])
  again = models.predict(probe["config"], probe["variables"], probe["x"])
  np.testing.assert_array_equal(out, again)
  assert np.all(out >= 0)  # the original's classifier ends in BatchNorm + ReLU


def test_padded_dates_do_not_reach_the_encoder(probe):
  # Whatever a padded date holds in its doy channel, the output is the same; a real
  # date with a changed doy changes it (the dates are encoded).
  x = np.array(probe["x"])
  changed_pad, changed_real = x.copy(), x.copy()
  changed_pad[0, 3:, ..., -1] = 0.5
  changed_real[0, 1, ..., -1] += 40 / features.DOY_SCALE
  run = lambda x: models.predict(probe["config"], probe["variables"], x)[0]
  base = run(x)
  np.testing.assert_array_equal(run(changed_pad), base)
  assert not np.allclose(run(changed_real), base, atol=1e-5)


def test_bfloat16_computation_keeps_float32_state(probe):
  model = models.create_model(probe["config"], dtype="bfloat16")
  out, updates = jax.eval_shape(lambda v: model.apply(
      v, probe["x"], train=True, mutable=["batch_stats"], rngs={"dropout": key(3)}),
                                probe["variables"])
  assert out.dtype == jnp.float32 and out.shape == probe["out"].shape
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))
