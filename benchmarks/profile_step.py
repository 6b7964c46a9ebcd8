"""Where a training step's time goes: XLA:CPU op time by primitive and by layer.

Traces `--steps` runs of the real replicated train step (benchmarks/train_step.py
`build_step`) with `jax.profiler`, reads the trace back (`jax.profiler.ProfileData`),
and attributes every executed XLA op to the JAX primitive and Flax module path that
the compiled HLO's metadata names (`op_name`, e.g.
"jvp(Segmenter)/encoder/dc3/conv1/conv_general_dilated"; "transpose(...)" marks the
backward pass). Prints the share of op time per primitive, forward vs backward, and the
layers that take most.

  python -m benchmarks.profile_step --model=unet3df --stage=pretrain --small --batch_size=8
  python -m benchmarks.profile_step --model=unet3df --stage=pretrain --batch_size=2

Op times are summed over XLA's worker threads, so they add up to more than the wall
time of a step when ops run in parallel; the shares are what to read. Ops that XLA:CPU
hands to library kernels outside its thunk executor (its native 3D and transposed
convolutions) are not traced: traced op time far below the wall time means that is where
the step goes.
"""

import argparse
import collections
import glob
import re
import tempfile
import time

import jax

from benchmarks import train_step
from cscl_jax import host_memory

_OP = re.compile(r'^\s*(?:ROOT )?%?([\w.-]+) = .*?op_name="([^"]+)"', re.MULTILINE)
_LAYER = re.compile(r"(?:encoder|head)(?:/[A-Za-z_]\w*)*")


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the JAX op_name of its metadata."""
  return dict(_OP.findall(hlo_text))


def attribute(events: list[tuple[str, float]], names: dict[str, str]
              ) -> tuple[collections.Counter, collections.Counter]:
  """Sums event durations by (primitive, pass) and by layer.

  Args:
    events: (XLA op name, seconds) of every executed op.
    names: op_names() of the compiled step.

  Returns:
    (seconds by "primitive fwd|bwd", seconds by layer path).
  """
  by_primitive, by_layer = collections.Counter(), collections.Counter()
  for op, seconds in events:
    op_name = names.get(op)
    if op_name is None:
      continue  # executor bookkeeping, not an HLO op
    primitive = op_name.rsplit("/", 1)[-1]
    direction = "bwd" if "transpose(" in op_name else "fwd"
    by_primitive[f"{primitive} {direction}"] += seconds
    layer = _LAYER.search(op_name)
    by_layer[layer.group(0).rsplit("/", 1)[0] if layer else "(optimizer, loss)"] += seconds
  return by_primitive, by_layer


def trace_events(step, state, batch, steps: int) -> tuple[list[tuple[str, float]], float]:
  """(op name, seconds) of every op the CPU threads ran during `steps` steps; their wall s."""
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir)
    start = time.perf_counter()
    for _ in range(steps):
      state, _ = jax.block_until_ready(step(state, batch))
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))[-1]
    profile = jax.profiler.ProfileData.from_file(path)
  return [(event.name, event.duration_ns * 1e-9) for plane in profile.planes
          for line in plane.lines if "XLA" in line.name for event in line.events], wall


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="unet3df", choices=sorted(train_step.REFERENCE))
  parser.add_argument("--stage", default="pretrain", choices=train_step.STAGES)
  parser.add_argument("--batch_size", type=int, default=2, help="samples per device")
  parser.add_argument("--steps", type=int, default=2, help="traced steps")
  parser.add_argument("--top", type=int, default=12, help="rows per table")
  parser.add_argument("--small", action="store_true", help="reduced shapes (slow backends)")
  args = parser.parse_args()
  host_memory.retain_freed_memory()  # As cscl_jax.main does.
  config = train_step.make_config(args.model, args.stage, "float32", args.small)
  step, state = train_step.build_step(config)
  batch = train_step.random_batch(config, args.batch_size)
  names = op_names(step.lower(state, batch).compile().as_text())
  state, _ = jax.block_until_ready(step(state, batch))  # compile and warm up
  events, wall = trace_events(step, state, batch, args.steps)
  by_primitive, by_layer = attribute(events, names)
  total = sum(by_primitive.values())
  m = config.model
  print(f"{args.model} {args.stage}, T={m.max_seq_len}, {m.img_res}x{m.img_res}, "
        f"f={m.num_features}, B={args.batch_size}: {wall / args.steps:.3f} s wall per step, "
        f"{total / args.steps:.3f} s of traced op time ({jax.default_backend()}, "
        f"JAX {jax.__version__})")
  for title, counter in (("primitive", by_primitive), ("layer", by_layer)):
    print(f"\n| {title} | s/step | share |\n|---|---:|---:|")
    for name, seconds in counter.most_common(args.top):
      print(f"| {name} | {seconds / args.steps:.3f} | {seconds / total:.0%} |")


if __name__ == "__main__":
  main()
