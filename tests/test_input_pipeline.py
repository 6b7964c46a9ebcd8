"""Tests of cscl_jax.input_pipeline on the `tiny` synthetic dataset (8 simulated devices)."""

import itertools
from unittest import mock

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from cscl_jax import input_pipeline
from tfds_builders.mtlcc import fake_data as mtlcc_fake_data
from tfds_builders.pastis import fake_data as pastis_fake_data
from tfds_builders.t31tfm_1618 import fake_data


def _config(data_dir, **model):
  config = common.get_config()
  config.dataset.config = "tiny"
  config.dataset.data_dir = str(data_dir)
  config.dataset.shuffle_buffer = 8
  config.batch_size = 8  # 8 devices x 1
  config.model.img_res = 16
  config.model.max_seq_len = 40
  config.model.update(model)
  return config


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A data dir where `tiny` is built once, by the pipeline on first use."""
  data_dir = tmp_path_factory.mktemp("tfds")
  input_pipeline.dataset_info(_config(data_dir))
  return data_dir


@pytest.fixture(scope="session")
def raw(data_dir):
  """The stored examples of each split, in file order."""
  builder = input_pipeline._prepared_builder(_config(data_dir))
  return {s: list(tfds.as_numpy(builder.as_dataset(split=s, shuffle_files=False)))
          for s in ("train", "validation")}


def _take(config, split, n, **kwargs):
  return list(itertools.islice(input_pipeline.create_split(config, split, **kwargs), n))


def _reference(example, size, max_len, top, left, sampling="first"):
  """Numpy version of the pre-processing of one example at crop (top, left), no flips."""
  num_dates = len(example["doy"])
  dates = np.arange(min(num_dates, max_len))
  if sampling == "even":  # spread over the season, rounded half up
    dates = np.floor(np.linspace(0, num_dates - 1, len(dates)) + 0.5).astype(int)
  image = example["image"][dates, top:top + size, left:left + size].astype(np.float64)
  doy = np.broadcast_to(example["doy"][dates, None, None, None] / 365.0001,
                        image.shape[:3] + (1,))
  inputs = np.zeros((max_len, size, size, image.shape[-1] + 1))
  inputs[:image.shape[0]] = np.concatenate([image * 1e-4, doy], -1)
  return inputs, example["labels"][top:top + size, left:left + size]


def _examples(batches):
  """Flattens [D, b, ...] batches to a list of examples."""
  for batch in batches:
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    yield from ({k: v[i] for k, v in flat.items()} for i in range(len(flat["labels"])))


def _dates(example):
  return tuple(np.round(example["inputs"][:, 0, 0, -1] * 365.0001).astype(int))


def test_dataset_info(data_dir):
  info = input_pipeline.dataset_info(_config(data_dir))
  assert info.num_classes == info.unknown_label == 12 == len(info.class_names)
  assert info.num_examples == {"train": 24, "validation": 8, "test": 8}
  assert info.image_size == (24, 24)


@pytest.mark.parametrize("max_len,sampling", [(40, "first"), (12, "first"), (12, "even")])
def test_eval_batches_match_numpy_reference(data_dir, raw, max_len, sampling):
  config = _config(data_dir, max_seq_len=max_len)  # 40: zero-padded (T <= 40); 12: cut
  config.dataset.time_sampling = sampling
  batches = list(input_pipeline.create_split(config, "validation", train=False))
  assert len(batches) == 1  # 8 examples, one batch of 8 devices x 1, then it ends
  assert batches[0]["inputs"].shape == (8, 1, max_len, 16, 16, 14)
  assert batches[0]["inputs"].dtype == np.float32 and batches[0]["labels"].dtype == np.int32
  for got, example in zip(_examples(batches), raw["validation"]):
    inputs, labels = _reference(example, 16, max_len, 4, 4, sampling)  # centre of 24x24
    np.testing.assert_allclose(got["inputs"], inputs, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["labels"], labels)
    np.testing.assert_array_equal(got["valid"], labels != 12)


def test_train_examples_are_crops_and_flips_of_stored_ones(data_dir, raw):
  config = _config(data_dir)
  found = set()
  for got in _examples(_take(config, "train", 3, train=True)):
    (index, example), = [(i, e) for i, e in enumerate(raw["train"])
                         if _dates(got)[:len(e["doy"])] == tuple(e["doy"])]
    matches = []
    for top, left in itertools.product(range(9), repeat=2):
      inputs, labels = _reference(example, 16, 40, top, left)
      for flip_h, flip_v in itertools.product([False, True], repeat=2):
        x, y = inputs, labels
        x, y = (x[:, :, ::-1], y[:, ::-1]) if flip_h else (x, y)
        x, y = (x[:, ::-1], y[::-1]) if flip_v else (x, y)
        if np.array_equal(got["labels"], y) and np.allclose(got["inputs"], x, atol=1e-7):
          matches.append((top, left, flip_h, flip_v))
    assert matches, "a training example is no crop and flip of its stored example"
    found.update((index,) + m for m in matches)
  assert len({f[0] for f in found}) == 24  # one epoch: every example once
  assert len({f[1:3] for f in found}) > 5 and len({f[3:] for f in found}) == 4


def test_training_is_deterministic_and_resumes_without_replay(data_dir):
  config = _config(data_dir)
  full = _take(config, "train", 7, train=True)  # 3 steps per epoch: epochs 0, 1, 2
  again = _take(config, "train", 7, train=True)
  resumed = _take(config, "train", 3, train=True, start_step=4)
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  for a, b in zip(full[4:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  epochs = [[_dates(e) for e in _examples(full[i:i + 3])] for i in (0, 3)]
  assert all(len(set(dates)) == 24 for dates in epochs)  # no example twice in an epoch
  assert epochs[0] != epochs[1]  # reshuffled
  config.seed = 1
  assert not np.array_equal(_take(config, "train", 1, train=True)[0]["inputs"],
                            full[0]["inputs"])


@pytest.mark.parametrize("processes, batch_size", [(1, 8), (1, 16), (2, 16), (5, 40)])
def test_eval_counts_every_example_once(data_dir, processes, batch_size):
  """The 24 train examples, read in eval mode by each of `processes` processes."""
  config = _config(data_dir)
  config.batch_size = batch_size  # 8 local devices
  seen, num_batches = [], set()
  for process in range(processes):
    with mock.patch.object(jax, "process_count", return_value=processes), \
         mock.patch.object(jax, "process_index", return_value=process):
      batches = list(input_pipeline.create_split(config, "train", train=False))
    num_batches.add(len(batches))
    for example in _examples(batches):
      if example["example_mask"]:
        seen.append(_dates(example))
      else:  # padding: no valid pixel, unknown labels, zero inputs
        assert not example["valid"].any() and (example["labels"] == 12).all()
        assert not example["inputs"].any()
  assert len(num_batches) == 1  # every process runs the same number of eval steps
  assert len(seen) == len(set(seen)) == 24


def test_create_split_reads_through_the_info_it_is_given(data_dir, monkeypatch):
  """Every evaluation reuses the run's builder: no re-opening, no re-checking."""
  config = _config(data_dir)
  info = input_pipeline.dataset_info(config)

  def reopen(config):
    raise AssertionError("the dataset was opened again")

  monkeypatch.setattr(input_pipeline, "_prepared_builder", reopen)
  batch = next(input_pipeline.create_split(config, "validation", train=False, info=info))
  assert batch["labels"].shape == (8, 1, 16, 16)


@pytest.mark.parametrize("field, value, message", [
    ("num_classes", 20, "config.model.num_classes=20, but sits_synthetic has 12 classes"),
    ("num_channels", 15, "config.model.num_channels=15"),
    ("img_res", 32, "config.model.img_res=32 does not fit the (24, 24) images"),
])
def test_config_that_does_not_fit_the_data(data_dir, field, value, message):
  config = _config(data_dir, **{field: value})
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    input_pipeline.dataset_info(config)


def test_bad_split_batch_and_name(data_dir):
  config = _config(data_dir)
  config.dataset.eval_split = "valid"
  with pytest.raises(ValueError, match="split 'valid' .* does not exist"):
    input_pipeline.create_split(config, "train", train=True)
  config = _config(data_dir)
  config.batch_size = 12
  with pytest.raises(ValueError, match="batch_size=12 must be a multiple of 1 processes x 8"):
    input_pipeline.create_split(config, "train", train=True)
  config.batch_size, config.dataset.train_split = 16, "validation"
  with pytest.raises(ValueError, match="fewer examples per process than one batch of 16"):
    input_pipeline.create_split(config, "validation", train=True)
  config.dataset.name = "mnist"
  with pytest.raises(ValueError, match="neither a SITS dataset"):
    input_pipeline.dataset_info(config)


@pytest.mark.parametrize("empty", [False, True])
def test_t31tfm_1618_without_its_manual_folder(tmp_path, empty):
  config = _config(tmp_path / "tfds", num_classes=20, img_res=48, max_seq_len=16)
  config.dataset.name, config.dataset.config = "t31tfm_1618", "default"
  config.dataset.manual_dir = str(tmp_path / "T31TFM_1618")
  if empty:
    (tmp_path / "T31TFM_1618").mkdir()
  with pytest.raises(ValueError, match="is empty" if empty else "does not exist") as error:
    input_pipeline.dataset_info(config)
  assert "downloaded by hand" in str(error.value)
  assert "build tfds_builders/t31tfm_1618 --config=default" in str(error.value)


def test_t31tfm_1618_from_a_manual_folder(tmp_path):
  config = _config(tmp_path / "tfds", num_classes=20, img_res=48, max_seq_len=16)
  config.dataset.name, config.dataset.config = "t31tfm_1618", "default"
  config.dataset.time_sampling = "first"  # the reference's cut
  config.dataset.manual_dir = str(fake_data.write(tmp_path / "T31TFM_1618", num_train=8,
                                                  num_eval=8))
  info = input_pipeline.dataset_info(config)  # builds it
  assert info.num_examples == {"train": 8, "validation": 8}
  assert info.unknown_label == 20 and info.image_size == (48, 48)
  train, = _take(config, "train", 1, train=True)
  assert train["inputs"].shape == (8, 1, 16, 48, 48, 14)
  builder = input_pipeline._prepared_builder(config)
  stored = list(tfds.as_numpy(builder.as_dataset(split="validation", shuffle_files=False)))
  for got, example in zip(_examples(_take(config, "validation", 1, train=False)), stored):
    inputs, labels = _reference(example, 48, 16, 0, 0)
    np.testing.assert_allclose(got["inputs"], inputs, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["valid"], labels != 20)
    assert (labels == 20).any() and (labels < 20).any()


@pytest.mark.parametrize("name, builder_config, num_bands, num_classes", [
    ("pastis", "fold1_24x24", 10, 19), ("mtlcc", "all", 13, 17)])
def test_the_inputs_follow_the_band_set_of_the_dataset(tmp_path, name, builder_config,
                                                        num_bands, num_classes):
  if name == "pastis":
    # 2 patches a fold of 48x48, 4 windows each: validation (one fold) holds 8.
    manual_dir = pastis_fake_data.write(tmp_path / "PASTIS", patches_per_fold=2, size=48)
  else:
    manual_dir = mtlcc_fake_data.write(tmp_path / "MTLCC", num_tiles=(4, 4, 1))  # x 2 years
  config = _config(tmp_path / "tfds", num_classes=num_classes, img_res=24, max_seq_len=8,
                   num_channels=num_bands + 1)
  config.dataset.name, config.dataset.config = name, builder_config
  config.dataset.manual_dir = str(manual_dir)
  info = input_pipeline.dataset_info(config)  # builds it
  assert len(info.bands) == num_bands and info.unknown_label == num_classes
  assert info.rgb_channels == (2, 1, 0)  # both store B02 B03 B04 first
  builder = input_pipeline._prepared_builder(config)
  stored = list(tfds.as_numpy(builder.as_dataset(split="validation", shuffle_files=False)))
  batch, = _take(config, "validation", 1, train=False)
  assert batch["inputs"].shape == (8, 1, 8, 24, 24, num_bands + 1)
  for got, example in zip(_examples([batch]), stored):
    inputs, labels = _reference(example, 24, 8, 0, 0)
    np.testing.assert_allclose(got["inputs"], inputs, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["valid"], labels != num_classes)
  config.model.num_channels = 12
  with pytest.raises(ValueError, match=f"num_channels=12, but the inputs have the {num_bands} "
                     f"bands of {name} \\({' '.join(info.bands)}\\) \\+ day of year"):
    input_pipeline.dataset_info(config)
