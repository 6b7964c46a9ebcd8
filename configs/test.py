"""Tiny CPU config for the tests: the `tiny` synthetic dataset and a minute UNet3Df.

  python -m cscl_jax.main --config=configs/test.py --workdir=/tmp/cscl_test
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  """Returns a pre-training config that runs a few steps in seconds."""
  config = common.get_config()
  config.dataset.config = "tiny"
  config.dataset.shuffle_buffer = 16
  config.model.img_res = 8
  config.model.max_seq_len = 4
  config.model.num_features = 1
  config.model.emb_channels = 8
  config.model.attn_channels = 8
  config.batch_size = 8
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.num_eval_batches = 2
  config.num_plot_samples = 2
  return config
