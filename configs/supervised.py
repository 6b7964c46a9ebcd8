"""Supervised baseline: UNet3D trained from scratch with cross-entropy (SPEC.md §2, §3).

  python -m cscl_jax.main --config=configs/supervised.py --workdir=workdirs/supervised

Same data, schedule and evaluation as configs/finetune.py (same variant), so its metrics
compare directly with the CSCL pre-trained model's. Quick version:

  python -m cscl_jax.main --config=configs/supervised.py:quick \
      --workdir=workdirs/supervised_quick

UNet3D is UNet3Df's baseline; the other encoders (`:quick_biconvgru`, `:quick_tsvit`, or
--config.model.name=...) are their own baseline, trained from scratch with their classifier.
"""

import ml_collections

from configs import finetune


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """Returns the supervised baseline config; variant as in configs/pretrain.py."""
  config = finetune.get_config(variant)
  if config.model.name == "unet3df":  # UNet3Df's baseline; the others keep their own.
    config.model.name = "unet3d"
  config.model.stage = "supervised"
  return config
