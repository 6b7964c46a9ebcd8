"""Builds the `tiny` config of sits_synthetic with the standard TFDS builder checks."""

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from . import simulator
from . import sits_synthetic_dataset_builder


class SitsSyntheticTest(tfds.testing.DatasetBuilderTestCase):
  """Builds `tiny`, reads it back, reloads it, checks splits, tags and registration."""
  DATASET_CLASS = sits_synthetic_dataset_builder.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["tiny"]
  SPLITS = {"train": 24, "validation": 8, "test": 8}
  # Nothing is downloaded; the test case only needs an existing folder to mock downloads with.
  EXAMPLE_DIR = str(pathlib.Path(__file__).parent)

  def test_metadata_and_examples_match_the_simulator(self):
    builder = self._make_builder(config="tiny")
    self.assertEqual(builder.info.metadata["class_names"], list(simulator.CLASS_NAMES))
    for split, num in self.SPLITS.items():
      examples = list(builder._generate_examples(split, num))
      self.assertEqual([key for key, _ in examples], list(range(num)))
      key, example = examples[-1]
      want = simulator.generate_sample(simulator.sample_rng(0, split, key), 24, 24)
      for name, value in want.items():
        np.testing.assert_array_equal(example[name], value)


if __name__ == "__main__":
  tfds.testing.test_main()
