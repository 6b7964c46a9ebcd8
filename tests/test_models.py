"""Tests for cscl_jax.models: reference parameter counts, shapes, layers vs numpy, modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from cscl_jax import models
from cscl_jax.models import layers
from cscl_jax.models import unet2d_convlstm

# Reference configurations (SPEC.md §2): name -> model fields.
REFERENCE = {
    "unet3df": dict(num_channels=14, max_seq_len=16, img_res=48, num_classes=20),
    "unet3d": dict(num_channels=14, max_seq_len=16, img_res=48, num_classes=20),
    "unet2d_convlstm": dict(num_channels=15, max_seq_len=16, img_res=24, num_classes=18),
}
# Small configurations for real forward/backward passes.
SMALL = {
    "unet3df": dict(num_channels=5, max_seq_len=4, num_features=4, emb_channels=16,
                    attn_channels=8, num_classes=3),
    "unet3d": dict(num_channels=5, max_seq_len=4, num_features=4, num_classes=3),
    "unet2d_convlstm": dict(num_channels=5, max_seq_len=3, num_features=4,
                            emb_channels=16, attn_channels=8, num_classes=3),
}
SMALL_STAGE = {"unet3df": "pretrain", "unet3d": "supervised",
               "unet2d_convlstm": "finetune"}


def key(seed):
  """A PRNG key whose init programs compile fast (threefry ones take ~10x longer on CPU)."""
  return jax.random.key(seed, impl="rbg")


def model_config(name, stage, **fields):
  config = common.get_config().model
  config.name = name
  config.stage = stage
  config.update(fields)
  return config


def init_shapes(model, shape):
  """Abstract variables and output of `model` for input `shape`: nothing is computed."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(key(0), x, train=False), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return variables, out


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# --- Layers against slow numpy references -------------------------------------------


def np_conv3x3(x, kernel, bias):
  """'same' 3x3 conv: x [N, H, W, C], kernel [3, 3, C, O]."""
  h, w = x.shape[1:3]
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(padded[:, a:a + h, b:b + w] @ kernel[a, b]
             for a in range(3) for b in range(3)) + bias


def np_norm(x, scale, mean=None, var=None):
  """BatchNorm without offset; batch statistics over N, H, W unless given."""
  if mean is None:
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  return (x - mean) / np.sqrt(var + 1e-5) * scale, mean, var


def np_convlstm(x, params, stats=None):
  """Reference recurrence; stats: per-step running statistics, None for training."""
  sigmoid = lambda v: 1 / (1 + np.exp(-v))
  b, t, h, w, _ = x.shape
  hidden = params["h_conv"]["bias"].shape[0] // 4
  hs, cs = np.zeros((b, h, w, hidden)), np.zeros((b, h, w, hidden))
  outputs, batch_stats = [], {"h_norm": [], "x_norm": [], "c_norm": []}

  def norm(name, v, step):
    given = (None, None) if stats is None else (stats[name]["mean"][step],
                                                stats[name]["var"][step])
    out, mean, var = np_norm(v, params[name]["scale"], *given)
    batch_stats[name].append((mean, var))
    return out

  for step in range(t):
    gates = (norm("h_norm", np_conv3x3(hs, **params["h_conv"]), step)
             + norm("x_norm", np_conv3x3(x[:, step], **params["x_conv"]), step))
    i, f, o, g = np.split(gates, 4, axis=-1)
    cs = sigmoid(f) * cs + sigmoid(i) * np.tanh(g)
    hs = sigmoid(o) * norm("c_norm", np.tanh(cs), step)
    outputs.append(hs)
  return np.stack(outputs, 1), batch_stats


def test_convlstm_matches_numpy_recurrence_with_per_step_statistics():
  lstm = unet2d_convlstm.ConvLSTM(hidden=2)
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 5, 3)).astype(np.float32)
  variables = lstm.init(key(0), x, train=False)
  params = jax.tree.map(np.asarray, variables["params"]["cell"])
  np.testing.assert_array_equal(params["c_norm"]["scale"], np.float32(0.1))  # as RecurrentNorm2d
  # Perturb the scales so that the test sees which norm is which.
  for name in ("h_norm", "x_norm", "c_norm"):
    params[name]["scale"] = params[name]["scale"] * (1 + np.arange(params[name]["scale"].size))
  variables = {"params": {"cell": params}, "batch_stats": variables["batch_stats"]}

  out, updates = lstm.apply(variables, x, train=True, mutable=["batch_stats"])
  ref, batch_stats = np_convlstm(x.astype(np.float64), params)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  stats = jax.tree.map(np.asarray, updates["batch_stats"]["cell"])
  for name, per_step in batch_stats.items():
    assert stats[name]["mean"].shape == (3, per_step[0][0].size)  # [T, channels]
    for step, (mean, var) in enumerate(per_step):  # momentum 0.1 from (0, 1)
      np.testing.assert_allclose(stats[name]["mean"][step], 0.1 * mean, atol=1e-5)
      np.testing.assert_allclose(stats[name]["var"][step], 0.9 + 0.1 * var, atol=1e-5)

  eval_out = lstm.apply({"params": {"cell": params}, "batch_stats": updates["batch_stats"]},
                        x, train=False)
  ref, _ = np_convlstm(x.astype(np.float64), params, stats)
  np.testing.assert_allclose(eval_out, ref, rtol=1e-4, atol=1e-5)


# --- Reference configurations: parameter counts and shapes (abstract only) ------------


def _classifier_count(name: str) -> int:
  """Parameters of `name`'s classifier head, counted on the supervised network."""
  config = model_config(name, "supervised", **REFERENCE[name])
  shape = (1, config.max_seq_len, config.img_res, config.img_res, config.num_channels)
  return count(init_shapes(models.create_model(config), shape)[0]["params"]["head"])


# SPEC.md §2's published numbers: encoder, the stage's head, and the reference's total.
# The reference's UNet2D-ConvLSTM also builds its 3x3 classifier in pre-training, unused,
# so its published pre-training total holds the counted classifier too.
@pytest.mark.parametrize("name, stage, encoder, head, published, out_shape", [
    ("unet3df", "pretrain", 7_217_361, 33_152, None, (2, 48, 48, 3, 3)),
    ("unet3df", "finetune", 7_217_361, 2_580, 7_219_941, (2, 48, 48, 20)),
    ("unet3d", "supervised", 6_183_429, 0, 6_183_429, (2, 48, 48, 20)),
    ("unet2d_convlstm", "supervised", 3_072_544, 20_754, 3_093_298, (2, 24, 24, 18)),
    ("unet2d_convlstm", "pretrain", 3_072_544, 33_152, 3_126_450, (2, 24, 24, 3, 3)),
])
def test_reference_parameter_counts_and_shapes(name, stage, encoder, head, published,
                                               out_shape):
  config = model_config(name, stage, **REFERENCE[name])
  shape = (2, config.max_seq_len, config.img_res, config.img_res, config.num_channels)
  variables, out = init_shapes(models.create_model(config), shape)
  params = variables["params"]
  assert count(params["encoder"]) == encoder
  assert count(params.get("head", {})) == head
  assert count(params) == encoder + head
  if published is not None:
    unused = _classifier_count(name) if (name, stage) == ("unet2d_convlstm",
                                                          "pretrain") else 0
    assert count(params) + unused == published
  assert out.shape == out_shape and out.dtype == jnp.float32
  assert count(variables["batch_stats"]) > 0 and "head" not in variables["batch_stats"]


@pytest.mark.parametrize("name, t, res", [
    ("unet3df", 8, (12, 20)), ("unet3df", 4, (4, 4)), ("unet3d", 12, (16, 8)),
    ("unet2d_convlstm", 5, (12, 28)), ("unet2d_convlstm", 1, (4, 8))])
def test_odd_supported_shapes(name, t, res):
  fields = dict(SMALL[name], max_seq_len=t)
  config = model_config(name, "finetune" if name != "unet3d" else "supervised", **fields)
  _, out = init_shapes(models.create_model(config), (2, t, *res, config.num_channels))
  assert out.shape == (2, *res, config.num_classes)


@pytest.mark.parametrize("name, shape, fields, message", [
    ("unet3df", (1, 4, 10, 8, 5), {}, "H divisible by 4"),
    ("unet3df", (1, 4, 8, 6, 5), {}, "W divisible by 4"),
    ("unet3d", (1, 6, 8, 8, 5), {"max_seq_len": 6}, "T divisible by 4"),
    ("unet3df", (1, 8, 8, 8, 5), {}, "T=4 time steps"),
    ("unet2d_convlstm", (1, 4, 8, 8, 5), {}, "T=3 time steps"),
    ("unet2d_convlstm", (1, 3, 8, 10, 5), {}, "W divisible by 4"),
    ("unet2d_convlstm", (1, 3, 8, 8, 5), {"num_features": 6}, "num_features divisible by 4"),
    ("unet3df", (1, 4, 8, 8, 7), {}, "5 input channels"),
    ("unet3df", (4, 8, 8, 5), {}, r"\[B, T, H, W, C\]"),
])
def test_unsupported_shapes_raise(name, shape, fields, message):
  config = model_config(name, "supervised", **dict(SMALL[name], **fields))
  with pytest.raises(ValueError, match=message):
    init_shapes(models.create_model(config), shape)


@pytest.mark.parametrize("name, stage, message", [
    ("unet3d", "pretrain", "no CSCL pre-training stage"),
    ("unet3df", "train", "model.stage='train'"),
    ("unet4d", "pretrain", "model.name='unet4d'"),
])
def test_bad_config_raises(name, stage, message):
  with pytest.raises(ValueError, match=message):
    models.create_model(model_config(name, stage))


# --- Small configurations: real passes (one compiled probe per encoder) --------------


@pytest.fixture(scope="module", params=["unet3df", "unet2d_convlstm"])
def probe(request):
  """A small model with its init function, variables, a batch and one jitted probe.

  The probe returns the train-mode output, updated statistics and gradients of
  loss = sum(output * fixed weights), and the eval-mode output.
  """
  name = request.param
  config = model_config(name, SMALL_STAGE[name], **SMALL[name])
  model = models.create_model(config)
  x = jax.random.normal(key(1), (4, config.max_seq_len, 8, 12, 5))
  init = jax.jit(lambda rng: model.init(rng, x, train=False))
  variables = init(key(0))

  @jax.jit
  def run(variables):
    def loss(params):
      out, updates = model.apply(dict(variables, params=params), x, train=True,
                                 mutable=["batch_stats"])
      return jnp.sum(out * jax.random.normal(key(2), out.shape)), (out, updates)
    grads, (train_out, updates) = jax.grad(loss, has_aux=True)(variables["params"])
    return dict(train_out=train_out, updates=updates, grads=grads,
                eval_out=model.apply(variables, x, train=False))

  return dict(config=config, model=model, init=init, variables=variables, x=x,
              **run(variables))


def test_train_mode_updates_every_statistic(probe):
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)),
                         probe["variables"]["batch_stats"], probe["updates"]["batch_stats"])
  assert changed and all(jax.tree.leaves(changed))
  assert not np.allclose(probe["train_out"], probe["eval_out"], rtol=1e-3, atol=1e-4)


def test_predict_is_the_per_sample_eval_forward(probe):
  # `predict` applies without a mutable collection, so eval mode cannot update
  # statistics (Flax would raise); running statistics make it per sample.
  out = models.predict(probe["config"], probe["variables"], np.asarray(probe["x"][:1]))
  assert isinstance(out, np.ndarray) and out.dtype == np.float32
  np.testing.assert_allclose(out, probe["eval_out"][:1], rtol=1e-4, atol=1e-5)


def test_predict_unet3d_logits():
  config = model_config("unet3d", "supervised", **SMALL["unet3d"])
  model = models.create_model(config)
  x = jnp.ones((1, 4, 8, 8, 5))
  variables = jax.jit(lambda x: model.init(key(0), x, train=False))(x)
  out = models.predict(config, variables, x)
  assert out.shape == (1, 8, 8, 3) and np.all(np.isfinite(out)) and np.std(out) > 0


def test_gradients_reach_every_parameter(probe):
  # Every kernel, scale and offset learns, so every layer is wired to the loss.
  # Biases are finite but may be zero: BatchNorm cancels a conv bias feeding it.
  for path, g in jax.tree_util.tree_leaves_with_path(probe["grads"]):
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    if not jax.tree_util.keystr(path).endswith("['bias']"):
      assert np.any(g != 0), jax.tree_util.keystr(path)


def test_init_is_deterministic_from_the_seed(probe):
  again, other = probe["init"](key(0)), probe["init"](key(1))
  jax.tree.map(np.testing.assert_array_equal, probe["variables"], again)
  # Biases start at zero and norm scales at constants; every kernel differs.
  differs = jax.tree_util.tree_map_with_path(
      lambda path, a, b: bool(np.any(a != b)) or not jax.tree_util.keystr(path).endswith(
          ("['kernel']", "['rel_h']", "['rel_w']")),
      probe["variables"]["params"], other["params"])
  assert all(jax.tree.leaves(differs))


def test_bfloat16_computation_keeps_float32_state(probe):
  model = models.create_model(probe["config"], dtype="bfloat16")
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(
      jax.eval_shape(lambda: model.init(key(0), probe["x"], train=False))))
  out, updates = jax.jit(lambda v: model.apply(v, probe["x"], train=True,
                                               mutable=["batch_stats"]))(probe["variables"])
  assert out.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))
  ref = probe["train_out"]
  np.testing.assert_allclose(out, ref, atol=0.1 * float(jnp.std(ref)) + 0.02)


def test_batch_norm_statistics_are_averaged_across_devices(probe):
  model = models.create_model(probe["config"], axis_name="batch")
  step = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1]
  replicated = jax.tree.map(lambda a: jnp.stack([a, a]), probe["variables"])
  x = probe["x"]
  shards = x.reshape(2, x.shape[0] // 2, *x.shape[1:])
  per_device = jax.pmap(step, axis_name="batch", devices=jax.devices()[:2])(replicated, shards)
  # Both devices hold the statistics of the whole batch.
  for got, want in zip(jax.tree.leaves(per_device), jax.tree.leaves(probe["updates"])):
    np.testing.assert_allclose(got[0], got[1])
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)
