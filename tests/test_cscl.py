"""Tests of cscl_jax/cscl.py against slow, obviously-correct numpy loops (SPEC.md §1)."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jax_core
from jax.test_util import check_grads

from cscl_jax import cscl

WINDOWS = list(itertools.product((3, 5), (1, 2, 3), (1, 2)))  # (k, stride, dilation)
# Tiny arrays: compilation dominates, so skip XLA's backend optimisations (half the time).
quick_jit = functools.partial(jax.jit,
                              compiler_options={"xla_backend_optimization_level": 0})


# ----------------------------------------------------------------------------------------
# Numpy references: one loop per index, straight from SPEC.md §1.2-1.4.


def np_similarity(q, key, rel_h, rel_w, k, stride, dilation, groups, norm_emb,
                  sigmoid=False):
  batch, height, width, attn = q.shape
  r = k // 2
  out_h, out_w = math.ceil(height / stride), math.ceil(width / stride)
  normalise = lambda v: v / max(np.linalg.norm(v), 1e-12)
  sim = np.zeros((batch, out_h, out_w, k, k))
  for b in range(batch):
    for i in range(out_h):
      for j in range(out_w):
        y, x = stride * i, stride * j
        for a in range(-r, r + 1):
          for c in range(-r, r + 1):
            ny, nx = y + dilation * a, x + dilation * c
            inside = 0 <= ny < height and 0 <= nx < width
            neighbour = key[b, ny, nx] if inside else np.zeros(attn)
            neighbour = neighbour + np.concatenate([rel_h[:, a + r], rel_w[:, c + r]])
            total = 0.0
            for g in range(groups):
              part = slice(g * attn // groups, (g + 1) * attn // groups)
              qg, ng = q[b, y, x, part], neighbour[part]
              if norm_emb:
                qg, ng = normalise(qg), normalise(ng)
              total += np.dot(qg, ng)
            sim[b, i, j, a + r, c + r] = total
  return 1 / (1 + np.exp(-sim)) if sigmoid else sim


def np_pairs(labels, valid, k, stride, dilation):
  """Returns (target, mask without centre, mask with centre) as numpy loops."""
  batch, height, width = labels.shape
  r = k // 2
  shape = (batch, math.ceil(height / stride), math.ceil(width / stride), k, k)
  target, mask, mask_centre = np.zeros(shape), np.zeros(shape, bool), np.zeros(shape, bool)
  for b, i, j, a, c in itertools.product(*map(range, shape)):
    y, x = stride * i, stride * j
    ny, nx = y + dilation * (a - r), x + dilation * (c - r)
    inside = 0 <= ny < height and 0 <= nx < width
    target[b, i, j, a, c] = inside and labels[b, ny, nx] == labels[b, y, x]
    both = inside and valid[b, y, x] and valid[b, ny, nx]
    mask_centre[b, i, j, a, c] = both
    mask[b, i, j, a, c] = both and (a, c) != (r, r)
  return target, mask, mask_centre


def random_inputs(seed, shape=(2, 7, 9, 8), k=3, dtype=np.float32):
  rng = np.random.default_rng(seed)
  q, key = (rng.normal(size=shape).astype(dtype) for _ in range(2))
  rel_h, rel_w = (rng.normal(size=(shape[-1] // 2, k)).astype(dtype) for _ in range(2))
  return q, key, rel_h, rel_w


# ----------------------------------------------------------------------------------------
# Similarity.


@pytest.mark.parametrize("k,stride,dilation", WINDOWS)
def test_similarity_matches_numpy_loops(k, stride, dilation):
  args = random_inputs(k * 100 + stride * 10 + dilation, k=k)
  variants = list(itertools.product((1, 2), (True, False)))  # (groups, norm_emb)
  window = dict(kernel_size=k, stride=stride, dilation=dilation)
  # One compilation per window: jit is much faster than eager for the offset loop.
  all_variants = quick_jit(lambda *a: [cscl.context_self_similarity(
      *a, groups=g, norm_emb=n, **window) for g, n in variants])
  for (groups, norm_emb), got in zip(variants, all_variants(*args)):
    want = np_similarity(*args, k, stride, dilation, groups, norm_emb)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4,
                               err_msg=f"groups={groups} norm_emb={norm_emb}")


def test_similarity_sigmoid_and_zero_neighbour():
  q, key, rel_h, rel_w = random_inputs(1)
  fn = quick_jit(cscl.context_self_similarity, static_argnames=("kernel_size", "sigmoid"))
  got = fn(q, key, rel_h, rel_w, kernel_size=3, sigmoid=True)
  want = np_similarity(q, key, rel_h, rel_w, 3, 1, 1, 1, True, sigmoid=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Zero rel: out-of-image neighbours are zero vectors, normalised to zero (not NaN).
  zero = np.zeros_like(rel_h)
  got, grads = quick_jit(jax.value_and_grad(lambda k_: cscl.context_self_similarity(
      q, k_, zero, zero, kernel_size=3).sum()))(key)
  np.testing.assert_allclose(got, np_similarity(q, key, zero, zero, 3, 1, 1, 1, True).sum(),
                             rtol=1e-5)
  assert np.isfinite(grads).all()


@pytest.mark.parametrize("norm_emb,groups,stride", [(True, 1, 1), (True, 2, 2),
                                                     (False, 1, 2)])
def test_similarity_gradients(norm_emb, groups, stride):
  with jax.enable_x64(True):
    args = random_inputs(3, shape=(1, 5, 4, 4), dtype=np.float64)
    fn = jax.jit(functools.partial(
        cscl.context_self_similarity, kernel_size=3, stride=stride, dilation=2,
        groups=groups, norm_emb=norm_emb))
    check_grads(fn, args, order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


def test_bfloat16_projections_reduce_in_float32():
  emb = jax.random.normal(jax.random.key(0), (1, 6, 6, 16))
  head = functools.partial(cscl.ContextSelfSimilarity, attn_channels=16, kernel_size=3)
  variables = quick_jit(head().init)(jax.random.key(1), emb)
  full = quick_jit(head().apply)(variables, emb)
  half = quick_jit(head(dtype=jnp.bfloat16).apply)(variables, emb)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, full, atol=3e-2)


def test_param_count():
  head = cscl.ContextSelfSimilarity(attn_channels=128, kernel_size=3)
  variables = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((1, 8, 8, 128)))
  params = variables["params"]
  assert set(params) == {"query", "key", "rel_h", "rel_w"}
  assert params["rel_h"].shape == (64, 3)
  assert sum(x.size for x in jax.tree.leaves(params)) == 33_152


# ----------------------------------------------------------------------------------------
# Labels, masks and losses.


@pytest.mark.parametrize("k,stride,dilation", WINDOWS)
def test_labels_and_mask_match_numpy_loops(k, stride, dilation):
  rng = np.random.default_rng(k + stride + dilation)
  labels = rng.integers(0, 3, size=(2, 7, 9)).astype(np.int32)
  valid = rng.random((2, 7, 9)) < 0.7
  target, mask, mask_centre = np_pairs(labels, valid, k, stride, dilation)
  window = dict(kernel_size=k, stride=stride, dilation=dilation)
  got = cscl.cscl_labels(labels, **window)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, target)
  np.testing.assert_array_equal(got[..., k // 2, k // 2], 1.0)
  np.testing.assert_array_equal(cscl.cscl_mask(valid, **window), mask)
  np.testing.assert_array_equal(
      cscl.cscl_mask(valid, **window, exclude_center=False), mask_centre)


def test_losses_match_numpy_formulas():
  rng = np.random.default_rng(0)
  sim = rng.normal(size=(2, 3, 4, 3, 3)).astype(np.float32) * 3
  target = (rng.random(sim.shape) < 0.4).astype(np.float32)
  mask = rng.random(sim.shape) < 0.5
  w = 0.3
  contrastive = -w * target * sim + (1 - target) * sim
  p = 1 / (1 + np.exp(-sim.astype(np.float64)))
  bce = -(w * target * np.log(p) + (1 - target) * np.log(1 - p))
  for m in (None, mask):
    scale = 1.0 if m is None else m
    np.testing.assert_allclose(cscl.contrastive_loss(sim, target, m, pos_weight=w),
                               np.mean(scale * contrastive), rtol=1e-5)
    np.testing.assert_allclose(cscl.binary_contrastive_loss(sim, target, m, pos_weight=w),
                               np.mean(scale * bce), rtol=1e-5)
  # The default weight is the paper's w = 0.125 (SPEC.md §1.4), checked on the formula.
  np.testing.assert_allclose(cscl.contrastive_loss(sim, target),
                             np.mean(-0.125 * target * sim + (1 - target) * sim), rtol=1e-5)


def test_binary_loss_is_stable_for_large_similarities():
  sim = np.array([-200.0, -50.0, 50.0, 200.0], np.float32)
  target = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
  got = cscl.binary_contrastive_loss(sim, target, pos_weight=0.5)
  # -log sigmoid(x) = logaddexp(0, -x), -log(1 - sigmoid(x)) = logaddexp(0, x).
  want = np.mean(0.5 * target * np.logaddexp(0, -sim)
                 + (1 - target) * np.logaddexp(0, sim))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.isfinite(jax.grad(cscl.binary_contrastive_loss)(sim, target)).all()


# ----------------------------------------------------------------------------------------
# Memory, transformations, errors.


def _sub_jaxprs(value):
  if isinstance(value, jax_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def largest_intermediate(jaxpr) -> int:
  """Largest variable size anywhere in a jaxpr, nested jaxprs included."""
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      largest = max(largest, math.prod(getattr(var.aval, "shape", ())))
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        largest = max(largest, largest_intermediate(sub))
  return largest


@pytest.mark.parametrize("k,stride,groups,norm_emb", [(3, 1, 1, True), (5, 1, 2, True),
                                                      (3, 2, 1, True), (3, 1, 1, False)])
def test_no_intermediate_of_size_bhwak2(k, stride, groups, norm_emb):
  batch, height, width, attn = 2, 12, 12, 16
  args = random_inputs(0, shape=(batch, height, width, attn), k=k)
  labels = jnp.zeros((batch, height, width), jnp.int32)
  window = dict(kernel_size=k, stride=stride)

  def loss(q, key, rel_h, rel_w):
    sim = cscl.context_self_similarity(q, key, rel_h, rel_w, groups=groups,
                                       norm_emb=norm_emb, **window)
    return cscl.contrastive_loss(sim, cscl.cscl_labels(labels, **window))

  limit = batch * math.ceil(height / stride) ** 2 * attn * k * k
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  assert largest_intermediate(jax.make_jaxpr(grad)(*args).jaxpr) < limit

  # The walker does see a naive unfolded key tensor inside jit.
  unfold = jax.jit(lambda key: jnp.stack([key] * k * k, -1).sum())
  assert largest_intermediate(jax.make_jaxpr(unfold)(args[1]).jaxpr) >= limit


def test_vmap_matches_loop():
  q, key, rel_h, rel_w = random_inputs(5, shape=(3, 2, 5, 6, 8))
  fn = functools.partial(cscl.context_self_similarity, kernel_size=3, stride=2)
  got = quick_jit(jax.vmap(fn, in_axes=(0, 0, None, None)))(q, key, rel_h, rel_w)
  fn = quick_jit(fn)
  for n in range(3):
    np.testing.assert_allclose(got[n], fn(q[n], key[n], rel_h, rel_w), rtol=1e-5,
                               atol=1e-6)


def test_pmap_matches_single_device():
  devices = jax.local_device_count()
  assert devices == 8, "conftest.py should force 8 simulated CPU devices"
  head = cscl.ContextSelfSimilarity(attn_channels=8, kernel_size=3)
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(devices * 2, 6, 6, 4)).astype(np.float32)
  labels = rng.integers(0, 3, size=(devices * 2, 6, 6)).astype(np.int32)
  params = head.init(jax.random.key(0), emb[:1])["params"]

  def loss_fn(params, emb, labels):
    sim = head.apply({"params": params}, emb)
    return cscl.contrastive_loss(sim, cscl.cscl_labels(labels, kernel_size=3))

  def per_device(params, emb, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, emb, labels)
    return lax.pmean((loss, grads), axis_name="batch")

  shard = lambda x: x.reshape((devices, -1) + x.shape[1:])
  loss, grads = jax.pmap(per_device, axis_name="batch", in_axes=(None, 0, 0))(
      params, shard(emb), shard(labels))
  want_loss, want_grads = quick_jit(jax.value_and_grad(loss_fn))(params, emb, labels)
  np.testing.assert_allclose(loss, np.full(devices, want_loss), rtol=1e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g[0], w, rtol=1e-4, atol=1e-6),
               grads, want_grads)


@pytest.mark.parametrize("kwargs,shapes,match", [
    (dict(kernel_size=4), {}, "kernel_size must be a positive odd int.*got 4"),
    (dict(kernel_size=0), {}, "kernel_size must be a positive odd int.*got 0"),
    (dict(kernel_size=3, stride=0), {}, "stride must be an int >= 1, got 0"),
    (dict(kernel_size=3, dilation=-1), {}, "dilation must be an int >= 1, got -1"),
    (dict(kernel_size=3, groups=3), {}, "A = 8 must be divisible by 2 \\* groups"),
    (dict(kernel_size=3), {"rel_h": (4, 5)}, "rel_h and rel_w must have shape.*\\(4, 3\\)"),
    (dict(kernel_size=3), {"key": (2, 7, 8, 8)}, "q and key must both be"),
])
def test_invalid_arguments_raise(kwargs, shapes, match):
  q, key, rel_h, rel_w = random_inputs(0)
  arrays = dict(q=q, key=key, rel_h=rel_h, rel_w=rel_w)
  arrays.update({name: np.zeros(shape, np.float32) for name, shape in shapes.items()})
  with pytest.raises(ValueError, match=match):
    cscl.context_self_similarity(**arrays, **kwargs)
  if not shapes and "groups" not in kwargs:
    with pytest.raises(ValueError, match=match):
      cscl.cscl_labels(np.zeros((1, 4, 4), np.int32), **kwargs)
    with pytest.raises(ValueError, match=match):
      cscl.cscl_mask(np.ones((1, 4, 4), bool), **kwargs)
