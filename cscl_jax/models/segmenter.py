"""Encoder + head: the network trained in every stage (SPEC.md §3).

`Segmenter` names its two submodules "encoder" and "head", so a checkpoint's
`{"encoder": params["encoder"]}` keeps the encoder and drops the head:

  pretrain           head = cscl.ContextSelfSimilarity -> similarities [B, H', W', k, k]
  finetune/supervised head = Classifier                -> logits [B, H, W, num_classes]

An encoder that classifies by itself has no head in fine-tuning; UNet3D cannot be
pre-trained, TSViT (OWN_CLASSIFIER) is pre-trained with the CSCL head on its scores.
A classifier with BatchNorm (U-TAE's out_conv) is called with `train` like the encoder.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cscl_jax import cscl
from cscl_jax.models import layers

# The training stages (SPEC.md §3); the one list the loop, the converter and the heads use.
STAGES = ("pretrain", "finetune", "supervised")
# `classifier_kernel` of an encoder whose output already is per-pixel class scores
# (TSViT): no head in fine-tuning, the CSCL head on those scores in pre-training.
OWN_CLASSIFIER = 0


class Classifier(nn.Module):
  """Per-pixel classifier: a k x k conv (k = 1 is the reference's Linear), named "conv".

  Runs in float32 whatever the encoder's dtype.

  Attributes:
    num_classes: output channels.
    kernel_size: 1 (UNet3Df's Linear) or 3 (UNet2D-ConvLSTM's Conv2d 3x3).
  """
  num_classes: int
  kernel_size: int = 1

  @nn.compact
  def __call__(self, emb: jax.Array) -> jax.Array:
    """Maps embeddings [B, H, W, E] to float32 logits [B, H, W, num_classes]."""
    k = self.kernel_size
    return nn.Conv(self.num_classes, (k, k), padding=k // 2, dtype=jnp.float32,
                   kernel_init=layers.TORCH_DEFAULT_INIT, name="conv")(emb.astype(jnp.float32))


class Segmenter(nn.Module):
  """Runs `encoder` on [B, T, H, W, C], then `head` (if any); float32 outputs.

  Attributes:
    encoder: module with __call__(x, *, train) -> [B, H, W, E] (or logits).
    head: module mapping the encoder output to the stage's output, or None.
    head_takes_train: call the head with `train` (a head with BatchNorm).
  """
  encoder: nn.Module
  head: nn.Module | None = None
  head_takes_train: bool = False

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    out = self.encoder(x, train=train)
    if self.head is not None:
      out = self.head(out, train=train) if self.head_takes_train else self.head(out)
    return out.astype(jnp.float32)


def make_head(model_config: ml_collections.ConfigDict, *,
              classifier_kernel: int | Callable[..., nn.Module] | None,
              dtype: Any, axis_name: str | None = None) -> nn.Module | None:
  """The head for `model_config.stage`.

  Args:
    model_config: config.model (stage, num_classes and the CSCL head's fields).
    classifier_kernel: the encoder's classifier kernel size; None for an
      encoder that classifies by itself (no head, no pre-training); OWN_CLASSIFIER
      for one whose class scores are its per-pixel embedding; or a function
      (model_config, axis_name=) -> the encoder's own classifier module, called
      with `train`.
    dtype: computation dtype of the CSCL head's projections.
    axis_name: pmap axis of a classifier's BatchNorm.

  Returns:
    cscl.ContextSelfSimilarity for "pretrain", a classifier (or None) otherwise.
  """
  stage = model_config.stage
  if stage not in STAGES:
    raise ValueError(f"model.stage={stage!r}; choose one of {STAGES}.")
  if stage != "pretrain":
    if classifier_kernel in (None, OWN_CLASSIFIER):
      return None
    if callable(classifier_kernel):
      return classifier_kernel(model_config, axis_name=axis_name)
    return Classifier(model_config.num_classes, classifier_kernel)
  if classifier_kernel is None:
    raise ValueError(
        f"model.name={model_config.name!r} is a supervised baseline with a built-in "
        "classifier: it has no CSCL pre-training stage; use stage 'supervised' or "
        "an encoder such as 'unet3df' or 'unet2d_convlstm'.")
  return cscl.ContextSelfSimilarity(
      attn_channels=model_config.attn_channels, kernel_size=model_config.kernel_size,
      stride=model_config.stride, dilation=model_config.dilation,
      groups=model_config.groups, norm_emb=model_config.norm_emb, dtype=dtype)
