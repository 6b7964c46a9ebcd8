"""Training throughput: samples/s and step time of the real pre-training and fine-tuning steps.

Times `train.train_step` (model, CSCL or cross-entropy loss, gradients averaged over the
devices, Adam update, BatchNorm statistics) under `jax.pmap` on every local device, as
`train.train_and_evaluate` runs it, on a fixed random batch at the reference shapes of
SPEC.md §2 (UNet3Df: 14 channels, T = 16, 48x48, f = 16; UNet2D-ConvLSTM: 15 channels,
T = 16, 24x24), in float32 and in bfloat16 mixed precision (`config.dtype`). Reports the
median of `--repeats` steps after `--warmup` untimed ones, the global batch divided by it,
and the compile time; the header names the backend, device count and JAX version.

  python -m benchmarks.train_step                  # reference shapes, 2 samples per device
  python -m benchmarks.train_step --small --repeats=5 --batch_size=1

`--small` shrinks every case (half the image size and dates, a quarter of the features) for
slow backends such as a CPU, where the reference UNet3Df takes seconds per sample.
"""

import argparse
import functools
import time

from flax import jax_utils
import jax
import numpy as np

from configs import common
from cscl_jax import models
from cscl_jax import train

REFERENCE = {
    "unet3df": dict(name="unet3df", num_channels=14, max_seq_len=16, img_res=48,
                    num_features=16, num_classes=20),
    "unet2d_convlstm": dict(name="unet2d_convlstm", num_channels=15, max_seq_len=16,
                            img_res=24, num_features=16, num_classes=18),
}
STAGES = ("pretrain", "finetune")


def make_config(model: str, stage: str, dtype: str, small: bool):
  """The default config with a reference (or, with `small`, reduced) model."""
  config = common.get_config()
  config.model.update(REFERENCE[model], stage=stage)
  config.dtype = dtype
  if small:
    m = config.model
    m.img_res, m.max_seq_len = m.img_res // 2, m.max_seq_len // 2
    m.num_features, m.emb_channels, m.attn_channels = 4, 32, 32
  return config


def random_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """[D, b, ...] inputs, blocky labels (mixed same/different CSCL pairs) and valid masks."""
  m, devices = config.model, jax.local_device_count()
  rng = np.random.default_rng(seed)
  shape = (devices, batch_size, m.img_res, m.img_res)  # [D, b, H, W]
  blocks = rng.integers(0, m.num_classes + 1, shape[:2] + (m.img_res // 4,) * 2)
  return {
      "inputs": rng.normal(size=shape[:2] + (m.max_seq_len,) + shape[2:]
                           + (m.num_channels,)).astype(np.float32),
      "labels": np.repeat(np.repeat(blocks, 4, 2), 4, 3).astype(np.int32),
      "valid": rng.random(shape) > 0.1}


def time_steps(config, batch_size: int, warmup: int, repeats: int) -> dict[str, float]:
  """Compile s, median step s and samples/s of the replicated train step."""
  model = models.create_model(config.model, dtype=config.dtype, axis_name=train.AXIS)
  state = train.create_train_state(jax.random.key(0, impl="rbg"), config, model,
                                   train.learning_rate_schedule(config, 100))
  state = jax_utils.replicate(state, axis_name=train.AXIS)
  step = jax.pmap(functools.partial(train.train_step, config=config, axis_name=train.AXIS),
                  axis_name=train.AXIS, donate_argnums=(0,))
  batch = random_batch(config, batch_size)
  start = time.perf_counter()
  state, step_metrics = jax.block_until_ready(step(state, batch))  # includes compiling
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, step_metrics = jax.block_until_ready(step(state, batch))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, step_metrics = jax.block_until_ready(step(state, batch))
    times.append(time.perf_counter() - start)
  if not np.isfinite(np.asarray(step_metrics["loss"])).all():
    raise FloatingPointError(f"Non-finite loss in {config.model.name}/{config.model.stage}.")
  median = float(np.median(times))
  return {"compile_s": compile_s, "step_s": median,
          "samples_per_s": batch_size * jax.device_count() / median}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=2, help="samples per device")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps (median)")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--models", default=",".join(REFERENCE))
  parser.add_argument("--stages", default=",".join(STAGES))
  parser.add_argument("--small", action="store_true", help="reduced shapes (slow backends)")
  args = parser.parse_args()
  if args.repeats < 1 or args.batch_size < 1:
    parser.error("--repeats and --batch_size must be >= 1.")
  for name, values, known in (("--models", args.models, REFERENCE), ("--stages", args.stages,
                              STAGES), ("--dtypes", args.dtypes, ("float32", "bfloat16"))):
    unknown = set(values.split(",")) - set(known)
    if unknown:
      parser.error(f"{name}: unknown {sorted(unknown)}; choose from {list(known)}.")
  device = jax.devices()[0]
  print(f"JAX {jax.__version__}, backend {jax.default_backend()} ({device.device_kind}), "
        f"{jax.device_count()} devices, {jax.process_count()} processes; "
        f"{args.batch_size} samples per device; median of {args.repeats} steps after "
        f"{args.warmup} warm-up; {'SMALL' if args.small else 'reference'} shapes")
  print("| model | stage | dtype | shape (T, H, C, f) | step s | samples/s | compile s |")
  print("|---|---|---|---|---:|---:|---:|")
  for model in args.models.split(","):
    for stage in args.stages.split(","):
      for dtype in args.dtypes.split(","):
        config = make_config(model, stage, dtype, args.small)
        m = config.model
        r = time_steps(config, args.batch_size, args.warmup, args.repeats)
        print(f"| {model} | {stage} | {dtype} | {m.max_seq_len}, {m.img_res}, "
              f"{m.num_channels}, {m.num_features} | {r['step_s']:.3f} | "
              f"{r['samples_per_s']:.2f} | {r['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
  main()
