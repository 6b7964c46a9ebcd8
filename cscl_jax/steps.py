"""The per-step pure functions of training and evaluation.

`create_train_state` builds the state; `train_step` and `eval_step` run on one device's
share of the global batch, with an `axis_name`, under `jax.pmap` or `jax.shard_map` alike:
gradients and BatchNorm statistics are averaged over the axis, losses are the global-batch
losses. `compute_loss` is the stage's loss (SPEC.md §1 for pre-training, cross-entropy over
known pixels otherwise). `cscl_jax.train` runs them in the loop; tests call them directly.
"""

import functools
from typing import Any

from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import optax

from cscl_jax import cscl
from cscl_jax import metrics

AXIS = "batch"  # The device axis of pmap, BatchNorm and the collectives.
CSCL_LOSSES = {"contrastive": cscl.contrastive_loss, "bce": cscl.binary_contrastive_loss}


class TrainState(train_state.TrainState):
  batch_stats: Any


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """config.learning_rate decayed x config.lr_decay after every epoch (staircase)."""
  return optax.exponential_decay(config.learning_rate, transition_steps=steps_per_epoch,
                                 decay_rate=config.lr_decay, staircase=True)


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict, model: Any,
                       learning_rate_fn: optax.Schedule) -> TrainState:
  """Initialises the model variables and an Adam optimizer.

  With config.freeze_encoder the optimizer leaves the "encoder" params unchanged
  (optax.set_to_zero) and trains the rest (the head).
  """
  m = config.model
  x = jnp.zeros((1, m.max_seq_len, m.img_res, m.img_res, m.num_channels))
  variables = jax.jit(functools.partial(model.init, train=False))(rng, x)
  tx = optax.adam(learning_rate_fn)
  if config.freeze_encoder:  # Linear probe: the "encoder" subtree gets zero updates.
    if "head" not in variables["params"]:
      raise ValueError(f"config.freeze_encoder with model.name={m.name!r} and stage "
                       f"{m.stage!r} leaves nothing to train (no head): probe an encoder "
                       "that has a classifier head (unet3df, unet2d_convlstm, biconvgru).")
    labels = {k: "frozen" if k == "encoder" else "train" for k in variables["params"]}
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats", {}))


def known_pixels(batch: dict[str, jax.Array], num_classes: int) -> jax.Array:
  """Valid pixels of a known class in real examples ("example_mask" marks padding): [b, H, W]."""
  known = batch["valid"] & (batch["labels"] < num_classes)
  if "example_mask" in batch:
    known &= batch["example_mask"][:, None, None]
  return known


def compute_loss(outputs: jax.Array, batch: dict[str, jax.Array],
                 config: ml_collections.ConfigDict,
                 axis_name: str) -> tuple[jax.Array, dict[str, jax.Array]]:
  """This device's loss and the sums behind its metrics.

  Args:
    outputs: similarity map [b, H', W', k, k] (pretrain) or logits [b, H, W, N].
    batch: this device's "labels" [b, H, W] and "valid" [b, H, W], and for evaluation
      "example_mask" [b] (False for padding, which then counts nowhere).
    config: the run's config.
    axis_name: the device axis.

  Returns:
    (loss, sums): `lax.pmean(loss, axis_name)` is the loss of the global batch, so the
    mean of the per-device gradients is its gradient; `sums` add up over devices and
    batches, and "loss_sum" / "loss_count" of the sums is the exact mean loss.
  """
  m, num_classes = config.model, config.model.num_classes
  known = known_pixels(batch, num_classes)  # [b, H, W]
  if m.stage == "pretrain":
    window = dict(kernel_size=m.kernel_size, stride=m.stride, dilation=m.dilation)
    target = cscl.cscl_labels(batch["labels"], **window)  # [b, H', W', k, k]
    mask = cscl.cscl_mask(known, **window) if config.cscl.use_mask else None
    count = jnp.asarray(target.size, jnp.float32)
    if "example_mask" in batch:  # evaluation: pairs of padding examples count nowhere
      pairs = jnp.broadcast_to(
          batch["example_mask"].reshape((-1,) + (1,) * (target.ndim - 1)), target.shape)
      mask = pairs if mask is None else mask & pairs
      count = jnp.sum(pairs, dtype=jnp.float32)
    # The loss is a mean over all b * H' * W' * K entries, masked ones counting as zeros.
    loss = CSCL_LOSSES[config.cscl.loss](outputs, target, mask,
                                         pos_weight=config.cscl.pos_weight)
    sums = {"loss_sum": loss * target.size, "loss_count": count}
    return loss, {**sums, **metrics.similarity_sums(outputs, target, mask)}
  logits = outputs.astype(jnp.float32)
  labels = jnp.where(known, batch["labels"], 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [b, H, W]
  sums = {"loss_sum": jnp.sum(ce * known), "loss_count": jnp.sum(known, dtype=jnp.float32)}
  # Mean over the known pixels of ALL devices: this device's share, times the device count.
  total = jnp.maximum(lax.psum(sums["loss_count"], axis_name), 1.0)
  return sums["loss_sum"] / total * lax.psum(1, axis_name), sums


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               config: ml_collections.ConfigDict,
               axis_name: str) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on this device's share of the global batch.

  Args:
    state: the replicated train state.
    batch: "inputs" [b, T, H, W, C], "labels" [b, H, W], "valid" [b, H, W].
    config: the run's config.
    axis_name: the device axis to average gradients and statistics over.

  Returns:
    The new state and the step's metrics ("loss", "grad_norm" and sums; identical on
    every device).
  """
  # Dropout (U-TAE's L-TAE): a different mask on every step and device.
  dropout_rng = jax.random.fold_in(jax.random.fold_in(
      jax.random.key(config.seed), state.step), lax.axis_index(axis_name))

  def loss_fn(params):
    # A frozen encoder runs in inference mode: BatchNorm normalises with its running
    # statistics and leaves them unchanged, without dropout (the heads have neither). Its
    # params are constants here, so only the head's backward pass runs.
    if config.freeze_encoder:
      params = {**params, "encoder": lax.stop_gradient(params["encoder"])}
    outputs, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["inputs"],
        train=not config.freeze_encoder, mutable=["batch_stats"],
        rngs={"dropout": dropout_rng})
    loss, sums = compute_loss(outputs, batch, config, axis_name)
    # The global loss. Under shard_map its gradient w.r.t. the replicated params is
    # already the global gradient (the pmean below leaves it as is); under pmap each
    # device gets its own share, which the pmean averages.
    return lax.pmean(loss, axis_name), (updates["batch_stats"], sums)

  (loss, (batch_stats, sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  grads = lax.pmean(grads, axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=lax.pmean(batch_stats, axis_name))
  step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  return state, {**step_metrics, **lax.psum(sums, axis_name)}


def eval_step(state: TrainState, batch: dict[str, jax.Array], *,
              config: ml_collections.ConfigDict,
              axis_name: str) -> tuple[dict[str, jax.Array], jax.Array]:
  """Evaluates this device's share of a batch.

  Args:
    state: the replicated train state.
    batch: "inputs" [b, T, H, W, C], "labels" [b, H, W], "valid" [b, H, W] and optionally
      "example_mask" [b] (False for padding examples, which count nowhere).
    config: the run's config.
    axis_name: the device axis.

  Returns:
    (sums, outputs): sums over the global batch ("loss_sum", "loss_count"; for
    segmentation "confusions" [3, N, N] for all / boundary / interior pixels; for
    pre-training the similarity sums), and this device's outputs: similarity maps
    (pretrain) or predicted classes [b, H, W].
  """
  outputs = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                           batch["inputs"], train=False)
  _, sums = compute_loss(outputs, batch, config, axis_name)
  if config.model.stage != "pretrain":
    outputs = jnp.argmax(outputs, axis=-1)
    sums["confusions"] = metrics.segmentation_confusions(
        batch["labels"], outputs, known_pixels(batch, config.model.num_classes),
        config.model.num_classes)
  return lax.psum(sums, axis_name), outputs
