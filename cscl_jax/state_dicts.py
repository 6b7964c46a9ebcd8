"""PyTorch state dicts -> Flax variables: what every checkpoint importer here shares.

An importer (`convert` for DeepSatModels, `convert_utae` for utae-paps) lists entries
(our leaf path or None to drop, PyTorch key(s), kind) for every entry of the original
`state_dict()`, built with `conv`, `norm` and `block`; `build_variables` checks them
against the variables `models.create_model` makes and converts each array by its kind
(`KINDS`). A missing, unexpected or misshapen entry is an error that names it.

Layouts: Conv [O, I, *k] -> [*k, I, O]; ConvTranspose [I, O, *k] -> [*k, O, I], the
kernel our transposed convolutions (transpose_kernel=True) flip themselves; Linear
[O, I] -> [I, O]; 1x1 convs as Dense kernels.

torch is imported only to read .pth files (`load_state_dict`).
"""

from collections.abc import Mapping
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cscl_jax import checkpoints
from cscl_jax import models


def torch_kernel(weight: np.ndarray) -> np.ndarray:
  """A PyTorch Conv, ConvTranspose or Linear weight as the Flax kernel.

  Conv [O, I, *k] -> [*k, I, O]; ConvTranspose [I, O, *k] -> [*k, O, I] (Flax
  ConvTranspose with transpose_kernel=True swaps and flips it back); Linear [O, I] ->
  [I, O]. The same transpose in all three cases: the first two axes go last, reversed.
  """
  return np.transpose(weight, (*range(2, weight.ndim), 1, 0))


# How one of our leaves comes from PyTorch: kind -> (PyTorch shape of one source entry
# given our leaf's shape, conversion of the source arrays into our leaf). Importers add
# their own kinds (`build_variables(..., kinds=)`).
KINDS = {
    "copy": (lambda s: s, lambda a, s: a[0]),
    "kernel": (lambda s: (s[-1], s[-2], *s[:-2]), lambda a, s: torch_kernel(a[0])),
    "conv1x1": (lambda s: (s[1], s[0], 1, 1),
                lambda a, s: torch_kernel(a[0][:, :, 0, 0])),
    "linear_as_conv1x1": (lambda s: (s[-1], s[-2]),
                          lambda a, s: torch_kernel(a[0]).reshape(s)),
    "conv1d_as_dense": (lambda s: (s[1], s[0], 1), lambda a, s: a[0][:, :, 0].T),
}


def conv(path: tuple, name: str) -> list:
  """A Conv / Linear at `path` (kernel, bias) from `name`.weight and .bias."""
  return [(("params", *path, "kernel"), name + ".weight", "kernel"),
          (("params", *path, "bias"), name + ".bias", "copy")]


def norm(path: tuple, name: str, *, running: bool = True) -> list:
  """GroupNorm (running=False) or BatchNorm, whose step counter is dropped."""
  entries = [(("params", *path, "scale"), name + ".weight", "copy"),
             (("params", *path, "bias"), name + ".bias", "copy")]
  if running:
    entries += [(("batch_stats", *path, "mean"), name + ".running_mean", "copy"),
                (("batch_stats", *path, "var"), name + ".running_var", "copy"),
                (None, name + ".num_batches_tracked", "copy")]
  return entries


def conv_norm(path: tuple, i: int, name: str, index: int, *, running: bool = True) -> list:
  """conv{i} and norm{i} of a ConvBlock at `path` from `name`.{index} and .{index + 1}."""
  return (conv((*path, f"conv{i}"), f"{name}.{index}")
          + norm((*path, f"norm{i}"), f"{name}.{index + 1}", running=running))


def block(path: tuple, name: str, num_convs: int = 2, *, running: bool = True) -> list:
  """A ConvBlock from nn.Sequential(conv, norm, LeakyReLU, conv, norm, LeakyReLU, ...)."""
  return [entry for i in range(num_convs)
          for entry in conv_norm(path, i, name, 3 * i, running=running)]


def _variable_shapes(model_config: ml_collections.ConfigDict) -> dict[tuple, tuple]:
  """Leaf path -> shape of the variables `models.create_model` makes (nothing computed)."""
  m = model_config
  # BiConvGRU and TSViT take any number of dates, and their weights name none.
  time_steps = m.get("max_seq_len", 2)
  x = jax.ShapeDtypeStruct((1, time_steps, m.img_res, m.img_res, m.num_channels),
                           jnp.float32)
  model = models.create_model(model_config)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return {tuple(k.key for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}


def _convert_entries(arrays: Mapping[str, np.ndarray], entries: list,
                     expected: dict[tuple, tuple], kinds: Mapping[str, tuple]
                     ) -> tuple[dict[tuple, np.ndarray], list[str]]:
  """Our leaves from `arrays` by `entries`, and the problems (missing, shape, unexpected)."""
  leaves, used, problems = {}, set(), []
  for path, keys, kind in entries:
    keys = (keys,) if isinstance(keys, str) else keys
    used.update(keys)
    missing = [k for k in keys if k not in arrays]
    problems += [f"missing: {k!r}" for k in missing]
    if missing or path is None:
      continue
    if path not in expected:  # A slip in the name tables above, not in the input.
      raise RuntimeError(f"{path} is not a variable of this model.")
    torch_shape, convert = kinds[kind]
    want = tuple(torch_shape(expected[path]))
    bad = [k for k in keys if arrays[k].shape != want]
    problems += [f"wrong shape: {k!r} is {arrays[k].shape}, this network needs "
                 f"{want}" for k in bad]
    if not bad:
      leaves[path] = convert([arrays[k] for k in keys], expected[path]).astype(np.float32)
  problems += [f"unexpected: {k!r}" for k in sorted(set(arrays) - used)]
  return leaves, problems


def build_variables(arrays: Mapping[str, np.ndarray], entries: list,
                    model_config: ml_collections.ConfigDict, network: str,
                    sizes: Mapping[str, int],
                    kinds: Mapping[str, tuple] = KINDS) -> dict[str, Any]:
  """The variables of `models.create_model(model_config)` from a state dict's arrays.

  Args:
    arrays: PyTorch names -> numpy arrays.
    entries: (our leaf path or None to drop, PyTorch key(s), kind of `kinds`) for every
      entry of the state dict.
    model_config: the network the arrays are converted for.
    network: its name for messages, e.g. "UNET3Df (pretrain)".
    sizes: the model fields inferred from the arrays, for messages.
    kinds: kind -> (PyTorch shape from ours, conversion), as `KINDS`.

  Returns:
    {"params": ..., "batch_stats": ...}, float32 numpy leaves.

  Raises:
    ValueError: naming every missing, unexpected or misshapen entry.
  """
  expected = _variable_shapes(model_config)
  leaves, problems = _convert_entries(arrays, entries, expected, kinds)
  if problems:
    raise ValueError(
        f"The state dict does not fit {network} with {dict(sorted(sizes.items()))} "
        f"(inferred from its shapes); {len(problems)} problem(s):\n  "
        + "\n  ".join(problems[:30]))
  if set(leaves) != set(expected):  # A gap in the name tables.
    raise RuntimeError(f"No PyTorch source for {sorted(set(expected) - set(leaves))}.")
  variables = {}
  for path, value in leaves.items():
    node = variables
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return variables


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a .pth saved by the original code as numpy arrays (needs torch, CPU is enough).

  Accepts `torch.save(net.state_dict())`, a dict holding it under "state_dict", "model"
  or "net", and names saved from nn.DataParallel ("module." prefix, removed).
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Reading PyTorch checkpoints needs torch: `pip install torch` "
                      "(the CPU build is enough).") from e
  saved = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model", "net"):
    if isinstance(saved, Mapping) and isinstance(saved.get(key), Mapping):
      saved = saved[key]
      break
  if not isinstance(saved, Mapping) or not all(map(torch.is_tensor, saved.values())):
    raise ValueError(f"{path} holds a {type(saved).__name__}, not a state dict (names -> "
                     "tensors as saved by torch.save(net.state_dict())).")
  if saved and all(k.startswith("module.") for k in saved):
    saved = {k[len("module."):]: v for k, v in saved.items()}
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in saved.items()}


def save_converted(workdir: str, model_config: ml_collections.ConfigDict,
                   variables: dict[str, Any]) -> ml_collections.ConfigDict:
  """Saves converted variables as `<workdir>/checkpoints/0` (+ config.json holding the model).

  Returns:
    The saved config: {"model": model_config}.
  """
  config = ml_collections.ConfigDict({"model": model_config})
  manager = checkpoints.create_manager(workdir, keep=1, best_metric="loss", best_mode="min")
  if manager.latest_step() is not None:
    raise ValueError(f"{workdir} already holds checkpoints; pass a new --workdir.")
  checkpoints.check_config(workdir, config, has_checkpoint=False)
  checkpoints.save(manager, 0, variables)
  manager.wait_until_finished()
  return config


def next_steps(workdir: str, config: ml_collections.ConfigDict) -> str:
  """What was written and the --config flags that fine-tuning from it needs."""
  fields = " ".join(f"--config.model.{k}={v}" for k, v in sorted(config.model.items())
                    if k != "stage")
  return (f"Wrote {os.path.join(workdir, checkpoints.CHECKPOINT_DIR)} (step 0) and "
          f"{checkpoints.CONFIG_FILE}. Fine-tune with --config.init_from={workdir} "
          f"and the same model fields: {fields}")
