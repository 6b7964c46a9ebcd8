"""Test helpers shared by the builders of manually downloaded datasets."""

import tempfile
from typing import Callable

import tensorflow_datasets as tfds


class FakeFolder:
  """Mix-in for a `tfds.testing.DatasetBuilderTestCase`: EXAMPLE_DIR is a fresh fake folder.

  Subclasses set `write_fake = staticmethod(<fake_data.write or a partial of it>)`.
  """
  write_fake: Callable[..., object]

  @classmethod
  def setUpClass(cls):
    cls._tmp = tempfile.TemporaryDirectory()
    cls.EXAMPLE_DIR = str(cls.write_fake(cls._tmp.name))
    super().setUpClass()

  @classmethod
  def tearDownClass(cls):
    super().tearDownClass()
    cls._tmp.cleanup()


def build(builder_class, tmp_path, manual_dir, config: str | None = None):
  """Builds `builder_class` (config `config`) from `manual_dir` into tmp_path/tfds."""
  builder = builder_class(config=config, data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder
