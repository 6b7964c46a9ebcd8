"""Parity with the reference PyTorch networks, and importing their checkpoints.

Layers against torch.nn itself, whole networks against tests/torch_reference.py (module
names = the original state_dict names) through `convert.from_deepsat` and
`models.predict`, the errors for bad state dicts, and the command line into a checkpoint
that fine-tuning loads. Every torch model has random weights AND random BatchNorm running
statistics, in eval mode.
"""

import functools
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

from cscl_jax import checkpoints  # pylint: disable=g-import-not-at-top
from cscl_jax import convert
from cscl_jax import cscl
from cscl_jax import models
from cscl_jax import state_dicts
from cscl_jax import steps
from cscl_jax.models import layers
from cscl_jax.models import unet2d_convlstm
import torch_reference as tr
from configs import test as test_config

RTOL = 2e-5  # max |ours - torch| / max |torch|: float32 round-off


def assert_close(got, want, rtol=RTOL):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err < rtol, f"relative error {err:.2e}"


def torch_eval(module, x, seed=1):
  """Randomises `module`, and runs it in eval mode on the numpy array x."""
  tr.randomize_(module, seed).eval()
  with torch.no_grad():
    return module(torch.from_numpy(x)).numpy()


def normal(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def channels_last(x):
  return np.moveaxis(x, 1, -1)


def conv_vars(module):
  return {"kernel": state_dicts.torch_kernel(module.weight.detach().numpy()),
          "bias": module.bias.detach().numpy()}


def norm_vars(module):
  """(params, batch_stats) of a BatchNorm or GroupNorm (empty batch_stats)."""
  params = {"scale": module.weight.detach().numpy(), "bias": module.bias.detach().numpy()}
  if getattr(module, "running_mean", None) is None:
    return params, {}
  return params, {"mean": module.running_mean.numpy(), "var": module.running_var.numpy()}


# --- Layers against torch.nn -----------------------------------------------------------


@pytest.mark.parametrize("dims, norm, channels", [(3, "batch", (3, 4, 6)),
                                                 (2, "group", (3, 32, 48))])
def test_conv_block_is_conv_norm_leaky_relu(dims, norm, channels):
  # Conv3d/Conv2d 'same', BatchNorm3d in eval / GroupNorm(C // 16), LeakyReLU(0.01).
  block = tr.conv_block(dims, channels, norm)
  x = normal(2, *(4, 6, 5)[3 - dims:], channels[0])
  want = channels_last(torch_eval(block, np.moveaxis(x, -1, 1)))
  params, stats = {}, {}
  for i in range(2):
    params[f"conv{i}"] = conv_vars(block[3 * i])
    params[f"norm{i}"], stats[f"norm{i}"] = norm_vars(block[3 * i + 1])
  variables = {"params": params, **({"batch_stats": stats} if norm == "batch" else {})}
  got = layers.ConvBlock(channels[1:], norm=norm).apply(variables, x, train=False)
  assert (want < 0).mean() > 0.2  # the slope of LeakyReLU matters
  assert_close(got, want)


def test_batch_norm_eval_uses_running_statistics():
  bn = torch.nn.BatchNorm3d(5)
  x = normal(2, 3, 4, 4, 5)
  want = channels_last(torch_eval(bn, np.moveaxis(x, -1, 1)))
  params, stats = norm_vars(bn)
  bn_ours = layers.batch_norm(train=False, axis_name=None, dtype=jnp.float32)
  assert_close(bn_ours.apply({"params": params, "batch_stats": stats}, x), want)


@pytest.mark.parametrize("dims, kernel, padding, output_padding",
                         [(3, 3, 1, 1), (2, 2, 0, 0)])
def test_conv_transpose_matches_torch_including_its_flip(dims, kernel, padding,
                                                         output_padding):
  # UNet3D: ConvTranspose3d(3, stride 2, padding 1, output_padding 1); UNet2D: (2, 2).
  conv_t = {2: torch.nn.ConvTranspose2d, 3: torch.nn.ConvTranspose3d}[dims](
      4, 3, kernel, stride=2, padding=padding, output_padding=output_padding)
  x = normal(2, *(3, 2, 5)[3 - dims:], 4)
  want = channels_last(torch_eval(conv_t, np.moveaxis(x, -1, 1)))
  layer = layers.conv_transpose_x2(3, kernel, dims, padding=padding,
                                   output_padding=output_padding, dtype=jnp.float32)
  params = conv_vars(conv_t)
  assert_close(layer.apply({"params": params}, x), want)
  flipped = dict(params, kernel=np.flip(params["kernel"], axis=tuple(range(dims))))
  assert not np.allclose(layer.apply({"params": flipped}, x), want, atol=1e-3)


def test_max_pool():
  x = normal(2, 4, 6, 8, 3)
  want = channels_last(torch_eval(torch.nn.MaxPool3d(2, 2), np.moveaxis(x, -1, 1)))
  np.testing.assert_array_equal(layers.max_pool_x2(x), want)


def test_time_squeeze_linear():
  # UNet3D ends with nn.Linear(T, 1) over the time axis of [B, C, H, W, T].
  fn = torch.nn.Linear(4, 1)
  x = normal(2, 4, 3, 5, 6)  # [B, T, H, W, C]
  want = torch_eval(fn, np.moveaxis(x, 1, -1))[..., 0]  # [B, H, W, C]
  got = nn.Dense(1).apply({"params": conv_vars(fn)}, np.moveaxis(x, 1, -1))[..., 0]
  assert_close(got, want)


def test_convlstm_with_per_step_running_statistics():
  cell = tr.randomize_(tr.ConvLSTMCell(3, 4, time_steps=3), 1).eval()
  x = normal(2, 3, 6, 5, 3)  # [B, T, H, W, C]
  with torch.no_grad():
    want = np.moveaxis(cell.run(torch.from_numpy(np.moveaxis(x, -1, 2))).numpy(), 2, -1)
  params, stats = {}, {}
  for ours, theirs in (("h", "h"), ("x", "input"), ("c", "cell")):
    if ours != "c":
      params[f"{ours}_conv"] = conv_vars(getattr(cell, f"{theirs}_conv"))
    norm = getattr(cell, f"{theirs}_norm")
    params[f"{ours}_norm"] = {"scale": norm.weight.detach().numpy()}
    stats[f"{ours}_norm"] = {s: np.stack([getattr(norm, f"running_{s}_{t}").numpy()
                                          for t in range(3)]) for s in ("mean", "var")}
  lstm = unet2d_convlstm.ConvLSTM(hidden=4)
  got = lstm.apply({"params": {"cell": params}, "batch_stats": {"cell": stats}}, x,
                   train=False)
  assert_close(got, want)


@pytest.mark.parametrize("kernel_size, stride, dilation, groups, norm_emb", [
    (3, 1, 1, 1, True), (3, 2, 2, 2, True), (5, 1, 2, 1, False)])
def test_cscl_head_matches_unfolded_windows(kernel_size, stride, dilation, groups, norm_emb):
  head = tr.ContextSelfSimilarity(6, 8, kernel_size, stride, dilation, groups, norm_emb)
  emb = normal(2, 7, 9, 6)
  want = torch_eval(head, np.moveaxis(emb, -1, 1))
  state = {k: v.numpy() for k, v in head.state_dict().items()}
  params = {"query": {"kernel": state_dicts.torch_kernel(state["query_conv.weight"][..., 0, 0])},
            "key": {"kernel": state_dicts.torch_kernel(state["key_conv.weight"][..., 0, 0])},
            "rel_h": state["rel_h"].reshape(4, kernel_size),
            "rel_w": state["rel_w"].reshape(4, kernel_size)}
  ours = cscl.ContextSelfSimilarity(8, kernel_size, stride, dilation, groups, norm_emb)
  assert_close(ours.apply({"params": params}, emb), want)


# --- Whole networks: torch state dict -> from_deepsat -> predict == torch eval ----------

SMALL = {  # (architecture, stage) -> (torch module, input [B, T, H, W, C])
    ("UNET3Df", "pretrain"): (lambda: tr.UNet3DCSCL(0, 3, 4, num_features=2,
                                                    attn_channels=8), (2, 4, 8, 8, 3)),
    ("UNET3Df", "finetune"): (lambda: tr.UNet3DCSCL(2, 3, 4, num_features=2, num_classes=5),
                              (2, 4, 8, 8, 3)),
    ("UNET3D", "supervised"): (lambda: tr.UNet3D(3, 5, 4, num_features=2), (2, 4, 8, 8, 3)),
    **{("UNET3Df", stage, m): (lambda s=s, m=m: tr.UNet3DCSCL(
        s, 3, 4, num_features=2, num_classes=5, attn_channels=8, output_magnification=m),
                               (2, 4, 8, 8, 3))
       for stage, s in (("pretrain", 0), ("finetune", 2)) for m in (2, 4)},
    ("UNET2D-CLSTM", "pretrain"): (lambda: tr.FCNCRNN(0, 3, 3, 5, num_features=4, hidden=16,
                                                      attn_channels=8), (2, 3, 8, 8, 3)),
    ("UNET2D-CLSTM", "finetune"): (lambda: tr.FCNCRNN(2, 3, 3, 5, num_features=4, hidden=16),
                                   (2, 3, 8, 8, 3)),
}


def state_dict(module):
  return {k: v.numpy() for k, v in module.state_dict().items()}


def _case_id(case):
  return "-".join(map(str, case))


@pytest.mark.parametrize("case", list(SMALL), ids=_case_id)
def test_converted_network_computes_the_torch_network(case):
  """case: (architecture, stage) or (architecture, stage, output magnification)."""
  (architecture, stage, *magnification), (make, shape) = case, SMALL[case]
  net = make()
  x = normal(*shape, seed=2)
  want = torch_eval(net, x)
  if stage != "pretrain":
    want = channels_last(want)  # logits [B, K, H, W] -> [B, H, W, K]
  model_config, variables = convert.from_deepsat(state_dict(net), architecture, stage,
                                                 img_res=shape[2])
  assert model_config.output_magnification == (magnification or [1])[0]
  assert_close(models.predict(model_config, variables, x), want)


# Reference configurations (SPEC.md §2): (architecture, stage) -> (torch module, the
# sizes from_deepsat must infer, reference parameter count of the original network).
FULL = {
    ("UNET3Df", "pretrain"): (lambda: tr.UNet3DCSCL(0, 14, 16), dict(
        num_channels=14, max_seq_len=16, num_features=16, emb_channels=128,
        attn_channels=128, kernel_size=3), 7_217_361 + 33_152),
    ("UNET3Df", "finetune"): (lambda: tr.UNet3DCSCL(2, 14, 16, num_classes=20), dict(
        num_channels=14, max_seq_len=16, num_features=16, num_classes=20), 7_219_941),
    # Super-resolution (SPEC.md §5): 147,840 parameters per up-block.
    ("UNET3Df", "pretrain", 2): (lambda: tr.UNet3DCSCL(0, 14, 16, output_magnification=2),
                                 dict(output_magnification=2, attn_channels=128), 7_398_353),
    ("UNET3Df", "finetune", 4): (lambda: tr.UNet3DCSCL(2, 14, 16, num_classes=20,
                                                       output_magnification=4),
                                 dict(output_magnification=4, num_classes=20), 7_515_621),
    ("UNET3D", "supervised"): (lambda: tr.UNet3D(14, 20, 16), dict(
        num_channels=14, max_seq_len=16, num_features=16, num_classes=20), 6_183_429),
    ("UNET2D-CLSTM", "finetune"): (lambda: tr.FCNCRNN(2, 15, 16), dict(
        num_channels=15, max_seq_len=16, num_features=16, emb_channels=128,
        num_classes=18), 3_093_298),
    ("UNET2D-CLSTM", "pretrain"): (lambda: tr.FCNCRNN(0, 15, 16), dict(
        num_channels=15, max_seq_len=16, emb_channels=128, attn_channels=128,
        num_classes=18), 3_126_450),
}
UNUSED_CLASSIFIER = 128 * 18 * 9 + 18  # UNET2D-CLSTM's stage-0 main_finalconv, dropped


@pytest.mark.parametrize("case", list(FULL), ids=_case_id)
def test_reference_configurations_convert_with_every_entry(case):
  (architecture, stage, *_), (make, sizes, reference_count) = case, FULL[case]
  net = make()
  assert sum(p.numel() for p in net.parameters()) == reference_count  # the original's
  model_config, variables = convert.from_deepsat(state_dict(net), architecture, stage)
  assert {k: model_config[k] for k in sizes} == sizes
  count = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
  unused = UNUSED_CLASSIFIER if architecture == "UNET2D-CLSTM" and stage == "pretrain" else 0
  assert count == reference_count - unused
  n_stats = sum(v.numel() for k, v in net.state_dict().items() if "running_" in k)
  assert sum(leaf.size for leaf in jax.tree.leaves(variables["batch_stats"])) == n_stats


# --- Bad state dicts ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_unet3df():
  return state_dict(tr.UNet3DCSCL(0, 3, 4, num_features=2, attn_channels=8))


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("backbone.dc4.3.weight"), r"missing: 'backbone\.dc4\.3\.weight'"),
    (lambda sd: sd.pop("backbone.en3.1.running_var"),
     r"missing: 'backbone\.en3\.1\.running_var'"),
    (lambda sd: sd.update({"backbone.extra.weight": np.zeros(3)}),
     r"unexpected: 'backbone\.extra\.weight'"),
    (lambda sd: sd.update({"backbone.en4.0.weight": np.zeros((16, 9, 3, 3, 3))}),
     r"wrong shape: 'backbone\.en4\.0\.weight' is \(16, 9, 3, 3, 3\), this network "
     r"needs \(16, 8, 3, 3, 3\)"),
    (lambda sd: sd.update({"attn_sim.rel_w": np.zeros((4, 1, 1, 3, 1))}),
     r"wrong shape: 'attn_sim\.rel_w'"),
])
def test_bad_entries_are_named(small_unet3df, change, message):
  sd = dict(small_unet3df)
  change(sd)
  with pytest.raises(ValueError, match=message):
    convert.from_deepsat(sd, "UNET3Df", "pretrain", img_res=8)


def test_per_step_statistics_are_checked_one_by_one():
  sd = state_dict(tr.FCNCRNN(2, 3, 3, 5, num_features=4, hidden=16))
  del sd["crnn_main.clstm.cell_list.0.cell_norm.running_var_1"]
  with pytest.raises(ValueError, match=r"missing: 'crnn_main\.clstm\.cell_list\.0\."
                                       r"cell_norm\.running_var_1'"):
    convert.from_deepsat(sd, "UNET2D-CLSTM", "finetune", img_res=8)


@pytest.mark.parametrize("architecture, stage, kwargs, message", [
    ("UNET3Df", "finetune", {}, r"no 'linear_out\.weight'.*train_stage"),
    ("UNET2D-CLSTM", "pretrain", {},
     r"no 'fcn\.unet_encode\.enc3\.encode\.0\.weight'.*not a UNET2D-CLSTM"),
    ("UNET3D", "pretrain", {}, "stage='pretrain' for UNET3D"),
    ("UNet3D", "supervised", {}, "choose one of"),
    ("UNET3Df", "pretrain", {"num_classes": 4, "img_res": 8}, None),
])
def test_wrong_architecture_or_stage(small_unet3df, architecture, stage, kwargs, message):
  if message is None:  # UNET3Df pre-training weights do not say the classes: given here
    model_config, _ = convert.from_deepsat(small_unet3df, architecture, stage, **kwargs)
    assert model_config.num_classes == 4
    return
  with pytest.raises(ValueError, match=message):
    convert.from_deepsat(small_unet3df, architecture, stage, **kwargs)


def test_num_classes_must_agree_with_the_classifier():
  sd = state_dict(tr.UNet3D(3, 5, 4, num_features=2))
  with pytest.raises(ValueError, match="num_classes=6 but the classifier .* 5 outputs"):
    convert.from_deepsat(sd, "UNET3D", "finetune", img_res=8, num_classes=6)


# --- Command line: .pth -> checkpoint that fine-tuning loads -------------------------------


def test_cli_writes_a_checkpoint_that_finetuning_loads(tmp_path, capsys):
  net = tr.randomize_(tr.UNet3DCSCL(0, 3, 4, num_features=2, attn_channels=8), 3)
  # Saved from nn.DataParallel, inside a dict: both unwrapped on loading.
  torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}},
             tmp_path / "model.pth")
  workdir = str(tmp_path / "converted")
  convert.main([f"--checkpoint={tmp_path / 'model.pth'}", "--architecture=UNET3Df",
                "--stage=pretrain", f"--workdir={workdir}", "--img_res=8"])
  assert f"--config.init_from={workdir}" in capsys.readouterr().out
  with open(os.path.join(workdir, checkpoints.CONFIG_FILE)) as f:
    saved = json.load(f)["model"]
  assert (saved["name"], saved["num_features"], saved["emb_channels"]) == ("unet3df", 2, 16)

  # What train.py does for --config.init_from: a fresh fine-tuning model, then its encoder.
  model_config, converted = convert.from_deepsat(state_dict(net), "UNET3Df", "pretrain",
                                                 img_res=8)
  model_config.update(stage="finetune", num_classes=5)
  model = models.create_model(model_config)
  fresh = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False))(
      jnp.zeros((1, 4, 8, 8, 3)))
  params, batch_stats = checkpoints.load_encoder(workdir, fresh["params"],
                                                 fresh["batch_stats"])
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  same(params["encoder"], converted["params"]["encoder"])
  same(batch_stats, converted["batch_stats"])
  assert jax.tree.structure(params["head"]) == jax.tree.structure(fresh["params"]["head"])

  # One fine-tuning step (steps.train_step) from the converted encoder (one device: a vmap axis).
  config = test_config.get_config()
  config.model.update(model_config.to_dict())
  state = steps.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2),
                                  batch_stats=batch_stats)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.normal(size=(1, 2, 4, 8, 8, 3)).astype(np.float32),
           "labels": rng.integers(0, 6, size=(1, 2, 8, 8)).astype(np.int32)}
  batch["valid"] = batch["labels"] < 5
  step = jax.vmap(functools.partial(steps.train_step, config=config, axis_name="batch"),
                  in_axes=(None, 0), axis_name="batch")
  stepped, step_metrics = step(state, batch)
  assert np.isfinite(step_metrics["loss"]).all() and int(stepped.step[0]) == 1
  moved = jax.tree.map(lambda a, b: not np.allclose(a[0], b), stepped.params["encoder"],
                       params["encoder"])
  assert any(jax.tree.leaves(moved))

  with pytest.raises(ValueError, match="already holds checkpoints"):
    convert.convert_checkpoint(str(tmp_path / "model.pth"), workdir, "UNET3Df", "pretrain",
                               img_res=8)


def test_load_state_dict_formats(tmp_path, monkeypatch):
  net = tr.UNet3D(3, 5, 4, num_features=2)
  torch.save(net.state_dict(), tmp_path / "plain.pth")
  loaded = state_dicts.load_state_dict(str(tmp_path / "plain.pth"))
  assert list(loaded) == list(net.state_dict())
  assert loaded["en3.1.num_batches_tracked"].dtype == np.int64
  torch.save([1, 2], tmp_path / "list.pth")
  with pytest.raises(ValueError, match="not a state dict"):
    state_dicts.load_state_dict(str(tmp_path / "list.pth"))
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ImportError, match="pip install torch"):
    state_dicts.load_state_dict(str(tmp_path / "plain.pth"))
