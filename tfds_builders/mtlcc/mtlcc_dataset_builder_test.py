"""Builds mtlcc from fake folders in the exact MTLCC layout (see fake_data.py)."""

import gzip

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tfds_builders import testing
from . import fake_data
from . import mtlcc_dataset_builder as builder_lib

# The reference's remap (DeepSatModels data/MTLCC/data_transforms.py), written out.
_REFERENCE_REMAP = {0: 17, 1: 0, 2: 1, 3: 2, 5: 3, 8: 4, 9: 5, 12: 6, 13: 7, 15: 8, 16: 9,
                    17: 10, 19: 11, 22: 12, 23: 13, 24: 14, 25: 15, 26: 16}


class MtlccData16Test(testing.FakeFolder, tfds.testing.DatasetBuilderTestCase):
  """Builds data16, reads it back, reloads it, checks splits, tags and registration."""
  DATASET_CLASS = builder_lib.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["data16"]
  SPLITS = {"train": 4, "validation": 2, "test": 2}
  write_fake = staticmethod(fake_data.write)


class MtlccAllTest(testing.FakeFolder, tfds.testing.DatasetBuilderTestCase):
  """Builds `all`: both years."""
  DATASET_CLASS = builder_lib.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["all"]
  SPLITS = {"train": 8, "validation": 4, "test": 4}
  write_fake = staticmethod(fake_data.write)


def _build(tmp_path, manual_dir, config="data16"):
  return testing.build(builder_lib.Builder, tmp_path, manual_dir, config)


def _parse(path):
  """The record's arrays, parsed with tf.io as the reference's S2parser does."""
  spec = {f"{k}/data": tf.io.FixedLenFeature([], tf.string)
          for k in ("x10", "x20", "x60", "labels")}
  spec.update({f"{k}/shape": tf.io.FixedLenFeature([n], tf.int64)
               for k, n in (("x10", 4), ("x20", 4), ("x60", 4), ("labels", 3))})
  spec["dates/doy"] = tf.io.FixedLenFeature([], tf.string)
  (record,) = tf.data.TFRecordDataset(str(path), compression_type="GZIP")
  parsed = tf.io.parse_single_example(record, spec)
  out = {k: tf.reshape(tf.io.decode_raw(parsed[f"{k}/data"], tf.int64), parsed[f"{k}/shape"])
         .numpy() for k in ("x10", "x20", "x60", "labels")}
  out["doy"] = tf.io.decode_raw(parsed["dates/doy"], tf.int64).numpy()
  return out


def test_examples_match_the_records(tmp_path):
  fake_data.write(tmp_path)
  builder = _build(tmp_path, tmp_path)
  assert builder.info.metadata["bands"] == list(builder_lib.BANDS)
  assert builder.info.metadata["class_names"][0] == "sugar_beet"
  assert len(builder.info.metadata["class_names"]) == 17
  base = tmp_path / fake_data.ROOT
  records = {tuple(r["doy"]): r for r in map(_parse, base.glob("data16/*.tfrecord.gz"))}
  seen = 0
  for split in ("train", "validation", "test"):
    for example in tfds.as_numpy(builder.as_dataset(split=split)):
      record = records[tuple(example["doy"])]
      x20 = tf.image.resize(record["x20"].astype(np.float32), (24, 24), "bilinear").numpy()
      x60 = tf.image.resize(record["x60"].astype(np.float32), (24, 24), "bilinear").numpy()
      want = np.concatenate([record["x10"], x20, x60], -1)
      assert example["image"].shape == (len(example["doy"]), 24, 24, 13)
      np.testing.assert_allclose(example["image"], want, atol=0.51)
      np.testing.assert_array_equal(example["image"][..., :4], record["x10"])
      labels = np.vectorize(lambda c: _REFERENCE_REMAP.get(c, 17))(record["labels"][0])
      np.testing.assert_array_equal(example["labels"], labels)
      seen += 1
  assert seen == 8


def test_unlisted_codes_are_unknown():
  np.testing.assert_array_equal(builder_lib.remap_labels(np.array([0, 1, 4, 26, 27, -1, 99])),
                                [17, 0, 17, 16, 17, 17, 17])


def _rewrite(path, change):
  example = tf.train.Example.FromString(
      next(iter(tf.data.TFRecordDataset(str(path), compression_type="GZIP"))).numpy())
  change(example.features.feature)
  with tf.io.TFRecordWriter(str(path), options="GZIP") as writer:
    writer.write(example.SerializeToString())


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(gzip.compress(b"not a record")), "not a readable gzipped TFRecord"),
    (lambda p: _rewrite(p, lambda f: f.pop("x60/data")), "the record lacks x60/data"),
    (lambda p: _rewrite(p, lambda f: f["x20/shape"].int64_list.value.__setitem__(1, 24)),
     r"x20/data holds \d+ numbers, not \(\d, 24, 12, 6\)"),
])
def test_a_bad_record_fails_naming_the_file(tmp_path, damage, message):
  fake_data.write(tmp_path)
  base = tmp_path / fake_data.ROOT
  tile = (base / "tileids" / "eval.tileids").read_text().split()[0]
  bad = base / "data16" / f"{tile}.tfrecord.gz"
  damage(bad)
  with pytest.raises(ValueError, match=f"{bad}: {message}"):
    _build(tmp_path, tmp_path)


def test_a_wrong_or_partial_folder_says_what_to_download(tmp_path):
  with pytest.raises(AssertionError, match="does not exist(.|\n)*TUM-LMF/MTLCC"):
    _build(tmp_path, tmp_path / "nowhere")
  fake_data.write(tmp_path / "MTLCC")
  base = tmp_path / "MTLCC" / fake_data.ROOT
  (base / "tileids" / "eval.tileids").unlink()
  with pytest.raises(FileNotFoundError, match=r"lacks \['tileids/eval.tileids'\](.|\n)*TUM-LMF"):
    _build(tmp_path, base)  # the 240 folder itself works too
  fake_data.write(tmp_path / "emptied")
  for path in (tmp_path / "emptied" / fake_data.ROOT / "data16").glob("*"):
    path.unlink()
  with pytest.raises(FileNotFoundError, match=r"data16 holds none of the \d tiles"):
    _build(tmp_path, tmp_path / "emptied")
