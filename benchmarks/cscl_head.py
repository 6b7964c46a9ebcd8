"""Speed and memory of the CSCL head: ours vs a naive unfold vs the projections alone.

Measures forward + backward (gradients w.r.t. the embedding and all head parameters) of
  ours:   1x1 projections + `cscl.context_self_similarity` + `cscl.contrastive_loss`;
  naive:  the same maths with the keys unfolded into [B, H, W, A, K] (as the reference
          PyTorch code does);
  floor:  the two 1x1 projections alone (a random linear read-out as the loss).
Memory is XLA's compiled memory_analysis(): temp + argument + output bytes of the
jitted step, an upper bound of its peak. Everything in one run, so ratios are fair.

  python -m benchmarks.cscl_head --batch_sizes=8,32 --size=48 --channels=128
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import measure
from cscl_jax import cscl


def naive_similarity(q, key, rel_h, rel_w, kernel_size):
  """Reference-style head (stride = dilation = 1, G = 1, norm_emb): unfolds the keys."""
  r = kernel_size // 2
  height, width = q.shape[1:3]
  padded = jnp.pad(key, ((0, 0), (r, r), (r, r), (0, 0)))
  unfolded = jnp.stack([padded[:, a:a + height, b:b + width]
                        for a in range(kernel_size) for b in range(kernel_size)],
                       axis=-1)  # [B, H, W, A, K]
  unfolded = unfolded + cscl.relative_embedding(rel_h, rel_w).T  # [A, K] broadcast
  unfolded = unfolded / jnp.maximum(
      jnp.linalg.norm(unfolded, axis=-2, keepdims=True), 1e-12)
  q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
  sim = jnp.einsum("bhwa,bhwak->bhwk", q, unfolded)
  return sim.reshape(sim.shape[:3] + (kernel_size, kernel_size))


def head_loss(params, emb, target, *, similarity, kernel_size):
  q, key = emb @ params["query"], emb @ params["key"]  # [B, H, W, A]
  sim = similarity(q, key, params["rel_h"], params["rel_w"], kernel_size=kernel_size)
  return cscl.contrastive_loss(sim, target)


def projection_loss(params, emb, target, *, readout):
  del target
  q, key = emb @ params["query"], emb @ params["key"]  # [B, H, W, A]
  return jnp.vdot(q, readout[0]) + jnp.vdot(key, readout[1])


def compile_step(loss_fn, args):
  """Returns (jit(value_and_grad(loss_fn)) compiled for args, its memory in bytes)."""
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))).lower(*args).compile()
  return step, measure.compiled_bytes(step)


def run(batch, size, channels, kernel_size, repeats):
  """Measures the three variants at one batch size; returns table rows."""
  keys = jax.random.split(jax.random.key(batch), 6)
  emb = jax.random.normal(keys[0], (batch, size, size, channels))
  labels = jax.random.randint(keys[1], (batch, size, size), 0, 4)
  target = cscl.cscl_labels(labels, kernel_size=kernel_size)
  params = {
      "query": jax.random.normal(keys[2], (channels, channels)) / np.sqrt(channels),
      "key": jax.random.normal(keys[3], (channels, channels)) / np.sqrt(channels),
      "rel_h": jax.random.normal(keys[4], (channels // 2, kernel_size)),
      "rel_w": jax.random.normal(keys[5], (channels // 2, kernel_size)),
  }
  readout = jax.random.normal(keys[0], (2, batch, size, size, channels))
  variants = {
      "ours": functools.partial(head_loss, similarity=cscl.context_self_similarity,
                                kernel_size=kernel_size),
      "naive unfold": functools.partial(head_loss, similarity=naive_similarity,
                                        kernel_size=kernel_size),
      "projections only": functools.partial(projection_loss, readout=readout),
  }
  ours, naive = (jax.jit(variants[name])(params, emb, target) for name in
                 ("ours", "naive unfold"))
  np.testing.assert_allclose(ours, naive, rtol=1e-4, atol=1e-5)  # same maths
  args = (params, emb, target)
  compiled = {name: compile_step(fn, args) for name, fn in variants.items()}
  times = measure.median_times({name: step for name, (step, _) in compiled.items()}, args,
                       repeats)
  memory = {name: m for name, (_, m) in compiled.items()}
  return [(batch, name, 1e3 * times[name], times[name] / times["ours"],
           memory[name] / 2**20, memory[name] / memory["ours"]) for name in variants]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_sizes", default="8,32")
  parser.add_argument("--size", type=int, default=48, help="H = W")
  parser.add_argument("--channels", type=int, default=128, help="C = A")
  parser.add_argument("--kernel_size", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  rows = []
  for batch in map(int, args.batch_sizes.split(",")):
    rows += run(batch, args.size, args.channels, args.kernel_size, args.repeats)
  print(f"CSCL head fwd+bwd, C = A = {args.channels}, {args.size}x{args.size}, "
        f"k = {args.kernel_size}, median of {args.repeats} (variants take turns), "
        f"{jax.devices()[0].platform}; "
        "memory = temp + argument + output bytes (XLA memory_analysis)")
  print("| B | variant | time ms | time / ours | memory MiB | memory / ours |")
  print("| --- | --- | --- | --- | --- | --- |")
  for batch, name, ms, time_ratio, mib, memory_ratio in rows:
    print(f"| {batch} | {name} | {ms:.1f} | {time_ratio:.2f} | {mib:.1f} | "
          f"{memory_ratio:.2f} |")


if __name__ == "__main__":
  main()
