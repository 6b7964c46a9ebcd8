"""The PyTorch original's training step, for side-by-side timing with ours.

Builds the reference network as DeepSatModels does (tests/torch_reference.py: the
PyTorch rebuild with the original's state_dict names that the parity tests check
ours against), converts its weights with `cscl_jax.convert.from_deepsat` so both sides
start from identical parameters, and returns a closure running one PyTorch training
step as the original's loop does: forward in train mode, the loss, backward, Adam.

Needs the test extra (`pip install -r requirements-test.txt`); callers import this
module only when asked for the PyTorch column.
"""

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import torch
import torch.nn.functional as F

from cscl_jax import convert
from cscl_jax import cscl
from tests import torch_reference

ARCHITECTURES = {"unet3df": "UNET3Df", "unet3d": "UNET3D", "unet2d_convlstm": "UNET2D-CLSTM"}


def _network(config: ml_collections.ConfigDict) -> torch.nn.Module:
  m = config.model
  stage = 0 if m.stage == "pretrain" else 2
  if m.name == "unet3df":
    return torch_reference.UNet3DCSCL(stage, m.num_channels, m.max_seq_len, m.num_features,
                                      m.num_classes, m.attn_channels, m.kernel_size)
  if m.name == "unet3d":
    return torch_reference.UNet3D(m.num_channels, m.num_classes, m.max_seq_len,
                                  m.num_features)
  return torch_reference.FCNCRNN(stage, m.num_channels, m.max_seq_len, m.num_classes,
                                 m.num_features, m.emb_channels, m.attn_channels,
                                 m.kernel_size)


def build(config: ml_collections.ConfigDict, batch: dict[str, np.ndarray]
          ) -> tuple[dict[str, Any], Callable[[], float]]:
  """Our variables converted from a fresh original network, and its training step.

  Args:
    config: the run's config (model, cscl loss, learning rate).
    batch: one device's batch at [0]: inputs [D, b, T, H, W, C], labels, valid.

  Returns:
    (variables for our model, a closure running one PyTorch step and returning its loss).
  """
  m = config.model
  net = _network(config)
  state_dict = {k: v.numpy() for k, v in net.state_dict().items()}
  _, variables = convert.from_deepsat(state_dict, ARCHITECTURES[m.name], m.stage,
                                      img_res=m.img_res, num_classes=m.num_classes)
  x = torch.from_numpy(batch["inputs"][0])
  labels = batch["labels"][0]
  known = torch.from_numpy(batch["valid"][0] & (labels < m.num_classes))
  if m.stage == "pretrain":  # the original builds the CSCL targets the same way
    target = torch.from_numpy(np.asarray(jax.device_get(cscl.cscl_labels(
        labels, kernel_size=m.kernel_size, stride=m.stride, dilation=m.dilation))))
  targets = torch.from_numpy(np.where(labels < m.num_classes, labels, 0)).long()
  optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
  net.train()

  def step() -> float:
    optimizer.zero_grad()
    out = net(x)
    if m.stage == "pretrain":
      w = config.cscl.pos_weight
      loss = torch.mean(-w * target * out + (1 - target) * out)
    else:
      ce = F.cross_entropy(out, targets, reduction="none")  # [b, H, W]
      loss = (ce * known).sum() / known.sum().clamp(min=1)
    loss.backward()
    optimizer.step()
    return float(loss)

  return variables, step
