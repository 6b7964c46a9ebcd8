"""CSCL pre-training of the UNet3Df encoder (SPEC.md §3 "pretrain"; the paper's settings).

  python -m cscl_jax.main --config=configs/pretrain.py --workdir=workdirs/pretrain

`:quick` is a small run that finishes in a few minutes on 2 CPU cores (the `small`
synthetic dataset, 24x24 random crops, 8 dates, a narrow UNet3Df) and still shows the loss
falling:

  python -m cscl_jax.main --config=configs/pretrain.py:quick --workdir=workdirs/pretrain_quick

`:utae` puts U-TAE (the original's PASTIS widths, f = 16) in place of UNet3Df, and
`:utae_quick` is `:quick` with a narrow U-TAE (f = 4):

  python -m cscl_jax.main --config=configs/pretrain.py:utae_quick \
      --workdir=workdirs/pretrain_utae_quick

`:t31tfm` is the paper's France benchmark (T31TFM_1618, downloaded by hand, see README.md):

  python -m cscl_jax.main --config=configs/pretrain.py:t31tfm --workdir=workdirs/pretrain_fr \
      --config.dataset.manual_dir=/path/to/T31TFM_1618
"""

import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """Returns the pre-training config of `variant` (see the module docstring)."""
  config = common.get_config()
  config.model.stage = "pretrain"
  config.num_epochs = 50  # Reference France CSCL config.
  if variant.startswith("utae"):
    config.model.name = "utae"  # num_features f = 16: the original's PASTIS widths.
  if variant in ("quick", "utae_quick"):
    config.dataset.config = "small"
    config.model.img_res = 24
    config.model.max_seq_len = 8
    # U-TAE's 16 attention heads need f divisible by 4.
    config.model.num_features = 4 if variant == "utae_quick" else 2
    config.model.emb_channels = 32
    config.model.attn_channels = 32
    config.batch_size = 8
    config.num_train_steps = 150
    config.log_every_steps = 15
    config.eval_every_steps = 75
    config.checkpoint_every_steps = 75
  elif variant == "t31tfm":
    config.dataset.name = "t31tfm_1618"
    config.dataset.config = "default"
    config.dataset.time_sampling = "first"  # the reference keeps the first T dates
    config.model.num_classes = 20
  elif variant not in ("", "utae"):
    raise ValueError(f"Unknown variant {variant!r} of configs/pretrain.py; use '', 'quick', "
                     "'t31tfm', 'utae' or 'utae_quick'.")
  return config
