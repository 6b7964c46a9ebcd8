"""Import U-TAE checkpoints of utae-paps (VSainteuf/utae-paps): the published PASTIS weights.

  python -m cscl_jax.convert_utae --checkpoint=UTAE_zenodo/Fold_1/model.pth.tar \
      --workdir=workdirs/utae_fold1
  python -m cscl_jax.main --config=configs/finetune.py:utae --workdir=workdirs/utae_ft \
      --config.init_from=workdirs/utae_fold1

`from_utae(state_dict)` takes the original `UTAE.state_dict()` (utae-paps saves it under
"state_dict" in its `model.pth.tar`; `state_dicts.load_state_dict` unwraps that and a "module."
prefix) and returns the `config.model` of the same network here (name "utae": the U-TAE
encoder with the original's out_conv as the classifier head) and its variables. The widths
come from the weights (f = encoder_widths[0] / 4; PASTIS: f = 16, 10 bands + day of year =
11 channels, 20 classes); every entry is used, and a missing, unexpected or misshapen one is
an error naming it (`state_dicts.build_variables`).

Dates: our inputs carry the day of year (doy / 365.0001); the published PASTIS weights were
trained with days since 2018-09-01 as the dates, so feed their dates that way to reproduce
their outputs, or fine-tune.
"""

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from cscl_jax import state_dicts

STAGES = ("finetune", "supervised")  # The checkpoints hold encoder + classifier.
_DOWN_LEVELS = 3  # models.create_model's U-TAE: four levels, three strided convs.
_LTAE = "temporal_encoder."
# The name-table helpers, short, so that the table below reads like the original modules.
_conv, _norm, _block = state_dicts.conv, state_dicts.norm, state_dicts.block


def _entries() -> list:
  """(our leaf path, utae-paps key, kind) for every entry of UTAE.state_dict()."""
  e, t = ("encoder",), ("encoder", "temporal_encoder")
  entries = _block((*e, "in_conv"), "in_conv.conv.conv", 2, running=False)
  for i in range(_DOWN_LEVELS):
    name = f"down_blocks.{i}."
    for part in ("down", "conv1", "conv2"):
      entries += _block((*e, f"down{i}", part), f"{name}{part}.conv", 1, running=False)
  for i in range(_DOWN_LEVELS):
    p, name = (*e, f"up{i}"), f"up_blocks.{i}."
    entries += (_conv((*p, "skip_conv"), name + "skip_conv.0")
                + _norm((*p, "skip_norm"), name + "skip_conv.1")
                + _conv((*p, "up"), name + "up.0") + _norm((*p, "up_norm"), name + "up.1")
                + _block((*p, "conv1"), name + "conv1.conv", 1)
                + _block((*p, "conv2"), name + "conv2.conv", 1))
  entries += (_norm((*t, "in_norm"), _LTAE + "in_norm", running=False)
              + [(("params", *t, "inconv", "kernel"), _LTAE + "inconv.weight",
                  "conv1d_as_dense"),
                 (("params", *t, "inconv", "bias"), _LTAE + "inconv.bias", "copy"),
                 (("params", *t, "query"), _LTAE + "attention_heads.Q", "copy")]
              + _conv((*t, "fc1_k"), _LTAE + "attention_heads.fc1_k")
              + _conv((*t, "mlp"), _LTAE + "mlp.0") + _norm((*t, "mlp_norm"), _LTAE + "mlp.1")
              + _norm((*t, "out_norm"), _LTAE + "out_norm", running=False))
  return entries + _block(("head",), "out_conv.conv.conv", 2)


def _infer_sizes(arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
  """num_channels, num_features and num_classes from the first and last convs."""
  sizes = {}
  for key, fields in (("in_conv.conv.conv.0.weight", "num_features/num_channels"),
                      ("out_conv.conv.conv.3.weight", "num_classes")):
    if key not in arrays or arrays[key].ndim != 4:
      raise ValueError(
          f"The state dict has no 4-D {key!r}, which gives {fields}, so it is not a "
          f"utae-paps UTAE (its first entries: {sorted(arrays)[:5]}); pass the 'state_dict' "
          "of a U-TAE model.pth.tar (agg_mode att_group, 4 levels, out_conv of 2 layers).")
  width, bands = arrays["in_conv.conv.conv.0.weight"].shape[:2]
  if width % 4:
    raise ValueError(f"The first encoder width {width} is not 4 f for an integer f.")
  sizes.update(num_features=width // 4, num_channels=bands + 1,
               num_classes=arrays["out_conv.conv.conv.3.weight"].shape[0])
  return sizes


def from_utae(state_dict: Mapping[str, Any], *, stage: str = "finetune", img_res: int = 128,
              max_seq_len: int | None = None
              ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """Converts a utae-paps UTAE state dict to our model config and variables.

  Args:
    state_dict: UTAE.state_dict(): names -> numpy arrays (or CPU tensors), buffers
      included, without a "module." prefix.
    stage: "finetune" or "supervised" (the same network: encoder + out_conv head).
    img_res: model.img_res (PASTIS: 128); not in the weights.
    max_seq_len: model.max_seq_len, the dates per input; not in the weights (U-TAE takes
      any number); default: none, the run's config gives it.

  Returns:
    (model_config, variables): config.model for `models.create_model`, and
    {"params": ..., "batch_stats": ...} in its layout, float32 numpy leaves.

  Raises:
    ValueError: for another stage or network, naming the entries that do not fit.
  """
  if stage not in STAGES:
    raise ValueError(f"stage={stage!r}; a U-TAE checkpoint holds encoder + classifier: "
                     f"choose one of {STAGES} (fine-tuning reads its encoder).")
  arrays = {k: np.asarray(v) for k, v in state_dict.items()}
  sizes = _infer_sizes(arrays)
  # Only what the weights and the arguments tell: a run's config.model takes these over.
  model_config = ml_collections.ConfigDict(dict(name="utae", stage=stage, img_res=img_res,
                                                output_magnification=1, **sizes))
  if max_seq_len is not None:
    model_config.max_seq_len = max_seq_len
  return model_config, state_dicts.build_variables(arrays, _entries(), model_config,
                                                   f"U-TAE ({stage})", sizes)


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: see the module docstring."""
  parser = argparse.ArgumentParser(prog="python -m cscl_jax.convert_utae",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True,
                      help="utae-paps model.pth.tar (or a .pth of UTAE.state_dict())")
  parser.add_argument("--workdir", required=True, help="new directory for the checkpoint")
  parser.add_argument("--img_res", type=int, default=128)
  parser.add_argument("--max_seq_len", type=int, default=None)
  args = parser.parse_args(argv)
  model_config, variables = from_utae(state_dicts.load_state_dict(args.checkpoint),
                                      img_res=args.img_res, max_seq_len=args.max_seq_len)
  config = state_dicts.save_converted(args.workdir, model_config, variables)
  print(state_dicts.next_steps(args.workdir, config))


if __name__ == "__main__":
  main()
