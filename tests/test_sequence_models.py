"""Tests for the sequence encoders BiConvGRU and TSViT: dates, counts, masking, layout.

Parity with the PyTorch originals is in test_convert_seq.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from cscl_jax import features
from cscl_jax import models
from cscl_jax.models import dates
from cscl_jax.models import tsvit

SMALL = {  # Small configurations for real passes: inputs [2, T, 8, 8, 4].
    "biconvgru": dict(num_channels=4, num_classes=3, conv3d_dim=4, rnn_hidden_dim=6,
                      attn_channels=8, img_res=8),
    "tsvit": dict(num_channels=4, num_classes=3, img_res=8, patch_size=2, dim=16,
                  temporal_depth=1, spatial_depth=1, heads=2, dim_head=8, scale_dim=2,
                  attn_channels=8),
}


def key(seed):
  return jax.random.key(seed, impl="rbg")


def model_config(name, stage, **fields):
  config = common.get_config().model
  config.update(name=name, stage=stage, **fields)
  return config


def sits(rng, lengths, t=5, res=8, channels=4):
  """Inputs [B, t, res, res, channels]: series of `lengths` dates, the rest padding.

  Real dates have increasing days of year as the pipeline writes them (float32
  doy / 365.0001); padded dates have day 0 and random bands (which must not matter).
  """
  x = rng.normal(size=(len(lengths), t, res, res, channels)).astype(np.float32)
  x[..., -1] = 0
  for i, length in enumerate(lengths):
    days = np.sort(rng.choice(np.arange(1, 367), length, replace=False)).astype(np.float32)
    x[i, :length, ..., -1] = (days / np.float32(dates.DOY_SCALE))[:, None, None]
  return x


def test_days_and_padding_are_recovered_from_the_doy_channel():
  assert dates.DOY_SCALE == features.DOY_SCALE
  days = np.arange(0, 367, dtype=np.float32)  # 0 = padding
  channel = days / np.float32(features.DOY_SCALE)  # float32, as the TF pipeline computes it
  x = np.broadcast_to(channel[None, :, None, None, None], (1, 367, 2, 2, 1))
  np.testing.assert_array_equal(dates.day_of_year(x)[0], np.minimum(days, 365))
  np.testing.assert_array_equal(dates.valid_dates(x)[0], days > 0)


@pytest.mark.parametrize("name, stage, fields, shape, params, out", [
    ("biconvgru", "supervised", dict(num_channels=14, num_classes=20), (1, 16, 48, 48, 14),
     4_525_524, (1, 48, 48, 20)),
    ("biconvgru", "finetune", dict(num_channels=15, num_classes=18), (1, 16, 24, 24, 15),
     4_516_882, (1, 24, 24, 18)),
    ("biconvgru", "pretrain", dict(num_channels=14), (1, 16, 48, 48, 14),
     4_433_344 + 512 * 128 * 2 + 128 * 3, (1, 48, 48, 3, 3)),
    ("tsvit", "supervised", dict(num_channels=11, num_classes=19, img_res=24),
     (1, 60, 24, 24, 11), 1_657_476, (1, 24, 24, 19)),
    ("tsvit", "pretrain", dict(num_channels=11, num_classes=19, img_res=24),
     (1, 60, 24, 24, 11), 1_657_476 + 19 * 128 * 2 + 128 * 3, (1, 24, 24, 3, 3)),
])
def test_reference_parameter_counts_and_shapes(name, stage, fields, shape, params, out):
  # SPEC.md §2: France / MTLCC BiConvGRU, PASTIS24 TSViT; pre-training replaces the
  # BiConvGRU classifier (or adds to TSViT's own) the CSCL head: Wq, Wk [E, 128], rel_h/w.
  model = models.create_model(model_config(name, stage, **fields))
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(key(0), x, train=False), x)
  assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == params
  assert set(variables) == {"params"}  # no batch statistics
  assert jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                        x).shape == out


@pytest.fixture(scope="module", params=list(SMALL))
def small(request):
  """A small fine-tuning model of each encoder, its variables and a jitted forward."""
  name = request.param
  config = model_config(name, "finetune", **SMALL[name])
  model = models.create_model(config)
  x = sits(np.random.default_rng(0), [5, 3])
  variables = jax.jit(lambda x: model.init(key(0), x, train=False))(x)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=True))
  return dict(name=name, config=config, model=model, variables=variables, x=x,
              forward=forward)


def test_padded_dates_change_nothing(small):
  # The output on 3 real dates + 2 padded dates (random bands, day 0) is the output on
  # the 3 real dates alone, and on the same 3 dates padded with zeros.
  x = small["x"]
  padded = small["forward"](small["variables"], x)[1]
  alone = small["forward"](small["variables"], x[1:, :3])[0]
  zeros = x[1:].copy()
  zeros[:, 3:] = 0
  np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(small["forward"](small["variables"], zeros)[0], alone,
                             rtol=1e-5, atol=1e-5)
  # ... while a real date does change it.
  changed = x[1:].copy()
  changed[:, 2, ..., :-1] += 1
  assert not np.allclose(small["forward"](small["variables"], changed)[0], alone,
                         atol=1e-3)


def test_gradients_reach_every_parameter(small):
  def loss(params):
    out = small["model"].apply({"params": params}, small["x"], train=True)
    return jnp.sum(out * jax.random.normal(key(2), out.shape))
  grads = jax.jit(jax.grad(loss))(small["variables"]["params"])
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)


def test_bfloat16_computation(small):
  model = models.create_model(small["config"], dtype="bfloat16")
  out = jax.jit(lambda v: model.apply(v, small["x"], train=True))(small["variables"])
  ref = small["forward"](small["variables"], small["x"])
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.1 * float(jnp.std(ref)) + 0.02)


def test_tsvit_puts_patches_back_at_their_2d_positions():
  # With a zero head kernel the score of a pixel is the head bias of its position in its
  # patch: pixel (i, j) must read bias[(i % p) * p + j % p] for every class.
  model = tsvit.TSViT(num_classes=2, num_channels=4, img_res=6, patch_size=3, dim=8,
                      temporal_depth=1, spatial_depth=1, heads=1, dim_head=4, scale_dim=1)
  x = sits(np.random.default_rng(1), [2], t=2, res=6)
  params = jax.jit(lambda x: model.init(key(0), x, train=False))(x)["params"]
  params["head"] = {"kernel": np.zeros((8, 9), np.float32),
                    "bias": np.arange(9, dtype=np.float32)}
  out = jax.jit(lambda p: model.apply({"params": p}, x, train=False))(params)  # [1, 6, 6, 2]
  i, j = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
  for k in range(2):
    np.testing.assert_array_equal(out[0, ..., k], (i % 3) * 3 + j % 3)


@pytest.mark.parametrize("name, shape, fields, message", [
    ("tsvit", (1, 4, 8, 8, 5), {}, r"expects inputs \[B, T, 8, 8, 4\]"),
    ("tsvit", (1, 4, 9, 9, 4), dict(img_res=9), "divisible by model.patch_size=2"),
    ("biconvgru", (1, 4, 8, 8), {}, r"expects inputs \[B, T, H, W, 4\]"),
])
def test_bad_shapes_raise(name, shape, fields, message):
  model = models.create_model(model_config(name, "finetune", **{**SMALL[name], **fields}))
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda x: model.init(key(0), x, train=False),
                   jax.ShapeDtypeStruct(shape, jnp.float32))
