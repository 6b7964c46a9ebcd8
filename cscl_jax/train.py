"""Training and evaluation for the three stages: pretrain, finetune and supervised.

`train_and_evaluate(config, workdir)` runs one stage: the per-step functions of
`cscl_jax.steps` under `jax.pmap`, with evaluation, checkpoints, logging and plots.

  pretrain:   encoder + CSCL head; CSCL labels (and optional mask) built on device from
              the segmentation labels; contrastive or binary CSCL loss (SPEC.md §1).
  finetune:   encoder loaded from a pre-training run (`config.init_from`), new classifier,
              cross-entropy over known pixels; the lr schedule starts afresh.
  supervised: the same from random initialisation.
"""

from collections.abc import Iterable, Sequence
import functools
import itertools
import json
import os
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
from flax import jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cscl_jax import checkpoints
from cscl_jax import console
from cscl_jax import input_pipeline
from cscl_jax import metrics
from cscl_jax import models
from cscl_jax import precise_bn
from cscl_jax import preemption
from cscl_jax import steps
from cscl_jax import visualize
from cscl_jax.models import segmenter

def summarize_train(history: list[dict[str, np.ndarray]], first_step: int) -> dict[str, float]:
  """Averages host copies of `train_step` metrics; stops on a non-finite loss.

  Raises:
    FloatingPointError: naming the first step whose loss or gradient norm is NaN/inf.
  """
  for offset, step_metrics in enumerate(history):
    if not (np.isfinite(step_metrics["loss"]) and np.isfinite(step_metrics["grad_norm"])):
      raise FloatingPointError(
          f"Non-finite loss {step_metrics['loss']} (gradient norm "
          f"{step_metrics['grad_norm']}) at step {first_step + offset}; stopping. The last "
          "checkpoint before it is kept: lower config.learning_rate or check the data.")
  sums = {k: float(np.sum([h[k] for h in history])) for k in history[0]}
  summary = {"loss": sums["loss"] / len(history), "grad_norm": sums["grad_norm"] / len(history)}
  if "same_count" in sums:
    summary.update(metrics.similarity_scores(sums))
  return summary


def evaluate(p_eval_step: Any, state: steps.TrainState,
             batches: Iterable[dict[str, np.ndarray]], *, class_names: Sequence[str],
             stage: str) -> tuple[dict[str, float], dict[str, np.ndarray], np.ndarray]:
  """Runs the replicated eval step over `batches` and scores the sums.

  Args:
    p_eval_step: `eval_step` under `jax.pmap` (config and axis bound).
    state: the replicated train state.
    batches: [D, b, ...] batches, e.g. `input_pipeline.create_split(..., train=False)`;
      examples whose "example_mask" is False (padding) count nowhere.
    class_names: the dataset's class names (per-class IoU names).
    stage: config.model.stage.

  Returns:
    (scores, examples, outputs): a flat dict of named numbers ("loss" is the exact mean
    over the whole split), and the real examples of the first batch and their outputs on
    the host, flattened over devices (for the plots).
  """
  totals, first = None, None
  for batch in batches:
    sums, outputs = p_eval_step(state, batch)
    sums = jax.tree.map(lambda x: np.asarray(x[0], np.float64), jax.device_get(sums))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if first is None:  # [D, b, ...] -> [D * b, ...], real examples only
      flat = jax.tree.map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:]),
                          (batch, jax.device_get(outputs)))
      real = flat[0].get("example_mask", np.ones(len(flat[1]), bool))
      first = jax.tree.map(lambda x: x[real], flat)
  if totals is None:
    raise ValueError("The eval split gave no batch: check config.dataset.eval_split.")
  count = totals["loss_count"]
  scores = {"loss": float(totals["loss_sum"] / count) if count else float("nan")}
  if stage == "pretrain":
    scores.update(metrics.similarity_scores(totals))
  else:
    scores.update(metrics.segmentation_scores(totals["confusions"], class_names))
  return scores, first[0], first[1]


def write_metrics(path: str, step: int, scores: dict[str, float]) -> None:
  """Writes {"step", **scores} as JSON to `path` (local or gs://), NaN as null."""
  finite = {k: v if np.isfinite(v) else None for k, v in scores.items()}
  epath.Path(path).write_text(json.dumps({"step": step, **finite}, indent=2,
                                         allow_nan=False))


def _check_config(config: ml_collections.ConfigDict) -> None:
  """One clear error for a config the loop cannot run."""
  if config.model.stage not in segmenter.STAGES:
    raise ValueError(f"config.model.stage={config.model.stage!r}; use one of "
                     f"{segmenter.STAGES}.")
  if config.cscl.loss not in steps.CSCL_LOSSES:
    raise ValueError(f"config.cscl.loss={config.cscl.loss!r}; use one of "
                     f"{sorted(steps.CSCL_LOSSES)}.")
  if config.batch_size % jax.device_count():
    raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of the "
                     f"{jax.device_count()} devices.")
  if config.init_from and config.model.stage != "finetune":
    raise ValueError(f"config.init_from is only used to fine-tune; stage "
                     f"{config.model.stage!r} starts from scratch: drop --config.init_from.")
  if config.precise_bn_batches < 0:
    raise ValueError(f"config.precise_bn_batches={config.precise_bn_batches}; use 0 (keep "
                     "the running statistics) or a number of training batches.")
  every = {k: config[k] for k in ("log_every_steps", "eval_every_steps",
                                  "checkpoint_every_steps")}
  if min(every.values()) < 1:
    raise ValueError(f"These must be >= 1: {every}.")


def check_model_shapes(model: Any, config: ml_collections.ConfigDict) -> int:
  """Traces the model's init (no compute) so that a shape error comes before the data.

  Returns:
    The number of parameters.

  Raises:
    ValueError: from the model, e.g. an img_res or max_seq_len it cannot take.
  """
  m = config.model
  x = jax.ShapeDtypeStruct((1, m.max_seq_len, m.img_res, m.img_res, m.num_channels),
                           jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))


def with_precise_bn(p_statistics_step: Any, state: steps.TrainState, step: int, num_batches: int,
                    config: ml_collections.ConfigDict, info: Any) -> steps.TrainState:
  """`state` with BatchNorm statistics recomputed over the `num_batches` training batches
  after `step` (`precise_bn.recompute`); unchanged for 0 or a model without BatchNorm."""
  if not num_batches or not jax.tree.leaves(state.batch_stats):
    return state
  batches = input_pipeline.create_split(config, config.dataset.train_split, train=True,
                                        start_step=step, info=info)
  return state.replace(batch_stats=precise_bn.recompute(
      p_statistics_step, state, itertools.islice(batches, num_batches)))


def _eval_and_report(p_eval_step, state, step, config, workdir, info, writer):
  """Evaluates, writes scalars, a PNG of a few samples and metrics.json; returns scores."""
  batches = input_pipeline.create_split(config, config.dataset.eval_split, train=False,
                                        info=info)
  if config.num_eval_batches > 0:
    batches = itertools.islice(batches, config.num_eval_batches)
  scores, batch, outputs = evaluate(p_eval_step, state, batches,
                                    class_names=info.class_names, stage=config.model.stage)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
  logging.info("Eval at step %d: %s", step, console.headline(scores))
  if jax.process_index() == 0:
    n, num_classes = config.num_plot_samples, config.model.num_classes
    plot = (visualize.plot_similarity if config.model.stage == "pretrain"
            else visualize.plot_segmentation)
    plot(os.path.join(workdir, "plots", f"eval_{step:07d}.png"), batch["inputs"][:n],
         batch["labels"][:n], outputs[:n], num_classes, rgb=info.rgb_channels)
    write_metrics(os.path.join(workdir, "metrics.json"), step, scores)
  return scores


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs one stage in `workdir`, resuming from its latest checkpoint if any.

  Args:
    config: see configs/common.py.
    workdir: where checkpoints, TensorBoard events, plots and metrics.json go (a local
      path or a gs:// URL).

  Returns:
    The final evaluation metrics (also written to `<workdir>/metrics.json`).

  Raises:
    preemption.Stopped: after a Ctrl-C / SIGTERM, once the current step's checkpoint is
      saved.
  """
  _check_config(config)
  m = config.model
  model = models.create_model(m, dtype=jnp.dtype(config.dtype), axis_name=steps.AXIS)
  num_params = check_model_shapes(model, config)  # Before the data, which takes longer.
  info = input_pipeline.dataset_info(config)
  steps_per_epoch = (config.steps_per_epoch if config.steps_per_epoch > 0 else
                     info.num_examples[config.dataset.train_split] // config.batch_size)
  num_steps = (config.num_train_steps if config.num_train_steps > 0 else
               config.num_epochs * steps_per_epoch)
  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=jax.process_index() > 0)
  learning_rate_fn = steps.learning_rate_schedule(config, steps_per_epoch)
  # The "rbg" generator compiles the initialisers ~5x faster than threefry on CPU.
  rng = jax.random.key(config.seed, impl="rbg")
  state = steps.create_train_state(rng, config, model, learning_rate_fn)

  best_metric, best_mode = checkpoints.best_metric(m.stage)
  manager = checkpoints.create_manager(workdir, keep=config.keep_checkpoints,
                                       best_metric=best_metric, best_mode=best_mode)
  checkpoints.check_config(workdir, config, manager.latest_step() is not None)
  restored = checkpoints.restore_latest(manager, state)
  if restored is not None:
    state = restored
  elif m.stage == "finetune":
    if not config.init_from:
      raise ValueError("Fine-tuning needs a pre-trained encoder: pass "
                       "--config.init_from=<pre-training workdir>.")
    params, batch_stats = checkpoints.load_encoder(config.init_from, state.params,
                                                   state.batch_stats)
    state = state.replace(params=params, batch_stats=batch_stats)
  start_step = int(state.step)
  for line in console.run_lines(config, workdir, info, num_params, steps_per_epoch,
                                start_step, num_steps):
    logging.info(line)

  train_iter = input_pipeline.create_split(config, config.dataset.train_split, train=True,
                                           start_step=start_step, info=info)
  axis = steps.AXIS
  p_train_step = jax.pmap(functools.partial(steps.train_step, config=config, axis_name=axis),
                          axis_name=axis, donate_argnums=(0,))
  p_eval_step = jax.pmap(functools.partial(steps.eval_step, config=config, axis_name=axis),
                         axis_name=axis)
  p_statistics_step = jax.pmap(functools.partial(precise_bn.batch_statistics,
                                                 seed=config.seed), axis_name=axis)
  # Replicated over the same mesh axis as pmap's outputs: no recompilation at step 2.
  state = jax_utils.replicate(state, axis_name=axis)
  if config.freeze_encoder and start_step == 0:
    # A frozen network runs in inference mode with fixed weights: its statistics are
    # recomputed once, before the first step, and kept (the head trains on them).
    state = with_precise_bn(p_statistics_step, state, 0, config.precise_bn_batches,
                            config, info)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=num_steps, writer=writer, every_steps=config.log_every_steps,
      every_secs=None)
  eval_and_report = functools.partial(_eval_and_report, p_eval_step, config=config,
                                      workdir=workdir, info=info, writer=writer)
  history, scores, eval_done_at = [], {}, None
  try:
    with preemption.stop_requests() as signals:
      for step in range(start_step + 1, num_steps + 1):
        state, step_metrics = p_train_step(state, next(train_iter))
        if history:  # At most two steps queued on the devices, so that a stop request
          jax.block_until_ready(history[-1])  # is acted on within a step or two.
        history.append(step_metrics)
        stop_now = preemption.stop_agreed(bool(signals), step, config.log_every_steps)
        do_eval = step == num_steps or step % config.eval_every_steps == 0
        do_save = do_eval or stop_now or step % config.checkpoint_every_steps == 0
        if do_save or step % config.log_every_steps == 0:
          history = jax.tree.map(lambda x: x[0], jax.device_get(history))
          summary = summarize_train(history, step - len(history) + 1)
          summary["learning_rate"] = float(learning_rate_fn(step - 1))
          writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
          history = []
        report_progress(step)  # After the wait for the step's results: honest steps/s.
        if do_eval:
          with report_progress.timed("eval"):  # The checkpoint keeps these statistics.
            if not config.freeze_encoder:
              state = with_precise_bn(p_statistics_step, state, step,
                                      config.precise_bn_batches, config, info)
            scores, eval_done_at = eval_and_report(state, step), step
        if do_save:
          checkpoints.save(manager, step, jax_utils.unreplicate(state),
                           scores if eval_done_at == step else None)
        if stop_now:
          raise preemption.Stopped(step, signals)
    if eval_done_at is None:  # Resumed a finished run: evaluate what it left.
      scores = eval_and_report(state, start_step)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
  for line in console.final_lines(workdir, manager, num_steps, scores):
    logging.info(line)
  return scores


def restore_state(workdir: str, config: ml_collections.ConfigDict,
                  checkpoint: str) -> tuple[steps.TrainState, int]:
  """Restores checkpoint "best" | "latest" | "<step>" of the run in `workdir`.

  Args:
    workdir: a training run's directory.
    config: the run's config (`checkpoints.load_config(workdir)`).
    checkpoint: "best" (by the run's validation metric), "latest" or a step number.

  Returns:
    (state with numpy leaves, its step).
  """
  model = models.create_model(config.model, dtype=jnp.dtype(config.dtype), axis_name=steps.AXIS)
  abstract = jax.eval_shape(lambda: steps.create_train_state(
      jax.random.key(0, impl="rbg"), config, model, steps.learning_rate_schedule(config, 1)))
  step = checkpoints.find_step(workdir, checkpoint, config.model.stage)
  return checkpoints.restore_step(workdir, step, abstract), step
