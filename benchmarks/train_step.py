"""Training throughput: the real pre-training and fine-tuning steps, beside the PyTorch original.

Times `steps.train_step` (model, CSCL or cross-entropy loss, gradients averaged over the
devices, Adam update, BatchNorm statistics) under `jax.pmap` on every local device, as
`train.train_and_evaluate` runs it, on a fixed random batch at the reference shapes of
SPEC.md §2 (UNet3Df and UNet3D: 14 channels, T = 16, 48x48, f = 16; UNet2D-ConvLSTM: 15
channels, T = 16, 24x24), in float32 and in bfloat16 mixed precision (`config.dtype`).
Reports the median of `--repeats` steps after `--warmup` untimed ones, samples/s and the
compile time, and the floor: the step's FLOPs (XLA's cost analysis) at this machine's
float32 matmul rate (a 2048^3 matmul, measured in the same run).

Like `cscl_jax.main`, it first makes glibc keep freed memory for reuse
(`cscl_jax.host_memory`; the PyTorch step in the same process gains from it too);
`--malloc_defaults` leaves malloc as it is.

With `--torch` (needs requirements-test.txt), the PyTorch original's step runs beside ours
on the same batch from identical weights (converted with `cscl_jax.convert`): the two
take turns, so load on a shared machine hits both alike, and the ratio is ours / theirs.

  python -m benchmarks.train_step --torch --dtypes=float32            # reference shapes
  python -m benchmarks.train_step --torch --dtypes=float32 --small --batch_size=8

`--small` shrinks every case (half the image size and dates, a quarter of the features:
f = 4, E = 32, 24x24, T = 8 for UNet3Df) for slow backends such as a CPU.
"""

import argparse
import functools
import time
from typing import Any, Callable

from flax import jax_utils
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from cscl_jax import host_memory
from cscl_jax import models
from cscl_jax import steps

REFERENCE = {
    "unet3df": dict(name="unet3df", num_channels=14, max_seq_len=16, img_res=48,
                    num_features=16, num_classes=20),
    "unet3d": dict(name="unet3d", num_channels=14, max_seq_len=16, img_res=48,
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


def stages(model: str, wanted: list[str]) -> list[str]:
  """The stages to time: UNet3D has none but its own supervised one."""
  return ["supervised"] if model == "unet3d" else wanted


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


def build_step(config, variables: dict[str, Any] | None = None) -> tuple[Callable, Any]:
  """The replicated train step as train_and_evaluate runs it, and its state.

  Args:
    config: the run's config.
    variables: {"params", "batch_stats"} to start from; None: the model's init.
  """
  model = models.create_model(config.model, dtype=config.dtype, axis_name=steps.AXIS)
  state = steps.create_train_state(jax.random.key(0, impl="rbg"), config, model,
                                   steps.learning_rate_schedule(config, 100))
  if variables is not None:
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                          opt_state=state.tx.init(variables["params"]))
  state = jax_utils.replicate(state, axis_name=steps.AXIS)
  step = jax.pmap(functools.partial(steps.train_step, config=config, axis_name=steps.AXIS),
                  axis_name=steps.AXIS, donate_argnums=(0,))
  return step, state


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """This machine's float32 matmul rate (GFLOP/s, median of `repeats`)."""
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / float(np.median(times)) / 1e9


def time_steps(config, batch_size: int, warmup: int, repeats: int,
               with_torch: bool = False) -> dict[str, float]:
  """Compile s, median step s, samples/s and GFLOP of our step (and the original's)."""
  batch = random_batch(config, batch_size)
  variables = torch_step = None
  if with_torch:
    from benchmarks import torch_original  # pylint: disable=g-import-not-at-top
    variables, torch_step = torch_original.build(config, batch)
  step, state = build_step(config, variables)
  flops = step.lower(state, batch).compile().cost_analysis().get("flops", float("nan"))
  start = time.perf_counter()
  state, step_metrics = jax.block_until_ready(step(state, batch))  # includes compiling
  compile_s = time.perf_counter() - start
  ours, theirs = [], []
  for i in range(warmup + repeats):  # the two take turns
    start = time.perf_counter()
    state, step_metrics = jax.block_until_ready(step(state, batch))
    ours.append(time.perf_counter() - start)
    if torch_step is not None:
      start = time.perf_counter()
      torch_step()
      theirs.append(time.perf_counter() - start)
  if not np.isfinite(np.asarray(step_metrics["loss"])).all():
    raise FloatingPointError(f"Non-finite loss in {config.model.name}/{config.model.stage}.")
  median = float(np.median(ours[warmup:]))
  result = {"compile_s": compile_s, "step_s": median, "gflop": flops / 1e9,
            "samples_per_s": batch_size * jax.device_count() / median}
  if theirs:
    result["torch_s"] = float(np.median(theirs[warmup:]))
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=2, help="samples per device")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps (median)")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--models", default=",".join(REFERENCE))
  parser.add_argument("--stages", default=",".join(STAGES))
  parser.add_argument("--small", action="store_true", help="reduced shapes (slow backends)")
  parser.add_argument("--torch", action="store_true",
                      help="time the PyTorch original beside ours (float32 rows)")
  parser.add_argument("--malloc_defaults", action="store_true",
                      help="leave glibc's malloc as it is (cscl_jax.main calls "
                           "host_memory.retain_freed_memory)")
  args = parser.parse_args()
  retained = not args.malloc_defaults and host_memory.retain_freed_memory()
  if args.repeats < 1 or args.batch_size < 1:
    parser.error("--repeats and --batch_size must be >= 1.")
  for name, values, known in (("--models", args.models, REFERENCE), ("--stages", args.stages,
                              STAGES), ("--dtypes", args.dtypes, ("float32", "bfloat16"))):
    unknown = set(values.split(",")) - set(known)
    if unknown:
      parser.error(f"{name}: unknown {sorted(unknown)}; choose from {list(known)}.")
  device = jax.devices()[0]
  rate = matmul_gflops()
  print(f"JAX {jax.__version__}, backend {jax.default_backend()} ({device.device_kind}), "
        f"{jax.device_count()} devices, {jax.process_count()} processes; "
        f"{args.batch_size} samples per device; median of {args.repeats} steps after "
        f"{args.warmup} warm-up; {'SMALL' if args.small else 'reference'} shapes; "
        f"float32 matmul {rate:.0f} GFLOP/s; freed memory "
        f"{'retained' if retained else 'returned (malloc defaults)'}")
  print("| model | stage | dtype | shape (T, H, C, f) | step s | PyTorch s | ours/PyTorch "
        "| floor s (GFLOP) | samples/s | compile s |")
  print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
  for model in args.models.split(","):
    for stage in stages(model, args.stages.split(",")):
      for dtype in args.dtypes.split(","):
        config = make_config(model, stage, dtype, args.small)
        m = config.model
        r = time_steps(config, args.batch_size, args.warmup, args.repeats,
                       with_torch=args.torch and dtype == "float32")
        theirs = (f"{r['torch_s']:.3f} | {r['step_s'] / r['torch_s']:.2f}x"
                  if "torch_s" in r else "- | -")
        print(f"| {model} | {stage} | {dtype} | {m.max_seq_len}, {m.img_res}, "
              f"{m.num_channels}, {m.num_features} | {r['step_s']:.3f} | {theirs} | "
              f"{r['gflop'] / rate:.3f} ({r['gflop']:.0f}) | {r['samples_per_s']:.2f} | "
              f"{r['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
  main()
