"""CSCL pre-training of the UNet3Df encoder (SPEC.md §3 "pretrain"; the paper's settings).

  python -m cscl_jax.main --config=configs/pretrain.py --workdir=workdirs/pretrain

`:quick` is a small run that finishes in a few minutes on 2 CPU cores (the `small`
synthetic dataset, 24x24 random crops, 8 dates, a narrow UNet3Df) and still shows the loss
falling:

  python -m cscl_jax.main --config=configs/pretrain.py:quick --workdir=workdirs/pretrain_quick

`:quick_biconvgru`, `:quick_tsvit` and `:quick_utae` are the same quick run with a narrow
BiConvGRU, TSViT or U-TAE (model.name overridden; finetune.py and supervised.py take the
same variants):

  python -m cscl_jax.main --config=configs/pretrain.py:quick_tsvit --workdir=workdirs/pre_tsvit

`:t31tfm` is the paper's France benchmark (T31TFM_1618, downloaded by hand, see README.md):

  python -m cscl_jax.main --config=configs/pretrain.py:t31tfm --workdir=workdirs/pretrain_fr \
      --config.dataset.manual_dir=/path/to/T31TFM_1618

`:pastis` is PASTIS24 as TSViT uses it (24x24 windows of the 10-band PASTIS patches, the first
T = 60 dates, 19 classes with void unknown; the UNet3Df encoder), on the split that tests on
Fold 1 (--config.dataset.config=fold<k>_24x24 for the others). Inputs are reflectance x 1e-4
as for every dataset here; TSViT standardises PASTIS with per-band means and deviations:

  python -m cscl_jax.main --config=configs/pretrain.py:pastis --workdir=workdirs/pretrain_pastis \
      --config.dataset.manual_dir=/path/to/PASTIS

`:mtlcc` is the reference's MTLCC (Germany) set-up (2016 tiles of 24x24, T = 16, 17 classes;
the UNet2D-ConvLSTM encoder). The reference draws 16 random dates per sample; here they are
spread evenly. It evaluates on the `validation` split (test_fold0); the published numbers are
on `test` (eval.tileids): --config.dataset.eval_split=test.

  python -m cscl_jax.main --config=configs/pretrain.py:mtlcc --workdir=workdirs/pretrain_mtlcc \
      --config.dataset.manual_dir=/path/to/MTLCC
"""

import ml_collections

from configs import common

# Narrow versions of the other encoders for the quick run: variant "quick_<name>".
QUICK_MODELS = {
    "biconvgru": dict(conv3d_dim=16, rnn_hidden_dim=32),
    "tsvit": dict(patch_size=2, dim=32, temporal_depth=2, spatial_depth=2, heads=2,
                  dim_head=16, scale_dim=2),
    "utae": dict(num_features=4),  # widths [16, 16, 16, 32]; its 16 heads need 4 | f
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """Returns the pre-training config.

  Args:
    variant: "", "quick", "quick_<encoder>" (QUICK_MODELS), "t31tfm", "pastis" or "mtlcc".
  """
  config = common.get_config()
  config.model.stage = "pretrain"
  config.num_epochs = 50  # Reference France CSCL config.
  quick_model = variant[len("quick_"):] if variant.startswith("quick_") else None
  if variant == "quick" or quick_model in QUICK_MODELS:
    config.dataset.config = "small"
    config.model.img_res = 24
    config.model.max_seq_len = 8
    config.model.num_features = 2
    config.model.emb_channels = 32
    config.model.attn_channels = 32
    config.batch_size = 8
    config.num_train_steps = 150
    config.log_every_steps = 15
    config.eval_every_steps = 75
    config.checkpoint_every_steps = 75
    if quick_model:
      config.model.name = quick_model
      config.model.update(QUICK_MODELS[quick_model])
  elif variant == "t31tfm":
    config.dataset.name = "t31tfm_1618"
    config.dataset.config = "default"
    config.dataset.time_sampling = "first"  # the reference keeps the first T dates
    config.model.num_classes = 20
  elif variant == "pastis":
    config.dataset.name = "pastis"
    config.dataset.config = "fold1_24x24"
    config.dataset.time_sampling = "first"  # TSViT's PASTIS24: the first T dates
    config.model.num_channels = 11  # B02 B03 B04 B05 B06 B07 B08 B8A B11 B12 + day of year
    config.model.img_res = 24
    config.model.max_seq_len = 60
    config.model.num_classes = 19  # background + 18 crops; void = unknown
  elif variant == "mtlcc":
    config.dataset.name = "mtlcc"
    config.dataset.config = "data16"
    config.model.name = "unet2d_convlstm"
    config.model.num_channels = 14  # 13 bands + day of year (no constant year channel)
    config.model.img_res = 24
    config.model.num_classes = 17  # 17 crops; unknown = 17
  elif variant:
    quick = ", ".join(f"'quick_{name}'" for name in QUICK_MODELS)
    raise ValueError(f"Unknown variant {variant!r} of configs/pretrain.py; use '', 'quick', "
                     f"{quick}, 't31tfm', 'pastis' or 'mtlcc'.")
  return config
