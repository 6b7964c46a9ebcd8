"""Import checkpoints of the reference PyTorch code (michaeltrs/DeepSatModels).

  python -m cscl_jax.convert --checkpoint=UNET3Df_CSCL_50_60000.pth \
      --architecture=UNET3Df --stage=pretrain --workdir=workdirs/from_torch
  python -m cscl_jax.main --config=configs/finetune.py --workdir=workdirs/finetune \
      --config.init_from=workdirs/from_torch

`from_deepsat(state_dict, architecture, stage)` takes the original networks'
`state_dict()` (parameter AND buffer names exactly as PyTorch names them, values as
numpy arrays) and returns the `config.model` that builds the same network here
(`models.create_model`) with its variables {"params", "batch_stats"}. Sizes are read off
the arrays' shapes (UNET3Df's output_magnification from its conv_out_x2 / conv_out_x4
up-blocks); what shapes cannot tell (the CSCL window's stride and dilation,
attention groups, norm_emb, image size, and the classes of a UNET3Df pre-training
checkpoint, which has no classifier) are keyword arguments. Every entry is used once or
dropped on purpose (BatchNorm `num_batches_tracked`; the classifier UNET2D-CLSTM builds
but never uses in pre-training); a missing, unexpected or misshapen entry is an error
that names it.

Layouts (`state_dicts` for convolutions and Linear): the CSCL head's 1x1 convs -> Dense
kernels; rel_h [A/2, 1, 1, k, 1] and rel_w [A/2, 1, 1, 1, k] -> [A/2, k];
RecurrentNorm2d's running_mean_{t} -> mean [T, C].
"""

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from cscl_jax import convert_seq
from cscl_jax import state_dicts
from cscl_jax.models import segmenter

# Original MODEL.architecture -> (our model.name, reference image size).
ARCHITECTURES = {"UNET3Df": ("unet3df", 48), "UNET3D": ("unet3d", 48),
                 "UNET2D-CLSTM": ("unet2d_convlstm", 24), **convert_seq.ARCHITECTURES}
# Supervised networks of the original code: no CSCL pre-training stage.
_SUPERVISED_ONLY = ("UNET3D", *convert_seq.ARCHITECTURES)
_UNET2D = "fcn.unet_"
_CELL = "crnn_main.clstm.cell_list.0."

# The kinds of the DeepSatModels networks beyond `state_dicts.KINDS`.
_KINDS = {
    **state_dicts.KINDS,
    "rel_h": (lambda s: (s[0], 1, 1, s[1], 1), lambda a, s: a[0].reshape(s)),
    "rel_w": (lambda s: (s[0], 1, 1, 1, s[1]), lambda a, s: a[0].reshape(s)),
    "per_step": (lambda s: s[1:], lambda a, s: np.stack(a)),
    **convert_seq.KINDS,
}


# The name-table helpers, short, so that the tables below read like the original modules.
_conv, _norm, _block, _conv_norm = (state_dicts.conv, state_dicts.norm, state_dicts.block,
                                   state_dicts.conv_norm)


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


def _up_block_entries(magnification: int) -> list:
  """UNet3D_CSCL's conv_out_x2 / conv_out_x4 (ConvTranspose2d, BatchNorm2d, LeakyReLU)."""
  return [entry for m in (2, 4)[:magnification // 2]
          for entry in (_conv(("encoder", f"conv_out_x{m}", "up"), f"conv_out_x{m}.0")
                        + _norm(("encoder", f"conv_out_x{m}", "norm"), f"conv_out_x{m}.1"))]


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
    magnification = model_config.get("output_magnification", 1)
    return _unet3d_entries("backbone.") + _up_block_entries(magnification) + head
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
      # The up-blocks the original builds for output_magnification 2 (one) or 4 (two).
      sizes["output_magnification"] = max(
          [m for m in (2, 4) if f"conv_out_x{m}.0.weight" in arrays], default=1)
      if not pretrain:
        sizes["num_classes"] = dim("linear_out.weight", 0, "the classes")
  if pretrain:
    sizes.update(
        attn_channels=dim("attn_sim.key_conv.weight", 0, "the attention channels"),
        kernel_size=dim("attn_sim.rel_h", 3, "the CSCL window size"))
  return sizes


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
      groups=groups, norm_emb=norm_emb, output_magnification=1))
  model_config.update(sizes)
  entries = _entries(architecture, pretrain, model_config)
  return model_config, state_dicts.build_variables(
      arrays, entries, model_config, f"{architecture} ({stage})", sizes, _KINDS)


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
  model_config, variables = from_deepsat(state_dicts.load_state_dict(checkpoint),
                                         architecture, stage, **options)
  return state_dicts.save_converted(workdir, model_config, variables)


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
  print(state_dicts.next_steps(args.workdir, config))


if __name__ == "__main__":
  main()
