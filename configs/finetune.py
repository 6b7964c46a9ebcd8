"""Fine-tuning a CSCL pre-trained UNet3Df encoder with a new per-pixel classifier.

  python -m cscl_jax.main --config=configs/finetune.py --workdir=workdirs/finetune \
      --config.init_from=workdirs/pretrain

The model fields are those of configs/pretrain.py (same variant), so the pre-trained
encoder fits; the learning-rate schedule starts afresh. Quick version, after the quick
pre-training:

  python -m cscl_jax.main --config=configs/finetune.py:quick \
      --workdir=workdirs/finetune_quick --config.init_from=workdirs/pretrain_quick
"""

import ml_collections

from configs import pretrain


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """Returns the fine-tuning config; variant as in configs/pretrain.py."""
  config = pretrain.get_config(variant)
  config.model.stage = "finetune"
  config.num_epochs = 75  # Reference France UNet3Df config.
  return config
