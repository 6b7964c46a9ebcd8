"""What the CSCL loss sees: the kinds of pairs in its targets, without and with the mask.

Draws --batches training batches exactly as pre-training does (the config's dataset, crops
and flips), builds the pair targets of its window (cscl.cscl_labels) and the mask that
config.cscl.use_mask would apply (cscl.cscl_mask over the known pixels), and prints the
share of each kind of (location, neighbour) entry: the centre, same class, different class,
a pair with an unknown / background pixel (split by its target), out of the image; and
which kinds the mask keeps.

The contrastive loss is mean[(1 - t) sim - w t sim] over every entry: only the entries with
t = 0 push embeddings apart. A constant embedding (sim = 1 on every pair) loses to a perfect
one (sim = +1 / -1 on same / different) by 2 x the share of different-class entries the
loss counts, so where the mask leaves few of them, collapse costs little.

  python -m benchmarks.cscl_pairs --config=configs/pretrain.py:quick \
      --config.dataset.config=default --batches=50
"""

from absl import app
from absl import flags
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from cscl_jax import cscl
from cscl_jax import input_pipeline
from cscl_jax import steps

FLAGS = flags.FLAGS


def pair_kinds(labels: np.ndarray, known: np.ndarray, *, kernel_size: int, stride: int,
               dilation: int) -> dict[str, np.ndarray]:
  """Boolean maps [B, H', W', k, k] of the kinds of entries, each entry in exactly one.

  Args:
    labels: class map [B, H, W].
    known: bool [B, H, W], True where the label is a known class.
    kernel_size, stride, dilation: the CSCL window.
  """
  window = dict(kernel_size=kernel_size, stride=stride, dilation=dilation)
  target = np.asarray(cscl.cscl_labels(jnp.asarray(labels), **window)) > 0.5
  inside = np.asarray(cscl.cscl_mask(jnp.ones(labels.shape, bool), exclude_center=False,
                                     **window))  # [B, H', W', k, k]
  both_known = np.asarray(cscl.cscl_mask(jnp.asarray(known), exclude_center=False, **window))
  centre = np.zeros(target.shape, bool)
  centre[..., kernel_size // 2, kernel_size // 2] = True
  rest = inside & ~centre
  return {"centre": centre,
          "same class": rest & both_known & target,
          "different class": rest & both_known & ~target,
          "unknown pixel, same label": rest & ~both_known & target,
          "unknown pixel, different label": rest & ~both_known & ~target,
          "out of the image": ~inside}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  tf.config.set_visible_devices([], "GPU")
  config, m = FLAGS.config, FLAGS.config.model
  info = input_pipeline.dataset_info(config)
  batches = input_pipeline.create_split(config, config.dataset.train_split, train=True,
                                        info=info)
  window = dict(kernel_size=m.kernel_size, stride=m.stride, dilation=m.dilation)
  counts, masked = {}, {}
  for _ in range(FLAGS.batches):
    batch = next(batches)
    labels = batch["labels"].reshape((-1,) + batch["labels"].shape[2:])  # [B, H, W]
    valid = batch["valid"].reshape(labels.shape)
    known = np.asarray(steps.known_pixels({"labels": labels, "valid": valid},
                                          m.num_classes))
    mask = np.asarray(cscl.cscl_mask(jnp.asarray(known), **window))  # [B, H', W', k, k]
    for kind, where in pair_kinds(labels, known, **window).items():
      counts[kind] = counts.get(kind, 0) + int(where.sum())
      masked[kind] = masked.get(kind, 0) + int((where & mask).sum())
  total, kept = sum(counts.values()), sum(masked.values())
  lines = [f"{config.dataset.name}/{config.dataset.config}, {FLAGS.batches} training batches "
           f"of {config.batch_size} crops of {config.dataset.img_res}, window "
           f"k={m.kernel_size} s={m.stride} d={m.dilation}: share of entries\n",
           "| kind | target | no mask (reference) | kept by the mask | share of the kept |",
           "| --- | ---: | ---: | ---: | ---: |"]
  for kind in counts:
    target = "0" if kind in ("different class", "unknown pixel, different label",
                             "out of the image") else "1"
    lines.append(f"| {kind} | {target} | {counts[kind] / total:.4f} | "
                 f"{masked[kind] / total:.4f} | {masked[kind] / max(kept, 1):.4f} |")
  lines.append(f"| all | | 1.0000 | {kept / total:.4f} | 1.0000 |")
  print("\n".join(lines))


if __name__ == "__main__":
  # Defined here, not on import: the tests import pair_kinds beside other benchmarks that
  # define --config too.
  flags.DEFINE_integer("batches", 50, "Training batches to count over.")
  config_flags.DEFINE_config_file("config", "configs/pretrain.py:quick",
                                  "Pre-training config (configs/*.py[:variant]).",
                                  lock_config=True)
  app.run(main)
