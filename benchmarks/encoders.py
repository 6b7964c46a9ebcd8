"""Speed of the encoders at their reference shapes: forward + backward per sample.

For each (model, stage) at the reference configuration of SPEC.md §2 (France:
14 channels, T = 16, 48x48, 20 classes; MTLCC: 15 channels, T = 16, 24x24, 18
classes; PASTIS24 for TSViT: 11 channels, T = 60, 24x24, 19 classes; U-TAE's PASTIS:
11 channels, T = 16, 128x128, 20 classes) it times one jitted train-mode step
(dropout on), gradients of a fixed random read-out of the output w.r.t. every
parameter plus the BatchNorm statistics update, on the current backend. Reports
trainable parameters, compile time, the
median of `repeats` timed steps after one warm-up divided by the batch size, and
XLA's compiled memory (temp + arguments + outputs, an upper bound of the peak).

  python -m benchmarks.encoders --batch_size=2 --repeats=5
"""

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks import measure
from configs import common
from cscl_jax import models

FRANCE = dict(num_channels=14, max_seq_len=16, img_res=48, num_classes=20)
MTLCC = dict(num_channels=15, max_seq_len=16, img_res=24, num_classes=18)
PASTIS24 = dict(num_channels=11, max_seq_len=60, img_res=24, num_classes=19)
# U-TAE's PASTIS defaults: 10 bands + day of year, 128x128 patches; T = 16 dates here.
PASTIS = dict(num_channels=11, max_seq_len=16, img_res=128, num_classes=20)
CASES = {
    "unet3df/pretrain": dict(FRANCE, name="unet3df", stage="pretrain"),
    "unet3df/finetune": dict(FRANCE, name="unet3df", stage="finetune"),
    "unet3d/supervised": dict(FRANCE, name="unet3d", stage="supervised"),
    "unet2d_convlstm/supervised": dict(MTLCC, name="unet2d_convlstm", stage="supervised"),
    "unet2d_convlstm/pretrain": dict(MTLCC, name="unet2d_convlstm", stage="pretrain"),
    "biconvgru/supervised": dict(FRANCE, name="biconvgru", stage="supervised"),
    "biconvgru/pretrain": dict(FRANCE, name="biconvgru", stage="pretrain"),
    "tsvit/supervised": dict(PASTIS24, name="tsvit", stage="supervised"),
    "tsvit/pretrain": dict(PASTIS24, name="tsvit", stage="pretrain"),
    "utae/supervised": dict(PASTIS, name="utae", stage="supervised"),
    "utae/pretrain": dict(PASTIS, name="utae", stage="pretrain"),
}


def measure_case(fields, batch_size, repeats, dtype):
  """Returns a table row (params, compile s, ms per sample, memory MiB) for one case."""
  config = common.get_config().model
  config.update(fields)
  model = models.create_model(config, dtype=dtype)
  res = config.img_res
  keys = jax.random.split(jax.random.key(0, impl="rbg"), 3)  # rbg: quick to compile
  x = jax.random.normal(keys[0], (batch_size, config.max_seq_len, res, res,
                                  config.num_channels))
  variables = jax.jit(lambda x: model.init(keys[1], x, train=False))(x)
  variables.setdefault("batch_stats", {})  # BiConvGRU and TSViT have none
  readout = jax.random.normal(keys[2], jax.eval_shape(
      lambda: model.apply(variables, x, train=False)).shape)

  def loss(params, batch_stats, x):
    out, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                               train=True, mutable=["batch_stats"],
                               rngs={"dropout": keys[2]})
    return jnp.vdot(out, readout), updates["batch_stats"]

  start = time.perf_counter()
  step = jax.jit(jax.grad(loss, has_aux=True)).lower(
      variables["params"], variables["batch_stats"], x).compile()
  compile_s = time.perf_counter() - start
  args = (variables["params"], variables["batch_stats"], x)
  seconds = measure.median_times({"step": step}, args, repeats)["step"]
  params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
  return params, compile_s, 1e3 * seconds / batch_size, measure.compiled_bytes(step) / 2**20


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
  parser.add_argument("--cases", default=",".join(CASES),
                      help=f"comma-separated subset of {', '.join(CASES)}")
  args = parser.parse_args()
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"batch {args.batch_size}, dtype {args.dtype}, median of {args.repeats}")
  print(f"| {'model/stage':28} | {'params':>10} | {'compile s':>9} "
        f"| {'fwd+bwd ms/sample':>17} | {'memory MiB':>10} |")
  print(f"|{'-' * 30}|{'-' * 12}|{'-' * 11}|{'-' * 19}|{'-' * 12}|")
  for case in args.cases.split(","):
    params, compile_s, ms, mib = measure_case(CASES[case], args.batch_size, args.repeats,
                                         args.dtype)
    print(f"| {case:28} | {params:>10,} | {compile_s:>9.1f} | {ms:>17.1f} | {mib:>10.0f} |",
          flush=True)


if __name__ == "__main__":
  main()
