"""TSViT: the Temporo-Spatial Vision Transformer (Tarasiou et al., CVPR 2023; SPEC.md §2).

The reference dense TSViT (DeepSatModels `models/TSViT/TSViTdense.py`), on inputs
[B, T, H, W, C] whose last channel is the day of year (`dates`):

  1. Patches p x p of the C - 1 bands -> Linear(dim): tokens [B, N, T, dim], N = (H/p)(W/p)
     patches in row-major order, patch features in (row, column, channel) order.
  2. Temporal position: the day of year, one-hot over 366 days -> Linear(dim), added
     to every patch's date tokens.
  3. K = num_classes learned class tokens are put before the T date tokens of every
     patch; a pre-norm Transformer (temporal_depth layers) runs over these K + T tokens;
     the K class tokens are kept: [B, K, N, dim].
  4. A learned spatial position embedding [N, dim] is added, and a second Transformer
     (spatial_depth layers) runs over the N patches of each class token.
  5. LayerNorm + Linear(dim -> p^2) turns each (class k, patch) token into the k-th
     score of the patch's p^2 pixels, and the patches are put back at their 2-D
     positions: [B, H, W, K]. The reference's final `reshape` lays the p^2 pixels of a
     patch along an image row instead (DeepSatModels issue 22, fixed upstream with an
     einops rearrange); this is the fixed layout.

Padded dates (`dates.valid_dates`) are masked out of the temporal attention: no token
attends to them, so the output is that of the real dates alone (the reference attends
to them as day 0). The day of year is recovered by rounding (`dates.day_of_year`).

Per-pixel embedding: TSViT has no per-pixel feature before its classifier; the first
per-pixel representation is step 5's K scores. So the encoder here is the whole
reference network, its output [B, H, W, K] is the per-pixel embedding (E = num_classes)
on which CSCL pre-training puts its head, and in fine-tuning those K channels are the
class logits: the reference's own classifier (step 5), pre-trained with the rest.

PASTIS24 settings (24x24, 11 channels, K = 19, patch 2, dim 128, depths 4/4, 4 heads of
32, MLP x4): 1,657,476 parameters. Dropout is left out (0 in every reference config).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cscl_jax.models import dates
from cscl_jax.models import layers

LAYER_NORM_EPSILON = 1e-5  # PyTorch nn.LayerNorm default.


def _dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                  kernel_init=layers.TORCH_DEFAULT_INIT, name=name)


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention: qkv without bias, softmax over unmasked keys, out Linear.

  Attributes:
    heads: attention heads.
    dim_head: channels per head.
    dtype: computation dtype; the softmax runs in float32.
  """
  heads: int
  dim_head: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x [S, L, dim], mask bool [S, L] (keys to attend) or None -> [S, L, dim]."""
    s, length, dim = x.shape
    qkv = _dense(3 * self.heads * self.dim_head, "to_qkv", self.dtype, use_bias=False)(x)
    q, k, v = jnp.split(qkv.reshape(s, length, 3 * self.heads, self.dim_head), 3, axis=2)
    logits = jnp.einsum("sihd,sjhd->shij", q, k).astype(jnp.float32) * self.dim_head ** -0.5
    if mask is not None:  # [S, 1, 1, L]: masked keys get no weight.
      logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # [S, heads, L, L]
    out = jnp.einsum("shij,sjhd->sihd", weights, v).reshape(s, length, -1)
    if self.heads == 1 and self.dim_head == dim:  # The reference's nn.Identity.
      return out
    return _dense(dim, "to_out", self.dtype)(out)


class Transformer(nn.Module):
  """Pre-norm Transformer: depth x [x += Attn(LN x); x += MLP(LN x)], then a LayerNorm.

  Attributes:
    depth: layers.
    heads: attention heads.
    dim_head: channels per head.
    mlp_dim: hidden width of the GELU MLP.
    dtype: computation dtype.
  """
  depth: int
  heads: int
  dim_head: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x [S, L, dim], mask bool [S, L] or None -> [S, L, dim]."""
    dim = x.shape[-1]
    for i in range(self.depth):
      y = _layer_norm(f"attn_norm{i}", self.dtype)(x)
      x = x + Attention(self.heads, self.dim_head, self.dtype, name=f"attn{i}")(y, mask)
      y = _layer_norm(f"mlp_norm{i}", self.dtype)(x)
      y = nn.gelu(_dense(self.mlp_dim, f"mlp{i}_in", self.dtype)(y), approximate=False)
      x = x + _dense(dim, f"mlp{i}_out", self.dtype)(y)
    return _layer_norm("norm", self.dtype)(x)


class DayEmbedding(nn.Module):
  """The reference's Linear(366, dim) on one-hot days, as a row lookup (same numbers).

  Attributes:
    dim: embedding width.
  """
  dim: int

  @nn.compact
  def __call__(self, day: jax.Array) -> jax.Array:
    """int day [B, T] in 0..365 -> float32 [B, T, dim]."""
    kernel = self.param("kernel", layers.TORCH_DEFAULT_INIT, (dates.NUM_DAYS, self.dim))
    bias = self.param("bias", nn.initializers.zeros, (self.dim,))
    return kernel[day] + bias


class TSViT(nn.Module):
  """Reference dense TSViT: [B, T, H, W, C] -> per-pixel class scores [B, H, W, K].

  Attributes:
    num_classes: K, the class tokens and output channels.
    num_channels: input channels C (bands + day of year, the last one).
    img_res: H = W (the spatial position embedding has one row per patch).
    patch_size: p; img_res must be a multiple.
    dim: token width.
    temporal_depth: layers of the temporal Transformer.
    spatial_depth: layers of the spatial Transformer.
    heads: attention heads.
    dim_head: channels per head.
    scale_dim: MLP width = scale_dim * dim.
    dtype: computation dtype; parameters stay float32.
  """
  num_classes: int
  num_channels: int = 11
  img_res: int = 24
  patch_size: int = 2
  dim: int = 128
  temporal_depth: int = 4
  spatial_depth: int = 4
  heads: int = 4
  dim_head: int = 32
  scale_dim: int = 4
  dtype: Any = jnp.float32

  def _check(self, x: jax.Array) -> None:
    want = f"[B, T, {self.img_res}, {self.img_res}, {self.num_channels}]"
    if x.ndim != 5 or x.shape[2:] != (self.img_res, self.img_res, self.num_channels):
      raise ValueError(f"TSViT expects inputs {want} (model.img_res, model.num_channels); "
                       f"got shape {x.shape}.")
    if self.img_res % self.patch_size:
      raise ValueError(f"TSViT needs model.img_res={self.img_res} divisible by "
                       f"model.patch_size={self.patch_size}.")

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Maps [B, T, H, W, C] to [B, H, W, num_classes]; `train` changes nothing."""
    del train  # No dropout or batch statistics.
    self._check(x)
    b, t, res, _, c = x.shape
    p, k, dim = self.patch_size, self.num_classes, self.dim
    g = res // p  # patches per side
    n = g * g
    valid, day = dates.valid_dates(x), dates.day_of_year(x)  # [B, T] each
    patches = x[..., :-1].reshape(b, t, g, p, g, p, c - 1)
    patches = patches.transpose(0, 2, 4, 1, 3, 5, 6).reshape(b, n, t, p * p * (c - 1))
    tokens = _dense(dim, "patch_embedding", self.dtype)(patches)  # [B, N, T, dim]
    tokens = tokens + DayEmbedding(dim, name="temporal_embedding")(day)[:, None].astype(
        self.dtype)
    class_tokens = self.param("temporal_token", nn.initializers.normal(1.0), (k, dim))
    tokens = jnp.concatenate(
        [jnp.broadcast_to(class_tokens.astype(self.dtype), (b, n, k, dim)), tokens], axis=2)
    mask = jnp.concatenate([jnp.ones((b, k), bool), valid], axis=1)  # [B, K + T]
    mask = jnp.broadcast_to(mask[:, None], (b, n, k + t)).reshape(b * n, k + t)
    transformer = lambda depth, name: Transformer(
        depth, self.heads, self.dim_head, self.scale_dim * dim, self.dtype, name=name)
    tokens = transformer(self.temporal_depth, "temporal_transformer")(
        tokens.reshape(b * n, k + t, dim), mask)[:, :k]  # [B N, K, dim]
    tokens = tokens.reshape(b, n, k, dim).transpose(0, 2, 1, 3)  # [B, K, N, dim]
    space_pos = self.param("space_pos_embedding", nn.initializers.normal(1.0), (n, dim))
    tokens = (tokens + space_pos.astype(self.dtype)).reshape(b * k, n, dim)
    tokens = transformer(self.spatial_depth, "space_transformer")(tokens)  # [B K, N, dim]
    scores = _dense(p * p, "head", self.dtype)(_layer_norm("head_norm", self.dtype)(tokens))
    # [B K, N, p^2] -> patches back at their 2-D positions: [B, H, W, K].
    scores = scores.reshape(b, k, g, g, p, p).transpose(0, 2, 4, 3, 5, 1)
    return scores.reshape(b, res, res, k)
