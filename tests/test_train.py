"""Train/eval steps on fake batches, and short in-process runs of the training loop.

Uses the tiny model of configs/test.py on 8 simulated CPU devices (see conftest.py).
"""

import functools
import json
import os
import signal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np
import optax
import pytest

from cscl_jax import checkpoints
from cscl_jax import input_pipeline
from cscl_jax import models
from cscl_jax import preemption
from cscl_jax import steps
from cscl_jax import train
from cscl_jax import visualize
from configs import test as test_config


def _config(stage: str):
  config = test_config.get_config()
  config.model.stage = stage
  return config


def _fake_batch(config, batch_size: int, seed: int = 0):
  m = config.model
  rng = np.random.default_rng(seed)
  hw = (batch_size, m.img_res, m.img_res)
  # Blocky labels, so that CSCL pairs are mixed same/different class.
  labels = np.repeat(np.repeat(rng.integers(0, m.num_classes + 1, (batch_size, 4, 4)),
                               m.img_res // 4, 1), m.img_res // 4, 2)
  return {"inputs": rng.normal(size=hw[:1] + (m.max_seq_len,) + hw[1:] + (m.num_channels,)
                               ).astype(np.float32),
          "labels": labels.astype(np.int32), "valid": rng.random(hw) > 0.1}


def _sgd_state(config, dtype=jnp.float32):
  """A train state whose update is -gradient, so params compare gradients exactly.

  `dtype`: the computation dtype; with float64 (x64 enabled) the BatchNorm statistics,
  which the batch statistics update, are float64 too. Parameters stay float32.
  """
  model = models.create_model(config.model, dtype=dtype, axis_name="batch")
  state = steps.create_train_state(jax.random.key(0, impl="rbg"), config, model,
                                   steps.learning_rate_schedule(config, 10))
  return state.replace(tx=optax.sgd(1.0), opt_state=optax.sgd(1.0).init(state.params),
                       batch_stats=jax.tree.map(lambda s: s.astype(dtype), state.batch_stats))


def _pmap_step(step_fn, state, batch, num_devices):
  """Runs `step_fn` on `num_devices` devices, the global batch split between them."""
  split = lambda x: x.reshape((num_devices, -1) + x.shape[1:])
  replicated = jax.tree.map(lambda x: np.stack([x] * num_devices), state)
  out = jax.pmap(step_fn, axis_name="batch", devices=jax.devices()[:num_devices])(
      replicated, jax.tree.map(split, batch))
  return jax.tree.map(lambda x: np.asarray(x[0]), out)


def _assert_trees_close(a, b, **tolerance):
  jax.tree.map(functools.partial(np.testing.assert_allclose, **tolerance), a, b)


def _shard_map_step(step_fn, state, batch):
  """Runs `step_fn` under shard_map on all devices, the global batch split between them."""
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  out = jax.jit(jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P("batch")),
                              out_specs=P()))(state, batch)
  return jax.device_get(out)


# Fine-tuning's loss is a mean over the known pixels of all devices; pre-training's
# custom-VJP similarity needs its replicated position embedding cast to varying under
# shard_map. One 8-device compile each.
@pytest.mark.parametrize("stage,run_on_8", [("pretrain", "pmap"), ("pretrain", "shard_map"),
                                            ("finetune", "shard_map")])
def test_train_step_on_8_devices_equals_one_device(stage, run_on_8):
  # In float64: in float32 a pre-activation within round-off of LeakyReLU's kink can
  # land on either side depending on the summation order (8 devices against 1), and its
  # gradient then differs by far more than round-off.
  config = _config(stage)
  with jax.enable_x64(True):
    state, batch = _sgd_state(config, jnp.float64), _fake_batch(config, 16)
    step_fn = functools.partial(steps.train_step, config=config, axis_name="batch")
    one_state, one = _pmap_step(step_fn, state, batch, 1)
    if run_on_8 == "pmap":
      eight_state, eight = _pmap_step(step_fn, state, batch, 8)
    else:
      eight_state, eight = _shard_map_step(step_fn, state, batch)
  assert jax.device_count() == 8
  assert one["loss"] == pytest.approx(eight["loss"], rel=1e-5)
  assert one["grad_norm"] == pytest.approx(eight["grad_norm"], rel=1e-5)
  # With SGD(1) the parameter update is the gradient itself.
  _assert_trees_close(one_state.params, eight_state.params, rtol=1e-5, atol=1e-6)
  _assert_trees_close(one_state.batch_stats, eight_state.batch_stats, rtol=1e-5,
                      atol=1e-6)


def test_pretrain_loss_is_the_cscl_loss():
  config = _config("pretrain")
  batch = _fake_batch(config, 4)
  rng = np.random.default_rng(1)
  sim = rng.uniform(-1, 1, (4, 8, 8, 3, 3)).astype(np.float32)
  loss, sums = _pmap_step(
      lambda s, b: steps.compute_loss(s, b, config, "batch"), sim, batch, 1)
  # Reference: the loss of SPEC.md §1.4 from pair labels computed pixel by pixel.
  labels = np.pad(batch["labels"], ((0, 0), (1, 1), (1, 1)), constant_values=-1)
  target = np.array([[labels[:, 1 + a:9 + a, 1 + b:9 + b] == batch["labels"]
                       for b in (-1, 0, 1)] for a in (-1, 0, 1)])  # [k, k, B, H, W]
  target = target.transpose(2, 3, 4, 0, 1).astype(np.float32)
  w = config.cscl.pos_weight
  assert loss == pytest.approx(np.mean((1 - target) * sim - w * target * sim), rel=1e-5)
  assert sums["same_count"] == target.sum()


def _outputs(state, config, inputs):
  """The model's eval-mode outputs, one device, no pmap."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return np.asarray(jax.jit(functools.partial(models.create_model(config.model).apply,
                                              train=False))(variables, inputs))


def _numpy_eval(state, config, batch):
  """Predictions and confusion matrices of `batch` in plain numpy loops (the reference)."""
  num_classes = config.model.num_classes
  preds = _outputs(state, config, batch["inputs"]).argmax(-1)
  labels, (size, height, width) = batch["labels"], batch["labels"].shape
  confusions = np.zeros((3, num_classes, num_classes), np.int64)
  for b, i, j in np.ndindex(size, height, width):
    if not (batch["valid"][b, i, j] and batch["example_mask"][b]
            and labels[b, i, j] < num_classes):
      continue
    window = np.pad(labels[b], 1, mode="reflect")[i:i + 3, j:j + 3]
    subset = 1 if (window != labels[b, i, j]).any() else 2  # boundary / interior
    for s in (0, subset):
      confusions[s, labels[b, i, j], preds[b, i, j]] += 1
  return preds, confusions


def test_eval_step_predictions_and_confusions_over_devices():
  config = _config("finetune")
  state, batch = _sgd_state(config), _fake_batch(config, 16)
  batch["example_mask"] = np.arange(16) < 13  # the last 3 are padding
  step_fn = functools.partial(steps.eval_step, config=config, axis_name="batch")
  one, one_preds = _pmap_step(step_fn, state, batch, 1)
  eight, _ = _pmap_step(step_fn, state, batch, 8)
  preds, confusions = _numpy_eval(state, config, batch)
  np.testing.assert_array_equal(one_preds, preds)
  assert confusions[0].sum() > 0 and confusions[1].sum() > 0 and confusions[2].sum() > 0
  np.testing.assert_array_equal(one["confusions"], confusions)
  np.testing.assert_array_equal(eight["confusions"], confusions)
  for key in ("loss_sum", "loss_count"):
    assert one[key] == pytest.approx(eight[key], rel=1e-5)
  assert one["loss_count"] == confusions[0].sum()


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_eval_loss_is_exact_and_ignores_padding(stage):
  """Split 11 examples as 8 + 3 padded with 5 blanks: the loss of the 11, exactly."""
  config = _config(stage)
  state, batch = _sgd_state(config), _fake_batch(config, 11)
  step_fn = functools.partial(steps.eval_step, config=config, axis_name="batch")
  p_step = lambda s, b: jax.pmap(step_fn, axis_name="batch", devices=jax.devices()[:2])(
      jax.tree.map(lambda x: np.stack([x] * 2), s), b)
  blank = {"inputs": 0.0, "labels": config.model.num_classes, "valid": False}
  padded = {k: np.concatenate([v, np.full((5,) + v.shape[1:], blank[k], v.dtype)])
            for k, v in batch.items()}
  padded["example_mask"] = np.arange(16) < 11
  batches = [jax.tree.map(lambda x: x[i:i + 8].reshape((2, 4) + x.shape[1:]), padded)
             for i in (0, 8)]
  scores, examples, _ = train.evaluate(p_step, state, batches, class_names=["c"] * 12,
                                       stage=stage)
  assert len(examples["labels"]) == 8  # the first batch, all real
  outputs = _outputs(state, config, batch["inputs"])
  if stage == "finetune":  # mean cross-entropy over the known pixels of the 11 examples
    logits = np.asarray(outputs, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    known = batch["valid"] & (batch["labels"] < 12)
    expected = -np.mean(np.take_along_axis(logp, np.where(known, batch["labels"], 0)[..., None],
                                           -1)[..., 0][known])
  else:  # SPEC.md §1.4 over the 11 examples' pairs
    labels = np.pad(batch["labels"], ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    target = np.array([[labels[:, 1 + a:9 + a, 1 + b:9 + b] == batch["labels"]
                        for b in (-1, 0, 1)] for a in (-1, 0, 1)]).transpose(2, 3, 4, 0, 1)
    sim, w = np.asarray(outputs, np.float64), config.cscl.pos_weight
    expected = np.mean((1 - target) * sim - w * target * sim)
  assert scores["loss"] == pytest.approx(expected, rel=1e-4)


def test_metrics_json_is_strict_json_with_null_for_nan(tmp_path):
  path = str(tmp_path / "metrics.json")
  train.write_metrics(path, 7, {"oa": 0.5, "boundary/miou": float("nan")})

  def refuse(constant):
    raise ValueError(f"{constant} is not JSON")

  with open(path) as f:
    assert json.loads(f.read(), parse_constant=refuse) == {
        "step": 7, "oa": 0.5, "boundary/miou": None}


def test_model_shapes_are_checked_before_the_data(tmp_path, monkeypatch):
  def no_data(config):
    raise AssertionError("the dataset was opened before the model's shapes were checked")

  monkeypatch.setattr(input_pipeline, "dataset_info", no_data)
  config = _config("pretrain")
  config.model.img_res = 10
  with pytest.raises(ValueError, match="divisible by 4"):
    train.train_and_evaluate(config, str(tmp_path))


def test_learning_rate_decays_per_epoch():
  config = _config("pretrain")
  schedule = steps.learning_rate_schedule(config, steps_per_epoch=10)
  lr, decay = config.learning_rate, config.lr_decay
  assert float(schedule(0)) == pytest.approx(lr)
  assert float(schedule(9)) == pytest.approx(lr)
  assert float(schedule(25)) == pytest.approx(lr * decay**2)


def test_summarize_train_names_the_bad_step():
  good = {"loss": np.float32(1.0), "grad_norm": np.float32(2.0)}
  summary = train.summarize_train([good, {"loss": 3.0, "grad_norm": 4.0}], first_step=5)
  assert summary == {"loss": 2.0, "grad_norm": 3.0}
  with pytest.raises(FloatingPointError, match="at step 6"):
    train.summarize_train([good, {"loss": np.nan, "grad_norm": 1.0}], first_step=5)
  with pytest.raises(FloatingPointError, match="at step 5"):
    train.summarize_train([{"loss": 1.0, "grad_norm": np.inf}], first_step=5)


# --- The loop itself, on the tiny synthetic dataset. ---


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Runs of the same config compile the same programs: compile them once."""
  options = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
             "jax_persistent_cache_min_compile_time_secs": 0.0}
  previous = {k: getattr(jax.config, k) for k in options}
  for k, v in options.items():
    jax.config.update(k, v)
  yield
  for k, v in previous.items():
    jax.config.update(k, v)


def _run_config(data_dir, num_steps, **overrides):
  config = _config("pretrain")
  config.dataset.data_dir = data_dir
  config.num_train_steps = num_steps
  config.update(overrides)
  return config


def _latest_params(workdir):
  manager = checkpoints.create_manager(workdir, keep=1, best_metric="loss", best_mode="min")
  step = manager.latest_step()
  return step, manager.restore(step)["params"]


def test_resume_is_exact(data_dir, tmp_path, caplog):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(_run_config(data_dir, 4), straight)
  train.train_and_evaluate(_run_config(data_dir, 2), resumed)
  with caplog.at_level("INFO"):
    train.train_and_evaluate(_run_config(data_dir, 4), resumed)
  assert "resuming at step 2" in caplog.text
  (step_a, params_a), (step_b, params_b) = _latest_params(straight), _latest_params(resumed)
  assert step_a == step_b == 4
  _assert_trees_close(params_a, params_b, rtol=0, atol=0)


def _on_train_step(monkeypatch, at_step, change):
  """Patches the pipeline so that the batch of training step `at_step` is change(batch)."""
  real_create_split = input_pipeline.create_split

  def patched(config, split, *, train, start_step=0, info=None):
    batches = real_create_split(config, split, train=train, start_step=start_step, info=info)
    for step, batch in enumerate(batches, start=start_step + 1):
      yield change(batch) if train and step == at_step else batch

  monkeypatch.setattr(input_pipeline, "create_split", patched)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
  _on_train_step(monkeypatch, 3,
                 lambda batch: {**batch, "inputs": np.full_like(batch["inputs"], np.nan)})
  workdir = str(tmp_path / "nan")
  config = _run_config(data_dir, 4, checkpoint_every_steps=1, eval_every_steps=10)
  with pytest.raises(FloatingPointError, match="at step 3"):
    train.train_and_evaluate(config, workdir)
  step, params = _latest_params(workdir)
  assert step == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_sigterm_saves_a_checkpoint(data_dir, tmp_path, monkeypatch):
  def interrupt(batch):
    os.kill(os.getpid(), signal.SIGTERM)
    return batch

  _on_train_step(monkeypatch, 3, interrupt)
  workdir, handler = str(tmp_path / "sigterm"), signal.getsignal(signal.SIGTERM)
  config = _run_config(data_dir, 4, checkpoint_every_steps=10, eval_every_steps=10)
  with pytest.raises(preemption.Stopped, match="Stopped at step 3") as stop:
    train.train_and_evaluate(config, workdir)
  assert stop.value.exit_code == 128 + signal.SIGTERM
  assert _latest_params(workdir)[0] == 3
  assert signal.getsignal(signal.SIGTERM) is handler


def test_x4_pretrain_then_finetune_at_label_resolution(data_dir, tmp_path, monkeypatch):
  """Super-resolution end to end: 8x8 inputs, CSCL and classifier on 32x32 labels_x4."""
  shown = []
  real_plot = visualize.plot_segmentation

  def plot(path, inputs, labels, preds, num_classes, **kwargs):
    shown.append((inputs.shape[2:4], labels.shape[1:], preds.shape[1:]))
    real_plot(path, inputs, labels, preds, num_classes, **kwargs)

  monkeypatch.setattr(visualize, "plot_segmentation", plot)
  pre, fine = str(tmp_path / "pre"), str(tmp_path / "fine")
  config = _run_config(data_dir, 2)
  config.model.output_magnification = 4
  pre_scores = train.train_and_evaluate(config, pre)
  config.model.stage, config.init_from = "finetune", pre
  scores = train.train_and_evaluate(config, fine)
  assert np.isfinite(pre_scores["loss"]) and 0 <= scores["boundary/miou"] <= 1
  assert shown == [((8, 8), (32, 32), (32, 32))]
  # The up-blocks belong to the encoder: fine-tuning starts from the pre-trained ones.
  assert {"conv_out_x2", "conv_out_x4"} <= set(_latest_params(fine)[1]["encoder"])


@pytest.mark.parametrize("stage,freeze,batch_of_step", [("pretrain", False, 2),
                                                         ("supervised", True, 0)])
def test_precise_bn_checkpoint_normalises_like_training_mode(data_dir, tmp_path, caplog,
                                                             stage, freeze, batch_of_step):
  """With precise_bn_batches=1 the statistics saved at step 2 are those of one training
  batch: the one after step 2, or for a frozen encoder the first (recomputed once, before
  training, and kept). In inference mode the model then computes what training mode
  computes on that batch."""
  config = _run_config(data_dir, 2, precise_bn_batches=1, freeze_encoder=freeze)
  config.model.stage = stage
  with caplog.at_level("INFO"):
    train.train_and_evaluate(config, str(tmp_path))
  assert ("BatchNorm statistics recomputed over 1 training batch" + " once" * freeze
          + ")") in caplog.text
  manager = checkpoints.create_manager(str(tmp_path), keep=1, best_metric="loss",
                                       best_mode="min")
  saved = manager.restore(2)
  batch = next(input_pipeline.create_split(config, "train", train=True,
                                           start_step=batch_of_step))
  inputs = batch["inputs"].reshape((-1,) + batch["inputs"].shape[2:])  # the global batch
  model = models.create_model(config.model)  # No device axis: statistics over all 8.
  variables = {"params": saved["params"], "batch_stats": saved["batch_stats"]}
  inference = model.apply(variables, inputs, train=False)
  training, _ = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(inference, training, rtol=1e-4, atol=1e-5)
  # Other statistics (the initial ones) do not.
  initial = model.init(jax.random.key(0), inputs[:1], train=False)["batch_stats"]
  inference = model.apply({"params": saved["params"], "batch_stats": initial}, inputs,
                          train=False)
  assert not np.allclose(inference, training, rtol=1e-4, atol=1e-5)


def test_precise_bn_batches_must_not_be_negative(data_dir, tmp_path):
  with pytest.raises(ValueError, match="precise_bn_batches=-1"):
    train.train_and_evaluate(_run_config(data_dir, 2, precise_bn_batches=-1), str(tmp_path))
