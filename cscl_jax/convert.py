"""Import checkpoints of the reference PyTorch code (michaeltrs/DeepSatModels).

  python -m cscl_jax.convert --checkpoint=UNET3Df_CSCL_50_60000.pth \
      --architecture=UNET3Df --stage=pretrain --workdir=workdirs/from_torch
  python -m cscl_jax.main --config=configs/finetune.py --workdir=workdirs/finetune \
      --config.init_from=workdirs/from_torch

`from_deepsat(state_dict, architecture, stage)` takes the original networks'
`state_dict()` (parameter AND buffer names exactly as PyTorch names them, values as
numpy arrays) and returns the `config.model` that builds the same network here
(`models.create_model`) with its variables {"params", "batch_stats"}. Sizes are read off
the arrays' shapes; what shapes cannot tell (the CSCL window's stride and dilation,
attention groups, norm_emb, image size, and the classes of a UNET3Df pre-training
checkpoint, which has no classifier) are keyword arguments. Every entry is used once or
dropped on purpose (BatchNorm `num_batches_tracked`; the classifier UNET2D-CLSTM builds
but never uses in pre-training); a missing, unexpected or misshapen entry is an error
that names it.

Layouts: Conv [O, I, *k] -> [*k, I, O]; ConvTranspose [I, O, *k] -> [*k, O, I], the
kernel our transposed convolutions (transpose_kernel=True) flip themselves; Linear
[O, I] -> [I, O]; the CSCL head's 1x1 convs -> Dense kernels; rel_h [A/2, 1, 1, k, 1] and
rel_w [A/2, 1, 1, 1, k] -> [A/2, k]; RecurrentNorm2d's running_mean_{t} -> mean [T, C].

torch is imported only to read .pth files (`load_state_dict`).
"""

import argparse
from collections.abc import Mapping, Sequence
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cscl_jax import checkpoints
from cscl_jax import convert_seq
from cscl_jax import models
from cscl_jax.models import segmenter

# Original MODEL.architecture -> (our model.name, reference image size).
ARCHITECTURES = {"UNET3Df": ("unet3df", 48), "UNET3D": ("unet3d", 48),
                 "UNET2D-CLSTM": ("unet2d_convlstm", 24), **convert_seq.ARCHITECTURES}
# Supervised networks of the original code: no CSCL pre-training stage.
_SUPERVISED_ONLY = ("UNET3D", *convert_seq.ARCHITECTURES)
_UNET2D = "fcn.unet_"
_CELL = "crnn_main.clstm.cell_list.0."


def torch_kernel(weight: np.ndarray) -> np.ndarray:
  """A PyTorch Conv, ConvTranspose or Linear weight as the Flax kernel.

  Conv [O, I, *k] -> [*k, I, O]; ConvTranspose [I, O, *k] -> [*k, O, I] (Flax
  ConvTranspose with transpose_kernel=True swaps and flips it back); Linear [O, I] ->
  [I, O]. The same transpose in all three cases: the first two axes go last, reversed.
  """
  return np.transpose(weight, (*range(2, weight.ndim), 1, 0))


# How one of our leaves comes from PyTorch: kind -> (PyTorch shape of one source entry
# given our leaf's shape, conversion of the source arrays into our leaf).
_KINDS = {
    "copy": (lambda s: s, lambda a, s: a[0]),
    "kernel": (lambda s: (s[-1], s[-2], *s[:-2]), lambda a, s: torch_kernel(a[0])),
    "conv1x1": (lambda s: (s[1], s[0], 1, 1),
                lambda a, s: torch_kernel(a[0][:, :, 0, 0])),
    "linear_as_conv1x1": (lambda s: (s[-1], s[-2]),
                          lambda a, s: torch_kernel(a[0]).reshape(s)),
    "rel_h": (lambda s: (s[0], 1, 1, s[1], 1), lambda a, s: a[0].reshape(s)),
    "rel_w": (lambda s: (s[0], 1, 1, 1, s[1]), lambda a, s: a[0].reshape(s)),
    "per_step": (lambda s: s[1:], lambda a, s: np.stack(a)),
    **convert_seq.KINDS,
    "conv1d_as_dense": (lambda s: (s[1], s[0], 1), lambda a, s: a[0][:, :, 0].T),
}


def _conv(path: tuple, name: str) -> list:
  return [(("params", *path, "kernel"), name + ".weight", "kernel"),
          (("params", *path, "bias"), name + ".bias", "copy")]


def _norm(path: tuple, name: str, *, running: bool = True) -> list:
  """GroupNorm (running=False) or BatchNorm, whose step counter is dropped."""
  entries = [(("params", *path, "scale"), name + ".weight", "copy"),
             (("params", *path, "bias"), name + ".bias", "copy")]
  if running:
    entries += [(("batch_stats", *path, "mean"), name + ".running_mean", "copy"),
                (("batch_stats", *path, "var"), name + ".running_var", "copy"),
                (None, name + ".num_batches_tracked", "copy")]
  return entries


def _conv_norm(path: tuple, i: int, name: str, index: int, *,
               running: bool = True) -> list:
  """conv{i} and norm{i} of a ConvBlock at `path` from `name`.{index} and .{index + 1}."""
  return (_conv((*path, f"conv{i}"), f"{name}.{index}")
          + _norm((*path, f"norm{i}"), f"{name}.{index + 1}", running=running))


def _block(path: tuple, name: str, num_convs: int = 2, *, running: bool = True) -> list:
  """A ConvBlock from nn.Sequential(conv, norm, LeakyReLU, conv, norm, LeakyReLU, ...)."""
  return [entry for i in range(num_convs)
          for entry in _conv_norm(path, i, name, 3 * i, running=running)]


def _unet3d_entries(p: str) -> list:
  """UNet3D / UNet3Df; prefix p is "backbone." inside UNET3Df's UNet3D_CSCL."""
  e = ("encoder",)
  return (_block((*e, "en3"), p + "en3") + _block((*e, "en4"), p + "en4")
          + _conv_norm((*e, "center"), 0, p + "center_in", 0)
          + _conv_norm((*e, "center"), 1, p + "center_out", 0)
          + _conv((*e, "center_up"), p + "center_out.3")
          + _block((*e, "dc4"), p + "dc4")
          + _conv((*e, "trans3"), p + "trans3.0")
          + _norm((*e, "trans3_norm"), p + "trans3.1")
          + _block((*e, "dc3"), p + "dc3")
          + _conv((*e, "final"), p + "final")
          + _conv((*e, "time_fc"), p + "fn"))


def _unet2d_convlstm_entries(time_steps: int) -> list:
  """FCN_CRNN's encoder: U-Net "fcn.unet_encode/decode", ConvLSTM "crnn_main.clstm"."""
  u, cell = ("encoder", "unet"), ("encoder", "clstm", "cell")
  enc, dec = _UNET2D + "encode.", _UNET2D + "decode."
  entries = (_block((*u, "enc3"), enc + "enc3.encode", running=False)
             + _block((*u, "enc4"), enc + "enc4.encode", running=False)
             + _block((*u, "center"), enc + "center", 1, running=False)
             + _block((*u, "center_decode"), dec + "center_decode", 1, running=False)
             + _conv((*u, "center_up"), dec + "center_decode.3")
             + _block((*u, "dec4"), dec + "dec4.decode")
             + _conv((*u, "dec4_up"), dec + "dec4.decode.6")
             + _block((*u, "final"), dec + "final")
             + _conv((*u, "final_conv"), dec + "final.6")
             + _conv((*cell, "h_conv"), _CELL + "h_conv")
             + _conv((*cell, "x_conv"), _CELL + "input_conv"))
  for ours, theirs in (("h_norm", "h_norm"), ("x_norm", "input_norm"),
                       ("c_norm", "cell_norm")):
    name = _CELL + theirs  # RecurrentNorm2d: weight, running_{mean,var}_{t}
    entries.append((("params", *cell, ours, "scale"), name + ".weight", "copy"))
    for stat in ("mean", "var"):
      keys = tuple(f"{name}.running_{stat}_{t}" for t in range(time_steps))
      entries.append((("batch_stats", *cell, ours, stat), keys, "per_step"))
  return entries


def _entries(architecture: str, pretrain: bool, model_config: ml_collections.ConfigDict
             ) -> list:
  """(our leaf path or None to drop, PyTorch key(s), kind) for every state dict entry."""
  if architecture in convert_seq.ARCHITECTURES:
    return convert_seq.entries(architecture, model_config)
  time_steps = model_config.max_seq_len
  if architecture == "UNET3D":
    return _unet3d_entries("")
  h, head = ("params", "head"), []
  if pretrain:
    head = [((*h, "query", "kernel"), "attn_sim.query_conv.weight", "conv1x1"),
            ((*h, "key", "kernel"), "attn_sim.key_conv.weight", "conv1x1"),
            ((*h, "rel_h"), "attn_sim.rel_h", "rel_h"),
            ((*h, "rel_w"), "attn_sim.rel_w", "rel_w")]
  if architecture == "UNET3Df":
    if not pretrain:  # nn.Linear(E, K) on [B, H, W, E]: segmenter.Classifier's 1x1 conv
      head = [((*h, "conv", "kernel"), "linear_out.weight", "linear_as_conv1x1"),
              ((*h, "conv", "bias"), "linear_out.bias", "copy")]
    return _unet3d_entries("backbone.") + head
  classifier = _conv(("head", "conv"), "main_finalconv")  # the Classifier's 3x3 conv
  if pretrain:  # FCN_CRNN builds its classifier in every stage; stage 0 never uses it.
    classifier = [(None, key, kind) for _, key, kind in classifier]
  return _unet2d_convlstm_entries(time_steps) + head + classifier


def _dim(arrays: Mapping[str, np.ndarray], key: str, axis: int, what: str,
         where: str) -> int:
  """arrays[key].shape[axis], or a ValueError saying which entry is missing or bad."""
  if key not in arrays:
    raise ValueError(
        f"The state dict has no {key!r}, which gives {what}, so it is not a {where} "
        f"checkpoint (its first entries: {sorted(arrays)[:5]}). Check architecture "
        "and stage (the original's MODEL.architecture and train_stage: 0 = 'pretrain', "
        "2 = 'finetune').")
  shape = arrays[key].shape
  if len(shape) <= axis:
    raise ValueError(f"{key!r} has shape {shape}, which gives no {what} ({where}).")
  return int(shape[axis])


def _infer_sizes(arrays: Mapping[str, np.ndarray], architecture: str,
                 pretrain: bool, heads: int | None = None) -> dict[str, int]:
  """The model.* sizes that the weights' shapes determine."""
  where = f"{architecture} {'pre-training' if pretrain else 'fine-tuning'}"
  dim = lambda key, axis, what: _dim(arrays, key, axis, what, where)
  if architecture in convert_seq.ARCHITECTURES:
    return convert_seq.infer_sizes(arrays, architecture, dim, heads)
  p = {"UNET3Df": "backbone.", "UNET3D": "", "UNET2D-CLSTM": _UNET2D + "encode."}[
      architecture]
  first = p + ("enc3.encode.0.weight" if architecture == "UNET2D-CLSTM" else "en3.0.weight")
  sizes = dict(num_channels=dim(first, 1, "the input channels"),
               num_features=dim(first, 0, "the features") // 4)
  if architecture == "UNET2D-CLSTM":
    running = _CELL + "h_norm.running_mean_"
    dim(running + "0", 0, "the time steps")  # raises if there is none
    steps = next(t for t in range(len(arrays) + 1) if running + str(t) not in arrays)
    sizes.update(
        max_seq_len=steps,
        emb_channels=dim(_UNET2D + "decode.final.6.weight", 0, "the embedding size"),
        num_classes=dim("main_finalconv.weight", 0, "the classes"))
  else:
    sizes["max_seq_len"] = dim(p + "fn.weight", 1, "the time steps")
    if architecture == "UNET3D":
      sizes["num_classes"] = dim("final.weight", 0, "the classes")
    else:
      sizes["emb_channels"] = dim(p + "final.weight", 0, "the embedding size")
      if not pretrain:
        sizes["num_classes"] = dim("linear_out.weight", 0, "the classes")
  if pretrain:
    sizes.update(
        attn_channels=dim("attn_sim.key_conv.weight", 0, "the attention channels"),
        kernel_size=dim("attn_sim.rel_h", 3, "the CSCL window size"))
  return sizes


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
                     expected: dict[tuple, tuple]
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
    torch_shape, convert = _KINDS[kind]
    want = tuple(torch_shape(expected[path]))
    bad = [k for k in keys if arrays[k].shape != want]
    problems += [f"wrong shape: {k!r} is {arrays[k].shape}, this network needs "
                 f"{want}" for k in bad]
    if not bad:
      leaves[path] = convert([arrays[k] for k in keys], expected[path]).astype(np.float32)
  problems += [f"unexpected: {k!r}" for k in sorted(set(arrays) - used)]
  return leaves, problems


def from_deepsat(state_dict: Mapping[str, Any], architecture: str, stage: str, *,
                 stride: int = 1, dilation: int = 1, groups: int = 1,
                 norm_emb: bool = True, img_res: int | None = None,
                 num_classes: int | None = None, heads: int | None = None
                 ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """Converts a DeepSatModels state dict to our model config and variables.

  Args:
    state_dict: the original network's `state_dict()`: names -> numpy arrays (or CPU
      tensors), buffers included, without a "module." prefix.
    architecture: the original's MODEL.architecture: "UNET3Df", "UNET3D",
      "UNET2D-CLSTM", "ConvBiRNN" (backbone "ConvGRU") or "TSViT".
    stage: "pretrain" (train_stage 0: encoder + CSCL head) or "finetune" /
      "supervised" (train_stage 2: encoder + classifier; UNET3D, ConvBiRNN, TSViT:
      the network itself).
    stride: MODEL.cscl_win_stride (not in the weights).
    dilation: MODEL.cscl_win_dilation (not in the weights).
    groups: MODEL.attn_groups (not in the weights).
    norm_emb: MODEL.norm_emb; True as in the paper's configs (the original code
      defaults to False where a config omits it).
    img_res: MODEL.img_res; default 48 (UNET3D*, ConvBiRNN) or 24 (UNET2D-CLSTM);
      TSViT's weights tell it (checked against this if given).
    num_classes: MODEL.num_classes; needed only where the weights do not tell it
      (UNET3Df pre-training), checked against them elsewhere.
    heads: TSViT's MODEL.heads (the weights give only heads x dim_head); default 4.

  Returns:
    (model_config, variables): config.model for `models.create_model`, and
    {"params": ..., "batch_stats": ...} in its layout, float32 numpy leaves.

  Raises:
    ValueError: for an unknown architecture or stage, or naming the entries that are
      missing, unexpected or of the wrong shape.
  """
  if architecture not in ARCHITECTURES:
    raise ValueError(f"architecture={architecture!r}; choose one of "
                     f"{sorted(ARCHITECTURES)} (the original's MODEL.architecture).")
  # "pretrain" is the original's train_stage 0; "finetune" / "supervised" are train_stage 2
  # (for UNET3D, which has no stages, the network itself).
  allowed = (segmenter.STAGES[1:] if architecture in _SUPERVISED_ONLY
             else segmenter.STAGES)
  if stage not in allowed:
    raise ValueError(f"stage={stage!r} for {architecture}; choose one of {allowed} "
                     "('pretrain' is the original's train_stage 0, 'finetune' stage 2).")
  arrays = {k: np.asarray(v) for k, v in state_dict.items()}
  pretrain = stage == "pretrain"
  name, default_res = ARCHITECTURES[architecture]
  sizes = _infer_sizes(arrays, architecture, pretrain, heads)
  if num_classes is not None:
    if sizes.get("num_classes", num_classes) != num_classes:
      raise ValueError(f"num_classes={num_classes} but the classifier in the weights "
                       f"has {sizes['num_classes']} outputs.")
    sizes["num_classes"] = num_classes
  if img_res is not None and sizes.setdefault("img_res", img_res) != img_res:
    raise ValueError(f"img_res={img_res} but the spatial position embedding in the "
                     f"weights is for {sizes['img_res']}x{sizes['img_res']} images.")
  # Only what the weights and the arguments tell: a run's config.model takes these over.
  model_config = ml_collections.ConfigDict(dict(
      name=name, stage=stage, img_res=default_res, stride=stride, dilation=dilation,
      groups=groups, norm_emb=norm_emb))
  model_config.update(sizes)
  entries = _entries(architecture, pretrain, model_config)
  return model_config, build_variables(arrays, entries, model_config,
                                       f"{architecture} ({stage})", sizes)


def build_variables(arrays: Mapping[str, np.ndarray], entries: list,
                    model_config: ml_collections.ConfigDict, network: str,
                    sizes: Mapping[str, int]) -> dict[str, Any]:
  """The variables of `models.create_model(model_config)` from a state dict's arrays.

  Args:
    arrays: PyTorch names -> numpy arrays.
    entries: (our leaf path or None to drop, PyTorch key(s), kind of `_KINDS`) for every
      entry of the state dict.
    model_config: the network the arrays are converted for.
    network: its name for messages, e.g. "UNET3Df (pretrain)".
    sizes: the model fields inferred from the arrays, for messages.

  Returns:
    {"params": ..., "batch_stats": ...}, float32 numpy leaves.

  Raises:
    ValueError: naming every missing, unexpected or misshapen entry.
  """
  expected = _variable_shapes(model_config)
  leaves, problems = _convert_entries(arrays, entries, expected)
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


def convert_checkpoint(checkpoint: str, workdir: str, architecture: str, stage: str,
                       **options) -> ml_collections.ConfigDict:
  """Converts a .pth into `<workdir>/checkpoints/0` (+ config.json) for config.init_from.

  Args:
    checkpoint: the .pth file.
    workdir: a new directory; `--config.init_from=<workdir>` then loads its encoder.
    architecture: the original's MODEL.architecture.
    stage: "pretrain", "finetune" or "supervised" (see `from_deepsat`).
    **options: keyword arguments of `from_deepsat` (stride, dilation, groups, ...).

  Returns:
    {"model": the converted network's config.model}, as written to config.json.
  """
  model_config, variables = from_deepsat(load_state_dict(checkpoint), architecture, stage,
                                         **options)
  return save_converted(workdir, model_config, variables)


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


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: see the module docstring; flags are named after the original's keys."""
  parser = argparse.ArgumentParser(prog="python -m cscl_jax.convert",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help=".pth saved by the original code")
  parser.add_argument("--architecture", required=True, choices=sorted(ARCHITECTURES))
  parser.add_argument("--stage", required=True, choices=segmenter.STAGES,
                      help="pretrain = train_stage 0, finetune = train_stage 2")
  parser.add_argument("--workdir", required=True, help="new directory for the checkpoint")
  parser.add_argument("--cscl_win_stride", type=int, default=1)
  parser.add_argument("--cscl_win_dilation", type=int, default=1)
  parser.add_argument("--attn_groups", type=int, default=1)
  parser.add_argument("--norm_emb", choices=("true", "false"), default="true")
  parser.add_argument("--img_res", type=int, default=None)
  parser.add_argument("--num_classes", type=int, default=None)
  parser.add_argument("--heads", type=int, default=None, help="TSViT: MODEL.heads (4)")
  args = parser.parse_args(argv)
  config = convert_checkpoint(
      args.checkpoint, args.workdir, args.architecture, args.stage,
      stride=args.cscl_win_stride, dilation=args.cscl_win_dilation, groups=args.attn_groups,
      norm_emb=args.norm_emb == "true", img_res=args.img_res, num_classes=args.num_classes,
      heads=args.heads)
  print(next_steps(args.workdir, config))


def next_steps(workdir: str, config: ml_collections.ConfigDict) -> str:
  """What was written and the --config flags that fine-tuning from it needs."""
  fields = " ".join(f"--config.model.{k}={v}" for k, v in sorted(config.model.items())
                    if k != "stage")
  return (f"Wrote {os.path.join(workdir, checkpoints.CHECKPOINT_DIR)} (step 0) and "
          f"{checkpoints.CONFIG_FILE}. Fine-tune with --config.init_from={workdir} "
          f"and the same model fields: {fields}")


if __name__ == "__main__":
  main()
