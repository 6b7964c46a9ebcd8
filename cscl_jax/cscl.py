"""Context-Self Contrastive Loss (CSCL): similarity map, pair labels, masks and losses.

The maths of SPEC.md §1 as pure JAX functions plus the Flax Linen head that owns the
parameters. For every output location p = (s·i, s·j) and window offset o = (d·a, d·b),
a, b in {-r..r} with r = k // 2 (K = k² offsets, row-major), the head compares the query
at p with the key at p + o (zero outside the image) plus a learned relative position
embedding; the labels say whether p and p + o hold the same class.

The similarity reads K shifted views of the zero-padded key, one offset at a time, and
expands |key + rel|² into |key|² + 2·key·rel + |rel|², so no array of size B·H'·W'·A·K
exists in the forward or backward pass (the reference unfolds the keys into one).

This module imports nothing else of cscl_jax:

  from cscl_jax import cscl
  sim = cscl.ContextSelfSimilarity(attn_channels=128, kernel_size=3).apply(v, emb)
  loss = cscl.contrastive_loss(sim, cscl.cscl_labels(labels, kernel_size=3))
"""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# F.normalize's guard: x / max(||x||, _EPS), computed as x * rsqrt(max(||x||², _EPS²)).
_EPS = 1e-12


def _check_window(kernel_size: int, stride: int, dilation: int, **maps) -> None:
  """Raises ValueError unless (k, s, d) is a valid window and `maps` are [B, H, W]."""
  if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(
        f"kernel_size must be a positive odd int (the window is centred on each "
        f"location), got {kernel_size!r}.")
  for name, value in (("stride", stride), ("dilation", dilation)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
  for name, x in maps.items():
    if x.ndim != 3:
      raise ValueError(f"{name} must be [B, H, W], got shape {x.shape}.")


def _check_similarity_inputs(q, key, rel_h, rel_w, kernel_size, groups) -> None:
  """Raises ValueError for inconsistent similarity inputs (trace time)."""
  if q.ndim != 4 or q.shape != key.shape:
    raise ValueError(
        f"q and key must both be [B, H, W, A] with the same shape, got {q.shape} and "
        f"{key.shape}.")
  attn = q.shape[-1]
  if not isinstance(groups, int) or groups < 1 or attn % (2 * groups):
    raise ValueError(
        f"attention channels A = {attn} must be divisible by 2 * groups (groups = "
        f"{groups!r}): half of A carries rel_h, half rel_w, and each group must be whole.")
  want = (attn // 2, kernel_size)
  if rel_h.shape != want or rel_w.shape != want:
    raise ValueError(
        f"rel_h and rel_w must have shape [A // 2, kernel_size] = {want}, got "
        f"{rel_h.shape} and {rel_w.shape}.")


def _output_size(size: int, stride: int) -> int:
  return -(-size // stride)  # ceil(size / stride)


def _offsets(kernel_size: int):
  """Window offsets (a, b) in {-r..r}², row-major, r = k // 2."""
  r = kernel_size // 2
  return [(a, b) for a in range(-r, r + 1) for b in range(-r, r + 1)]


def _pad(x: jax.Array, kernel_size: int, dilation: int, value=0) -> jax.Array:
  """Pads the two spatial axes (1 and 2) of x by r·d on each side with `value`."""
  width = (kernel_size // 2) * dilation
  pads = [(0, 0), (width, width), (width, width)] + [(0, 0)] * (x.ndim - 3)
  return jnp.pad(x, pads, constant_values=value)


def _view(padded: jax.Array, offset, out_hw, kernel_size, stride, dilation) -> jax.Array:
  """x[s·i + d·a, s·j + d·b] for the output grid, read from the r·d-padded x."""
  r = kernel_size // 2
  (a, b), (out_h, out_w) = offset, out_hw
  top, left = (r + a) * dilation, (r + b) * dilation
  return padded[:, top:top + stride * (out_h - 1) + 1:stride,
                left:left + stride * (out_w - 1) + 1:stride]


def _windows(x: jax.Array, kernel_size, stride, dilation, pad_value) -> jax.Array:
  """Stacks the K neighbours of every output location: [B, H, W] -> [B, H', W', K]."""
  out_hw = (_output_size(x.shape[1], stride), _output_size(x.shape[2], stride))
  padded = _pad(x, kernel_size, dilation, pad_value)
  return jnp.stack([_view(padded, o, out_hw, kernel_size, stride, dilation)
                    for o in _offsets(kernel_size)], axis=-1)


def _inv_norm(sq_norm: jax.Array) -> jax.Array:
  """1 / max(||x||, eps) from ||x||² (finite gradient at 0, like F.normalize)."""
  return jax.lax.rsqrt(jnp.maximum(sq_norm, _EPS * _EPS))


def _unview(x: jax.Array, offset, hw, stride, dilation) -> jax.Array:
  """Transpose of `_view` cropped to the image: [B, H', W', ...] -> [B, H, W, ...]."""
  config = [(0, 0, 0)]
  for a, size, out in ((offset[0], hw[0], x.shape[1]), (offset[1], hw[1], x.shape[2])):
    low = a * dilation  # where output row 0 reads from, in image coordinates
    config.append((low, size - low - stride * (out - 1) - 1, stride - 1))  # may crop (< 0)
  config += [(0, 0, 0)] * (x.ndim - 3)
  return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


def _partial_dots(x: jax.Array, y: jax.Array, groups: int) -> jax.Array:
  """Per-group dot products of [..., A] vectors, summed down to [..., G, w] partials.

  A sum of w-wide channel chunks rather than a reduce, so that XLA fuses it with the
  shifted key views into one elementwise loop instead of materialising each view.
  """
  per_group = x.shape[-1] // groups
  width = math.gcd(per_group, 8)
  width = width if width < per_group else per_group // 2
  chunk = lambda v, j: v[..., j * width:(j + 1) * width]
  per_chunk = per_group // width
  return jnp.stack([
      sum(chunk(x, j) * chunk(y, j) for j in range(g * per_chunk, (g + 1) * per_chunk))
      for g in range(groups)], axis=-2)


def _group_matrix(attn: int, groups: int, dtype) -> jax.Array:
  """One-hot [A, G]: which group each channel belongs to."""
  group_of = np.arange(attn) // (attn // groups)
  return jnp.asarray(group_of[:, None] == np.arange(groups), dtype)


def _group_sum(x: jax.Array, groups: int) -> jax.Array:
  return x.reshape(x.shape[:-1] + (groups, -1)).sum(axis=-1)  # [..., A] -> [..., G]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _neighbourhood(q: jax.Array, key: jax.Array, rel: jax.Array, window) -> tuple:
  """Per-group inner products the similarity is made of, for every offset o.

  q: strided queries [B, H', W', A]; key: keys [B, H, W, A]; rel: [K, A]; window: static
  (kernel_size, stride, dilation, groups, norm_emb). Returns (dots,) or, with norm_emb,
  (dots, neighbour_sq, q_sq): <q, key[p + o] + rel_o> and |key[p + o] + rel_o|², both
  [B, H', W', K, G], and |q|² [B, H', W', G]. Only the q·key products read the K shifted
  key views, as sums of channel chunks that XLA fuses into one loop per offset without
  copying the views; the hand-written VJP builds each gradient as one fused sum too.
  """
  kernel_size, stride, dilation, groups, norm_emb = window
  offsets = _offsets(kernel_size)
  in_group = _group_matrix(q.shape[-1], groups, q.dtype)  # [A, G]
  rel_by_group = (rel.T[:, :, None] * in_group[:, None, :]).reshape(q.shape[-1], -1)
  by_offset = lambda x: x.reshape(x.shape[:-1] + (len(offsets), groups))
  view = functools.partial(_view, out_hw=q.shape[1:3], kernel_size=kernel_size,
                           stride=stride, dilation=dilation)
  pad = functools.partial(_pad, kernel_size=kernel_size, dilation=dilation)
  padded = pad(key)  # [B, Hp, Wp, A]
  dots = jnp.stack([_partial_dots(q, view(padded, o), groups) for o in offsets],
                   axis=-3).sum(axis=-1) + by_offset(q @ rel_by_group)  # [B, H', W', K, G]
  if not norm_emb:
    return (dots,)
  key_sq = pad(_group_sum(key * key, groups))  # [B, Hp, Wp, G]
  key_rel = pad(by_offset(key @ rel_by_group))  # [B, Hp, Wp, K, G]
  neighbour_sq = jnp.stack(
      [view(key_sq, o) + 2 * view(key_rel[..., i, :], o) for i, o in enumerate(offsets)],
      axis=-2) + (rel * rel) @ in_group  # [B, H', W', K, G]
  return dots, neighbour_sq, _group_sum(q * q, groups)


def _neighbourhood_fwd(q, key, rel, window):
  return _neighbourhood(q, key, rel, window), (q, key, rel)


def _neighbourhood_bwd(window, residuals, cts):
  kernel_size, stride, dilation, groups, norm_emb = window
  q, key, rel = residuals
  offsets = _offsets(kernel_size)
  view = functools.partial(_view, out_hw=q.shape[1:3], kernel_size=kernel_size,
                           stride=stride, dilation=dilation)
  unview = functools.partial(_unview, hw=key.shape[1:3], stride=stride, dilation=dilation)
  ct_dot = cts[0]  # [B, H', W', K, G]
  if norm_emb:  # ct_key_sq: the neighbour_sq cotangent moved to the key pixels
    ct_q_sq = cts[2]  # [B, H', W', G]
    ct_key_sq = jnp.stack([unview(cts[1][..., i, :], o) for i, o in enumerate(offsets)],
                          axis=-2)  # [B, H, W, K, G]
  # Each gradient is a sum over offsets, built per half group of channels and then
  # concatenated: that keeps every sum one fused loop over q, key and the cotangents
  # (XLA CPU would otherwise hand a bare sum to a library kernel and copy its terms).
  half = q.shape[-1] // groups // 2
  d_q, d_key = [], []
  for part in range(2 * groups):
    chunk, g = slice(part * half, (part + 1) * half), part // 2
    q_part, key_part, rel_part = q[..., chunk], key[..., chunk], rel[:, chunk]
    padded = _pad(key_part, kernel_size, dilation)
    d_q_part = sum(ct_dot[..., i, g, None] * (view(padded, o) + rel_part[i])
                   for i, o in enumerate(offsets))
    d_key_part = sum(unview(ct_dot[..., i, g, None] * q_part, o)
                     for i, o in enumerate(offsets))
    if norm_emb:
      d_q_part += 2 * ct_q_sq[..., g, None] * q_part
      d_key_part += sum(2 * ct_key_sq[..., i, g, None] * (key_part + rel_part[i])
                        for i in range(len(offsets)))
    d_q.append(d_q_part)
    d_key.append(d_key_part)
  # d rel_o: the same terms summed over pixels, as [K * G, A] matmuls.
  attn, kg = q.shape[-1], len(offsets) * groups
  d_rel = ct_dot.reshape(-1, kg).T @ q.reshape(-1, attn)
  if norm_emb:  # rel_o also counts where the neighbour is outside the image
    ct_rel_sq = cts[1].reshape(-1, kg).sum(axis=0)[:, None]  # [K * G, 1]
    d_rel += 2 * (ct_key_sq.reshape(-1, kg).T @ key.reshape(-1, attn)
                  + ct_rel_sq * jnp.repeat(rel, groups, axis=0))
  in_group = _group_matrix(attn, groups, q.dtype)  # [A, G]
  d_rel = jnp.einsum("kga,ag->ka", d_rel.reshape(len(offsets), groups, attn), in_group)
  return jnp.concatenate(d_q, axis=-1), jnp.concatenate(d_key, axis=-1), d_rel


_neighbourhood.defvjp(_neighbourhood_fwd, _neighbourhood_bwd)


def relative_embedding(rel_h: jax.Array, rel_w: jax.Array) -> jax.Array:
  """rel(a, b) = concat(rel_h[:, a + r], rel_w[:, b + r]) for every offset: [K, A]."""
  half, k = rel_h.shape
  rows = jnp.broadcast_to(rel_h.T[:, None, :], (k, k, half))  # [k, k, A/2]
  cols = jnp.broadcast_to(rel_w.T[None, :, :], (k, k, half))  # [k, k, A/2]
  return jnp.concatenate([rows, cols], axis=-1).reshape(k * k, 2 * half)


def context_self_similarity(q: jax.Array, key: jax.Array, rel_h: jax.Array,
                            rel_w: jax.Array, *, kernel_size: int, stride: int = 1,
                            dilation: int = 1, groups: int = 1, norm_emb: bool = True,
                            sigmoid: bool = False) -> jax.Array:
  """Similarity of every location with its k×k neighbours (SPEC.md §1.2).

  Args:
    q: queries [B, H, W, A] at full resolution (only the strided grid is used).
    key: keys [B, H, W, A] at full resolution; zero outside the image.
    rel_h: row position embedding [A // 2, kernel_size], added to the first A/2 key
      channels.
    rel_w: column position embedding [A // 2, kernel_size], added to the last A/2.
    kernel_size: odd window size k.
    stride: output grid step s; the output has H' = ceil(H / s) rows.
    dilation: step d between window taps.
    groups: G channel groups; with `norm_emb` each group is L2-normalised separately,
      and the per-group dot products are summed.
    norm_emb: L2-normalise q and key + rel per group (eps 1e-12, as F.normalize).
    sigmoid: apply a sigmoid to the result.

  Returns:
    float32 (float64 for float64 inputs) similarities [B, H', W', k, k]; entry
    [b, i, j, a + r, b' + r] compares location (s·i, s·j) with (s·i + d·a, s·j + d·b').
    Reverse-mode differentiable (a custom VJP); forward-mode `jax.jvp` is not supported.
  """
  _check_window(kernel_size, stride, dilation)
  _check_similarity_inputs(q, key, rel_h, rel_w, kernel_size, groups)
  dtype = jnp.promote_types(q.dtype, jnp.float32)  # reductions at >= float32
  batch, height, width, attn = q.shape
  out_hw = (_output_size(height, stride), _output_size(width, stride))
  q = q[:, ::stride, ::stride].astype(dtype)  # [B, H', W', A]
  rel = relative_embedding(rel_h, rel_w).astype(dtype)  # [K, A]
  # Under shard_map the (replicated) position embedding must vary over the same mesh
  # axes as the queries, or the custom VJP's gradient types do not match; outside
  # shard_map (jit, pmap, vmap) the axis set is empty and this is a no-op.
  rel = jax.lax.pcast(rel, tuple(jax.typeof(q).manual_axis_type.varying), to="varying")
  window = (kernel_size, stride, dilation, groups, norm_emb)
  terms = _neighbourhood(q, key.astype(dtype), rel, window)
  sim = terms[0]  # <q, key + rel> per offset and group: [B, H', W', K, G]
  if norm_emb:
    _, neighbour_sq, q_sq = terms
    sim = sim * _inv_norm(q_sq)[..., None, :] * _inv_norm(neighbour_sq)
  sim = jnp.sum(sim, axis=-1).reshape(batch, *out_hw, kernel_size, kernel_size)
  return jax.nn.sigmoid(sim) if sigmoid else sim


def cscl_labels(labels: jax.Array, *, kernel_size: int, stride: int = 1,
                dilation: int = 1) -> jax.Array:
  """Pair labels: 1 where a location and its neighbour hold the same class (SPEC §1.3).

  Args:
    labels: integer class map [B, H, W].
    kernel_size: odd window size k.
    stride: output grid step s.
    dilation: step d between window taps.

  Returns:
    float32 [B, H', W', k, k]: target[b, i, j, a + r, b' + r] = 1.0 iff
    labels[b, s·i + d·a, s·j + d·b'] == labels[b, s·i, s·j]. Neighbours outside the
    image count as a different class; the centre entry is always 1.
  """
  _check_window(kernel_size, stride, dilation, labels=labels)
  window = functools.partial(_windows, kernel_size=kernel_size, stride=stride,
                             dilation=dilation)
  centre = labels[:, ::stride, ::stride, None]  # [B, H', W', 1]
  inside = window(jnp.ones(labels.shape, bool), pad_value=False)  # [B, H', W', K]
  same = (window(labels, pad_value=0) == centre) & inside
  return same.astype(jnp.float32).reshape(centre.shape[:3] + (kernel_size, kernel_size))


def cscl_mask(valid: jax.Array, *, kernel_size: int, stride: int = 1, dilation: int = 1,
              exclude_center: bool = True) -> jax.Array:
  """Which (location, neighbour) pairs count in the loss (SPEC §1.3, optional).

  Args:
    valid: bool [B, H, W], True where the label is known.
    kernel_size: odd window size k.
    stride: output grid step s.
    dilation: step d between window taps.
    exclude_center: drop the (always same-class) centre pair.

  Returns:
    bool [B, H', W', k, k]: True where both pixels are valid and the neighbour lies
    inside the image (and is not the centre, with `exclude_center`).
  """
  _check_window(kernel_size, stride, dilation, valid=valid)
  valid = valid.astype(bool)
  neighbours = _windows(valid, kernel_size, stride, dilation, pad_value=False)
  mask = neighbours & valid[:, ::stride, ::stride, None]  # [B, H', W', K]
  if exclude_center:
    mask = mask.at[..., kernel_size * kernel_size // 2].set(False)
  return mask.reshape(mask.shape[:3] + (kernel_size, kernel_size))


def _masked_mean(loss: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """Mean over ALL entries, masked-out entries counting as zero (as the reference)."""
  if mask is not None:
    loss = loss * mask.astype(loss.dtype)
  return jnp.mean(loss)


def contrastive_loss(sim: jax.Array, target: jax.Array, mask: Optional[jax.Array] = None,
                     *, pos_weight: float = 0.125) -> jax.Array:
  """The reference CSCL loss (SPEC §1.4): pull same-class pairs up, push others down.

  L = mean over all entries of mask · [-pos_weight · t · sim + (1 - t) · sim]; the mean
  runs over every entry (masked-out ones count as zero, they do not shrink the divisor).

  Args:
    sim: similarities, any shape (e.g. [B, H', W', k, k]).
    target: pair labels of the same shape, 1.0 = same class.
    mask: optional bool or float weights of the same shape.
    pos_weight: w, the weight of the same-class term.

  Returns:
    Scalar loss.
  """
  loss = (1.0 - target) * sim - pos_weight * target * sim
  return _masked_mean(loss, mask)


def binary_contrastive_loss(sim: jax.Array, target: jax.Array,
                            mask: Optional[jax.Array] = None, *,
                            pos_weight: float = 0.125) -> jax.Array:
  """Binary cross-entropy with sigmoid(sim) as P(same class) (SPEC §1.4 variant).

  L = mean over all entries of mask · -[pos_weight · t · log σ(sim) +
  (1 - t) · log(1 - σ(sim))], with log σ(x) and log(1 - σ(x)) = log σ(-x) computed by
  `jax.nn.log_sigmoid` (stable for large |sim|). Same mean convention as
  `contrastive_loss`. Pass raw similarities (a head built with `sigmoid=False`).

  Args:
    sim: similarities (logits), any shape.
    target: pair labels of the same shape, 1.0 = same class.
    mask: optional bool or float weights of the same shape.
    pos_weight: weight of the same-class term.

  Returns:
    Scalar loss.
  """
  loss = -(pos_weight * target * jax.nn.log_sigmoid(sim)
           + (1.0 - target) * jax.nn.log_sigmoid(-sim))
  return _masked_mean(loss, mask)


class ContextSelfSimilarity(nn.Module):
  """CSCL head: 1x1 query/key projections + `context_self_similarity`.

  Parameters: query/kernel and key/kernel [C, A] (bias-free), rel_h and rel_w
  [A // 2, k] (normal, std 1): 33,152 for C = A = 128, k = 3. `dtype` is the dtype
  of the projections (e.g. bfloat16); normalisation and reductions run in float32.

  Attributes:
    attn_channels: A.
    kernel_size: odd window size k.
    stride: output grid step s.
    dilation: step d between window taps.
    groups: channel groups G.
    norm_emb: L2-normalise queries and keys per group.
    sigmoid: apply a sigmoid to the similarities.
    dtype: computation dtype of the projections.
  """
  attn_channels: int
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  groups: int = 1
  norm_emb: bool = True
  sigmoid: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, emb: jax.Array) -> jax.Array:
    """Maps embeddings [B, H, W, C] to similarities [B, H', W', k, k] (float32)."""
    project = functools.partial(nn.Dense, self.attn_channels, use_bias=False,
                                dtype=self.dtype)
    q = project(name="query")(emb)  # [B, H, W, A]
    key = project(name="key")(emb)  # [B, H, W, A]
    rel_shape = (self.attn_channels // 2, self.kernel_size)
    rel_h = self.param("rel_h", nn.initializers.normal(1.0), rel_shape)
    rel_w = self.param("rel_w", nn.initializers.normal(1.0), rel_shape)
    return context_self_similarity(
        q, key, rel_h, rel_w, kernel_size=self.kernel_size, stride=self.stride,
        dilation=self.dilation, groups=self.groups, norm_emb=self.norm_emb,
        sigmoid=self.sigmoid)
