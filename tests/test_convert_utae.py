"""U-TAE against a PyTorch rebuild with utae-paps' names, and importing its checkpoints.

The rebuild (tests/torch_reference_utae.py) has random weights AND random BatchNorm running
statistics and runs in eval mode; sample 0 of every batch has padded dates.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cscl_jax import checkpoints  # pylint: disable=g-import-not-at-top
from cscl_jax import convert_utae
from cscl_jax import models
import test_utae
import torch_reference_utae as tu

RTOL = 2e-5  # max |ours - torch| / max |torch|: float32 round-off
# A narrow U-TAE (f = 4): 3 bands + day of year, 5 classes.
SMALL = dict(input_dim=3, encoder_widths=(16, 16, 16, 32), decoder_widths=(8, 8, 16, 32),
             out_conv=(8, 5), d_model=64)


def state_dict(module):
  return {k: v.numpy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def small():
  """The small torch network, its state dict, a batch with padded dates and torch's outputs."""
  net = tu.randomize_(tu.UTAE(**SMALL), 1).eval()
  x, doy = test_utae.inputs((2, 5, 16, 16, 4), padded=((0, 3),), seed=2)
  bands = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x[..., :-1], -1, 2)))
  with torch.no_grad():
    logits = net(bands, torch.from_numpy(doy)).numpy()
    net.encoder = True
    embedding = net(bands, torch.from_numpy(doy)).numpy()
    net.encoder = False
  channels_last = lambda a: np.moveaxis(a, 1, -1)
  return dict(net=net, state=state_dict(net), x=x, logits=channels_last(logits),
              embedding=channels_last(embedding))


def assert_close(got, want):
  err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
  assert err < RTOL, f"relative error {err:.2e}"


def test_pastis_rebuild_has_the_original_count_and_converts_completely():
  net = tu.UTAE()  # PASTIS defaults
  assert sum(p.numel() for p in net.parameters()) == 1_087_260
  model_config, variables = convert_utae.from_utae(state_dict(net))
  assert (model_config.num_channels, model_config.num_features,
          model_config.num_classes) == (11, 16, 20)
  assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == 1_087_260
  n_stats = sum(v.numel() for k, v in net.state_dict().items() if "running_" in k)
  assert sum(leaf.size for leaf in jax.tree.leaves(variables["batch_stats"])) == n_stats


def test_converted_network_computes_the_torch_network(small):
  model_config, variables = convert_utae.from_utae(small["state"], img_res=16, max_seq_len=5)
  assert (model_config.name, model_config.num_features) == ("utae", 4)
  assert (small["logits"] > 0).mean() > 0.2 and (small["logits"] == 0).mean() > 0.2  # ReLU
  assert_close(models.predict(model_config, variables, small["x"]), small["logits"])
  # The embedding CSCL pre-trains: the decoder output (the original's encoder=True).
  build, _ = models.ENCODERS["utae"]
  encoder = build(model_config)
  embedding = jax.jit(lambda v, x: encoder.apply(v, x, train=False))(
      {"params": variables["params"]["encoder"],
       "batch_stats": variables["batch_stats"]["encoder"]}, small["x"])
  assert_close(embedding, small["embedding"])


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("up_blocks.1.skip_conv.1.running_var"),
     r"missing: 'up_blocks\.1\.skip_conv\.1\.running_var'"),
    (lambda sd: sd.update({"temporal_encoder.extra": np.zeros(3)}),
     r"unexpected: 'temporal_encoder\.extra'"),
    (lambda sd: sd.update({"temporal_encoder.attention_heads.Q": np.zeros((8, 4))}),
     r"wrong shape: 'temporal_encoder\.attention_heads\.Q' is \(8, 4\), this network "
     r"needs \(16, 4\)"),
    (lambda sd: sd.pop("in_conv.conv.conv.0.weight"), "not a utae-paps UTAE"),
])
def test_bad_entries_are_named(small, change, message):
  sd = dict(small["state"])
  change(sd)
  with pytest.raises(ValueError, match=message):
    convert_utae.from_utae(sd, img_res=16)


def test_pretrain_stage_is_refused(small):
  with pytest.raises(ValueError, match="encoder \\+ classifier"):
    convert_utae.from_utae(small["state"], stage="pretrain")


def test_cli_converts_a_utae_paps_checkpoint_that_finetuning_loads(small, tmp_path, capsys):
  # utae-paps saves {"epoch", "state_dict", "optimizer"} as model.pth.tar.
  torch.save({"epoch": 3, "state_dict": {"module." + k: v
                                         for k, v in small["net"].state_dict().items()},
              "optimizer": {"state": {}, "param_groups": [{"lr": 0.001}]}},
             tmp_path / "model.pth.tar")
  workdir = str(tmp_path / "converted")
  convert_utae.main([f"--checkpoint={tmp_path / 'model.pth.tar'}", f"--workdir={workdir}",
                     "--img_res=16", "--max_seq_len=5"])
  out = capsys.readouterr().out
  assert f"--config.init_from={workdir}" in out and "--config.model.name=utae" in out

  # What train.py does for --config.init_from: a fresh model of new classes, its encoder.
  model_config, converted = convert_utae.from_utae(small["state"], img_res=16)
  model_config.update(stage="finetune", num_classes=7)
  model = models.create_model(model_config)
  fresh = jax.jit(lambda x: model.init(test_utae.key(0), x, train=False))(
      jnp.zeros((1, 5, 16, 16, 4)))
  params, batch_stats = checkpoints.load_encoder(workdir, fresh["params"],
                                                 fresh["batch_stats"])
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  same(params["encoder"], converted["params"]["encoder"])
  same(batch_stats["encoder"], converted["batch_stats"]["encoder"])
  assert params["head"]["conv1"]["kernel"].shape[-1] == 7  # the new classifier
  assert os.path.exists(os.path.join(workdir, checkpoints.CONFIG_FILE))
