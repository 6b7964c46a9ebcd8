"""The DeepSatModels state-dict names of BiConvGRU and TSViT, for `convert.from_deepsat`.

Both originals are supervised networks (no CSCL stage): their checkpoints convert to
stage "finetune" / "supervised". Entries are (our leaf path or None, PyTorch key(s),
kind) as in `state_dicts`; the kinds used here beyond `state_dicts.KINDS` are

  squeeze0   a learned [1, ...] tensor (class tokens, spatial positions) -> [...]
  doy_rows   TSViT's Linear(366, dim) weight [dim, 366] -> our day table [366, dim], rows
             re-indexed: the original looks up row trunc(x * 365.0001) of the doy channel
             x = float32(doy) / 365.0001 (its PASTIS pipeline, and ours), which float32
             round-off makes the day before for 19 days; we look up row round(...) = doy,
             so our row d is the original's row `original_day_rows()[d]`. The original's
             rows that no day reaches (never trained) are dropped.
"""

from collections.abc import Callable, Mapping

import numpy as np

from cscl_jax.models import dates

# Original MODEL.architecture -> (our model.name, reference image size).
ARCHITECTURES = {"ConvBiRNN": ("biconvgru", 48), "TSViT": ("tsvit", 24)}
DEFAULT_HEADS = 4  # TSViT heads: every reference config; shapes give only heads * dim_head.


def original_day_rows() -> np.ndarray:
  """int [366]: the original's table row for each day 0..365 of our pipeline's inputs."""
  days = np.arange(dates.NUM_DAYS, dtype=np.float32)
  scale = np.float32(dates.DOY_SCALE)
  return np.minimum(np.trunc((days / scale) * scale), dates.NUM_DAYS - 1).astype(int)


KINDS = {
    "squeeze0": (lambda s: (1, *s), lambda a, s: a[0][0]),
    "doy_rows": (lambda s: (s[1], s[0]), lambda a, s: a[0].T[original_day_rows()]),
}


def _weight_bias(path: tuple, name: str, weight_kind: str = "kernel") -> list:
  return [(("params", "encoder", *path, "kernel"), name + ".weight", weight_kind),
          (("params", "encoder", *path, "bias"), name + ".bias", "copy")]


def _layer_norm(path: tuple, name: str) -> list:
  return [(("params", "encoder", *path, "scale"), name + ".weight", "copy"),
          (("params", "encoder", *path, "bias"), name + ".bias", "copy")]


def _biconvgru_entries() -> list:
  entries = _weight_bias(("inconv",), "inconv")
  for ours, theirs in (("forward", "forward_model"), ("backward", "backward_model")):
    for gate in ("reset_gate", "update_gate", "out_gate"):
      entries += _weight_bias((ours, gate), f"{theirs}.cell_list.0.{gate}")
  head = [(("params", "head", "conv", "kernel"), "outconv.weight", "kernel"),
          (("params", "head", "conv", "bias"), "outconv.bias", "copy")]
  return entries + head


def _transformer_entries(ours: str, theirs: str, depth: int, project_out: bool) -> list:
  entries = []
  for i in range(depth):
    layer = f"{theirs}.layers.{i}"
    entries += _layer_norm((ours, f"attn_norm{i}"), f"{layer}.0.norm")
    entries.append((("params", "encoder", ours, f"attn{i}", "to_qkv", "kernel"),
                    f"{layer}.0.fn.to_qkv.weight", "kernel"))
    if project_out:
      entries += _weight_bias((ours, f"attn{i}", "to_out"), f"{layer}.0.fn.to_out.0")
    entries += _layer_norm((ours, f"mlp_norm{i}"), f"{layer}.1.norm")
    entries += _weight_bias((ours, f"mlp{i}_in"), f"{layer}.1.fn.net.0")
    entries += _weight_bias((ours, f"mlp{i}_out"), f"{layer}.1.fn.net.3")
  return entries + _layer_norm((ours, "norm"), f"{theirs}.norm")


def _tsvit_entries(sizes: Mapping[str, int]) -> list:
  project_out = not (sizes["heads"] == 1 and sizes["dim_head"] == sizes["dim"])
  e = ("params", "encoder")
  return (_weight_bias(("patch_embedding",), "to_patch_embedding.1")
          + _weight_bias(("temporal_embedding",), "to_temporal_embedding_input", "doy_rows")
          + [((*e, "temporal_token"), "temporal_token", "squeeze0"),
             ((*e, "space_pos_embedding"), "space_pos_embedding", "squeeze0")]
          + _transformer_entries("temporal_transformer", "temporal_transformer",
                                 sizes["temporal_depth"], project_out)
          + _transformer_entries("space_transformer", "space_transformer",
                                 sizes["spatial_depth"], project_out)
          + _layer_norm(("head_norm",), "mlp_head.0")
          + _weight_bias(("head",), "mlp_head.1"))


def entries(architecture: str, sizes: Mapping[str, int]) -> list:
  """Every state dict entry of `architecture` with `sizes` (from `infer_sizes`)."""
  return _biconvgru_entries() if architecture == "ConvBiRNN" else _tsvit_entries(sizes)


def _depth(arrays: Mapping[str, np.ndarray], prefix: str) -> int:
  return next(i for i in range(len(arrays) + 1)
              if f"{prefix}.layers.{i}.0.norm.weight" not in arrays)


def infer_sizes(arrays: Mapping[str, np.ndarray], architecture: str,
                dim: Callable[[str, int, str], int], heads: int | None) -> dict[str, int]:
  """The model.* sizes the weights' shapes determine (plus TSViT's `heads`).

  Args:
    arrays: the state dict.
    architecture: "ConvBiRNN" or "TSViT".
    dim: (key, axis, what) -> arrays[key].shape[axis], raising a ValueError that names
      a missing entry.
    heads: TSViT attention heads (not in the shapes); None: DEFAULT_HEADS.
  """
  if architecture == "ConvBiRNN":
    return dict(
        num_channels=dim("inconv.weight", 1, "the input channels"),
        conv3d_dim=dim("inconv.weight", 0, "the input convolution's width"),
        rnn_hidden_dim=dim("forward_model.cell_list.0.update_gate.weight", 0,
                           "the hidden channels"),
        num_classes=dim("outconv.weight", 0, "the classes"))
  width = dim("to_patch_embedding.1.weight", 0, "the token width")
  patch = round(dim("mlp_head.1.weight", 0, "the patch size") ** 0.5)
  grid = round(dim("space_pos_embedding", 1, "the patches") ** 0.5)
  inner = dim("temporal_transformer.layers.0.0.fn.to_qkv.weight", 0, "the heads") // 3
  heads = heads or (1 if inner == width and "temporal_transformer.layers.0.0.fn.to_out.0."
                    "weight" not in arrays else DEFAULT_HEADS)
  if inner % heads:
    raise ValueError(f"heads={heads} does not divide the attention width {inner}.")
  return dict(
      num_channels=dim("to_patch_embedding.1.weight", 1, "the input channels")
      // patch ** 2 + 1,
      num_classes=dim("temporal_token", 1, "the classes"), img_res=grid * patch,
      patch_size=patch, dim=width, heads=heads, dim_head=inner // heads,
      scale_dim=dim("temporal_transformer.layers.0.1.fn.net.0.weight", 0, "the MLP width")
      // width,
      temporal_depth=_depth(arrays, "temporal_transformer"),
      spatial_depth=_depth(arrays, "space_transformer"))
