"""The launch configs: each builds, and the stages of one variant fit together.

(That `main` locks them, so a misspelt `--config.x` fails, is tested in test_main.py.)
"""

import pytest

from configs import finetune, pretrain, supervised
from configs import test as test_config

VARIANTS = ("", "quick", "t31tfm")


@pytest.mark.parametrize("variant", VARIANTS)
def test_stages_of_a_variant_share_data_and_encoder_shape(variant):
  pre, fine, sup = (m.get_config(variant) for m in (pretrain, finetune, supervised))
  assert (pre.model.stage, fine.model.stage, sup.model.stage) == (
      "pretrain", "finetune", "supervised")
  # init_from needs the fine-tuned encoder to be the pre-trained one.
  for field in ("name", "num_channels", "max_seq_len", "img_res", "num_features",
                "emb_channels"):
    assert fine.model[field] == pre.model[field], field
  for config in (pre, fine, sup):
    assert config.dataset.to_dict() == pre.dataset.to_dict()
    # The dataset section follows the model's shapes (field references).
    assert config.dataset.img_res == config.model.img_res
    assert config.dataset.num_classes == config.model.num_classes


def test_t31tfm_variant_is_the_french_benchmark():
  config = pretrain.get_config("t31tfm")
  assert config.dataset.name == "t31tfm_1618"
  assert config.model.num_classes == 20 and config.dataset.time_sampling == "first"


def test_an_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="'quickk'"):
    finetune.get_config("quickk")
