"""The networks: SITS encoders and their stage heads, built from `config.model`.

  model = create_model(config.model, dtype=jnp.bfloat16, axis_name="batch")
  variables = model.init(rng, x, train=False)   # x: [B, T, H, W, C]
  out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])

Encoders ([B, T, H, W, C] -> [B, H, W, E]; SPEC.md §2): "unet3df" (the CSCL
encoder; T, H, W divisible by 4), "unet3d" (supervised baseline with a built-in
classifier; same shapes), "unet2d_convlstm" (H, W divisible by 4); T must equal
model.max_seq_len for these. "biconvgru" (any T, H, W) and "tsvit" (H = W = img_res
divisible by patch_size, any T) skip padded dates (`dates`). "utae" (U-TAE; H, W
divisible by 8, any T, padded dates masked; its embedding is the decoder output
[B, H, W, 2f], its classifier the original's out_conv). `segmenter.Segmenter` adds
the head of `model.stage`.

Why Flax Linen: the models are BatchNorm networks trained data-parallel, which is
what Linen and its examples (flax examples/imagenet) are built around:
BatchNorm(axis_name=...) averages statistics across devices under pmap or
shard_map, running statistics live in a separate "batch_stats" collection
(`mutable=["batch_stats"]` in training, read-only in evaluation), and variables
are plain nested dicts that orbax saves and restores as pytrees, so dropping the
head is `{"encoder": params["encoder"]}`.

`dtype` is the computation dtype (bfloat16 for mixed precision); parameters,
BatchNorm statistics, the classifier and the CSCL head's reductions stay float32.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cscl_jax.models import biconvgru
from cscl_jax.models import segmenter
from cscl_jax.models import tsvit
from cscl_jax.models import unet2d_convlstm
from cscl_jax.models import unet3d
from cscl_jax.models import utae


def _unet3df(mc: ml_collections.ConfigDict, **kwargs) -> nn.Module:
  return unet3d.UNet3Df(
      out_features=mc.emb_channels, num_channels=mc.num_channels,
      time_steps=mc.max_seq_len, num_features=mc.num_features, **kwargs)


def _unet3d(mc: ml_collections.ConfigDict, **kwargs) -> nn.Module:
  return unet3d.UNet3D(
      out_features=mc.num_classes, num_channels=mc.num_channels,
      time_steps=mc.max_seq_len, num_features=mc.num_features, **kwargs)


def _unet2d_convlstm(mc: ml_collections.ConfigDict, **kwargs) -> nn.Module:
  return unet2d_convlstm.UNet2DConvLSTM(
      num_channels=mc.num_channels, time_steps=mc.max_seq_len,
      num_features=mc.num_features, emb_channels=mc.emb_channels, **kwargs)


def _biconvgru(mc: ml_collections.ConfigDict, *, dtype: Any, axis_name: str | None
               ) -> nn.Module:
  del axis_name  # No BatchNorm.
  return biconvgru.BiConvGRU(num_channels=mc.num_channels, conv3d_dim=mc.conv3d_dim,
                             rnn_hidden_dim=mc.rnn_hidden_dim, dtype=dtype)


def _tsvit(mc: ml_collections.ConfigDict, *, dtype: Any, axis_name: str | None
           ) -> nn.Module:
  del axis_name  # No BatchNorm.
  return tsvit.TSViT(
      num_classes=mc.num_classes, num_channels=mc.num_channels, img_res=mc.img_res,
      patch_size=mc.patch_size, dim=mc.dim, temporal_depth=mc.temporal_depth,
      spatial_depth=mc.spatial_depth, heads=mc.heads, dim_head=mc.dim_head,
      scale_dim=mc.scale_dim, dtype=dtype)


def _utae(mc: ml_collections.ConfigDict, **kwargs) -> nn.Module:
  f = mc.num_features  # f = 16: the original's PASTIS widths.
  return utae.UTAE(num_channels=mc.num_channels, encoder_widths=(4 * f, 4 * f, 4 * f, 8 * f),
                   decoder_widths=(2 * f, 2 * f, 4 * f, 8 * f), d_model=16 * f, **kwargs)


def _utae_out_conv(mc: ml_collections.ConfigDict, *, axis_name: str | None) -> nn.Module:
  """The original's out_conv [2f, classes] (BatchNorm + ReLU after both convs), float32."""
  return utae.ConvLayer((2 * mc.num_features, mc.num_classes), norm="batch",
                        axis_name=axis_name)


# model.name -> (encoder builder, classifier kernel size). None: no head, the encoder
# classifies by itself and cannot be pre-trained. segmenter.OWN_CLASSIFIER: the encoder
# ends in its own per-pixel classifier (E = num_classes); fine-tuning adds no head,
# pre-training puts the CSCL head on those scores.
# A function: the encoder's own classifier module (with BatchNorm), called with train.
ENCODERS = {
    "unet3df": (_unet3df, 1),
    "unet3d": (_unet3d, None),
    "unet2d_convlstm": (_unet2d_convlstm, 3),
    "biconvgru": (_biconvgru, 3),
    "tsvit": (_tsvit, segmenter.OWN_CLASSIFIER),
    "utae": (_utae, _utae_out_conv),
}


def create_model(model_config: ml_collections.ConfigDict, *, dtype: Any = jnp.float32,
                 axis_name: str | None = None) -> nn.Module:
  """Builds encoder + head from `config.model`.

  Args:
    model_config: config.model (configs/common.py).
    dtype: computation dtype, e.g. jnp.bfloat16 or "bfloat16".
    axis_name: pmap/shard_map axis over which BatchNorm averages statistics;
      None on a single device (and for `init`, which runs with train=False).

  Returns:
    A Segmenter: __call__(x [B, T, H, W, C], *, train) -> float32 similarities
    [B, H', W', k, k] for stage "pretrain", logits [B, H, W, num_classes] otherwise.
  """
  if model_config.name not in ENCODERS:
    raise ValueError(f"model.name={model_config.name!r}; choose one of "
                     f"{sorted(ENCODERS)}.")
  build, classifier_kernel = ENCODERS[model_config.name]
  dtype = jnp.dtype(dtype)
  head = segmenter.make_head(model_config, classifier_kernel=classifier_kernel,
                             dtype=dtype, axis_name=axis_name)
  encoder = build(model_config, dtype=dtype, axis_name=axis_name)
  return segmenter.Segmenter(encoder=encoder, head=head, head_takes_train=(
      callable(classifier_kernel) and model_config.stage != "pretrain"))


@functools.partial(jax.jit, static_argnums=0)
def _apply_eval(model: nn.Module, variables: Any, x: jax.Array) -> jax.Array:
  return model.apply(variables, x, train=False)


def predict(model_config: ml_collections.ConfigDict, variables: Any,
            x: np.ndarray | jax.Array) -> np.ndarray:
  """Eval-mode forward pass (BatchNorm running statistics), jit-compiled.

  Args:
    model_config: config.model the variables were made for.
    variables: {"params": ..., "batch_stats": ...}.
    x: inputs [B, T, H, W, C].

  Returns:
    float32 logits [B, H, W, num_classes], or similarities [B, H', W', k, k]
    for stage "pretrain".
  """
  return np.asarray(_apply_eval(create_model(model_config), variables, jnp.asarray(x)))
