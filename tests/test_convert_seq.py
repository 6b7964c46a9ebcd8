"""Parity of BiConvGRU and TSViT with the PyTorch originals, and importing their weights.

The torch networks (torch_sequence_models.py: the originals' names and forward passes)
get random weights and LayerNorm parameters; `convert.from_deepsat` turns their state
dicts into our config and variables, and `models.predict` must give their outputs to
float32 round-off, including on padded series and on the days whose index the original
truncates to the day before.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cscl_jax import convert  # pylint: disable=g-import-not-at-top
from cscl_jax import convert_seq
from cscl_jax import models
from cscl_jax.models import dates
import torch_sequence_models as tsm

RTOL = 2e-5  # max |ours - torch| / max |torch|: float32 round-off
# Days whose float32 doy / 365.0001 the original truncates to the day before.
TRUNCATED_DAYS = (13, 26, 52, 59, 104, 105, 118, 183, 208, 366)


def assert_close(got, want):
  assert got.shape == want.shape
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err < RTOL, f"relative error {err:.2e}"


def state_dict(module):
  return {k: v.numpy() for k, v in module.state_dict().items()}


def series(lengths, t, res, channels, seed=0):
  """Inputs [B, t, res, res, channels] with `lengths` real dates (the truncated days
  among them), zero-padded after, as the input pipeline writes them."""
  rng = np.random.default_rng(seed)
  x = np.zeros((len(lengths), t, res, res, channels), np.float32)
  for i, length in enumerate(lengths):
    x[i, :length] = rng.normal(size=(length, res, res, channels))
    days = np.sort(rng.choice(TRUNCATED_DAYS + (1, 200, 300, 365), length, replace=False))
    x[i, :length, ..., -1] = (days.astype(np.float32) / np.float32(365.0001))[:, None, None]
  return x


def test_day_rows_are_the_originals_truncation():
  days = torch.arange(366).to(torch.float32) / 365.0001  # the original's pipeline
  rows = (days * 365.0001).to(torch.int64).numpy()
  np.testing.assert_array_equal(convert_seq.original_day_rows(), rows)
  # The series below use these days: each one is truncated to the day before.
  truncated = torch.tensor(TRUNCATED_DAYS).to(torch.float32) / 365.0001
  np.testing.assert_array_equal((truncated * 365.0001).to(torch.int64).numpy(),
                                np.array(TRUNCATED_DAYS) - 1)


def test_biconvgru_with_padded_series_computes_the_original():
  net = tsm.randomize_(tsm.BiConvGRU(3, 5, conv3d_dim=4, hidden=6), 1).eval()
  lengths = np.array([4, 2])
  x = series(lengths, 4, 6, 3)
  with torch.no_grad():  # the original's inputs: forward, backward, seq_lengths
    want = net((torch.from_numpy(x), torch.from_numpy(tsm.backward_inputs(x, lengths)),
                torch.from_numpy(lengths))).numpy()  # log-probabilities [B, K, H, W]
  model_config, variables = convert.from_deepsat(state_dict(net), "ConvBiRNN", "finetune",
                                                 img_res=6)
  logits = models.predict(model_config, variables, x)  # [B, H, W, K]
  assert_close(np.moveaxis(np.asarray(jax.nn.log_softmax(logits)), -1, 1), want)


def test_tsvit_computes_the_original_and_masks_padding():
  net = tsm.randomize_(tsm.TSViT(img_res=8, patch_size=2, num_channels=4, num_classes=3,
                                 dim=16, temporal_depth=2, spatial_depth=1, heads=2,
                                 dim_head=8, scale_dim=2), 2).eval()
  x = series([5, 5], 5, 8, 4)
  with torch.no_grad():
    want = np.moveaxis(net(torch.from_numpy(x)).numpy(), 1, -1)  # [B, H, W, K]
  model_config, variables = convert.from_deepsat(state_dict(net), "TSViT", "finetune",
                                                 heads=2)
  assert (model_config.img_res, model_config.num_channels, model_config.dim_head,
          model_config.temporal_depth, model_config.spatial_depth) == (8, 4, 8, 2, 1)
  assert_close(models.predict(model_config, variables, x), want)
  # Padded to 7 dates: the original would attend to the padding as day 0; ours masks it.
  padded = np.concatenate([x, np.zeros_like(x[:, :2])], axis=1)
  assert_close(models.predict(model_config, variables, padded), want)


@pytest.mark.parametrize("architecture, make, sizes, count", [
    ("ConvBiRNN", lambda: tsm.BiConvGRU(14, 20), dict(
        name="biconvgru", num_channels=14, conv3d_dim=64, rnn_hidden_dim=256,
        num_classes=20), 4_525_524),
    ("ConvBiRNN", lambda: tsm.BiConvGRU(15, 18), dict(num_channels=15, num_classes=18),
     4_516_882),
    ("TSViT", tsm.TSViT, dict(
        name="tsvit", num_channels=11, num_classes=19, img_res=24, patch_size=2, dim=128,
        temporal_depth=4, spatial_depth=4, heads=4, dim_head=32, scale_dim=4), 1_657_476),
])
def test_reference_configurations_convert_with_every_entry(architecture, make, sizes,
                                                           count):
  net = make()
  assert sum(p.numel() for p in net.parameters()) == count  # the original's
  model_config, variables = convert.from_deepsat(state_dict(net), architecture,
                                                 "supervised")
  assert {k: model_config[k] for k in sizes} == sizes
  assert set(variables) == {"params"}
  assert sum(leaf.size for leaf in jax.tree.leaves(variables)) == count


@pytest.mark.parametrize("architecture, kwargs, message", [
    ("TSViT", dict(stage="pretrain"), "stage='pretrain' for TSViT"),
    ("TSViT", dict(stage="finetune", img_res=48), "img_res=48 but .* 8x8 images"),
    ("TSViT", dict(stage="finetune", heads=3), "heads=3 does not divide"),
    ("ConvBiRNN", dict(stage="finetune"), r"no 'inconv\.weight'"),
])
def test_bad_requests_are_named(architecture, kwargs, message):
  sd = state_dict(tsm.TSViT(img_res=8, num_channels=4, num_classes=3, dim=16,
                            temporal_depth=1, spatial_depth=1, heads=2, dim_head=8))
  with pytest.raises(ValueError, match=message):
    convert.from_deepsat(sd, architecture, **kwargs)


def test_missing_transformer_entry_is_named():
  sd = state_dict(tsm.TSViT(img_res=8, num_channels=4, num_classes=3, dim=16,
                            temporal_depth=2, spatial_depth=1, heads=2, dim_head=8))
  del sd["temporal_transformer.layers.1.0.fn.to_out.0.bias"]
  with pytest.raises(ValueError, match=r"missing: 'temporal_transformer\.layers\.1\.0\."
                                       r"fn\.to_out\.0\.bias'"):
    convert.from_deepsat(sd, "TSViT", "finetune", heads=2)
  assert dates.NUM_DAYS == sd["to_temporal_embedding_input.weight"].shape[1]
