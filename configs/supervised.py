"""Supervised baseline: UNet3D trained from scratch with cross-entropy (SPEC.md §2, §3).

For the `utae` variants the baseline is U-TAE itself (encoder + the original's classifier)
trained from scratch.

  python -m cscl_jax.main --config=configs/supervised.py --workdir=workdirs/supervised

Same data, schedule and evaluation as configs/finetune.py (same variant), so its metrics
compare directly with the CSCL pre-trained model's. Quick version:

  python -m cscl_jax.main --config=configs/supervised.py:quick \
      --workdir=workdirs/supervised_quick
"""

import ml_collections

from configs import finetune


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """Returns the supervised baseline config of `variant` (those of configs/pretrain.py)."""
  config = finetune.get_config(variant)
  if config.model.name == "unet3df":
    config.model.name = "unet3d"  # The paper's baseline; other encoders are their own.
  config.model.stage = "supervised"
  return config
