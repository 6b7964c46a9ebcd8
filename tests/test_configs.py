"""The launch configs: each builds, and the stages of one variant fit together.

(That `main` locks them, so a misspelt `--config.x` fails, is tested in test_main.py.)
"""

import jax
import jax.numpy as jnp
import pytest

from configs import finetune, pretrain, supervised
from configs import test as test_config
from cscl_jax import models

VARIANTS = ("", "quick", "t31tfm", "pastis", "mtlcc", "quick_biconvgru", "quick_tsvit",
            "quick_utae")


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


@pytest.mark.parametrize("name", ["biconvgru", "tsvit", "utae"])
def test_quick_encoder_variants_build_for_their_data(name):
  # Every stage of quick_<name> is that encoder (its own supervised baseline), on the
  # quick run's data shapes.
  for module in (pretrain, finetune, supervised):
    m = module.get_config(f"quick_{name}").model
    assert m.name == name
    model = models.create_model(m)
    x = jax.ShapeDtypeStruct((1, m.max_seq_len, m.img_res, m.img_res, m.num_channels),
                             jnp.float32)
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)  # pylint: disable=cell-var-from-loop
  assert supervised.get_config("quick").model.name == "unet3d"  # UNet3Df's baseline


def test_t31tfm_variant_is_the_french_benchmark():
  config = pretrain.get_config("t31tfm")
  assert config.dataset.name == "t31tfm_1618"
  assert config.model.num_classes == 20 and config.dataset.time_sampling == "first"


@pytest.mark.parametrize("variant, name, shape", [
    ("pastis", "pastis", (11, 60, 24, 19)), ("mtlcc", "mtlcc", (14, 16, 24, 17))])
def test_benchmark_variants_have_the_published_shapes(variant, name, shape):
  model = pretrain.get_config(variant).model
  assert pretrain.get_config(variant).dataset.name == name
  assert (model.num_channels, model.max_seq_len, model.img_res, model.num_classes) == shape


def test_an_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="'quickk'"):
    finetune.get_config("quickk")
