"""sits_synthetic: simulated Sentinel-2 crop-parcel image time series; nothing to download.

Examples follow `cscl_jax.features` (uint16 reflectance x 1e4 in 13 bands at 10 m, day of year,
labels with 12 crop classes and unknown = 12, parcel ids; labels and parcel ids also at 5 m and
2.5 m for super-resolution: labels_x2, labels_x4); `simulator.py` describes the scenes.
Example i of split s is generated from the seed (config.seed, s, i) alone, so every build of a
config gives the same data whatever the order or the machine.
"""

import collections
from concurrent import futures
import dataclasses
import itertools

import tensorflow_datasets as tfds

from cscl_jax import features
from . import simulator

_THREADS = 2


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  """Sizes of a synthetic SITS dataset.

  Attributes:
    num_examples: (split name, number of examples) pairs.
    height: image height in 10 m pixels.
    width: image width in 10 m pixels.
    min_dates: fewest acquisition dates of a sample.
    max_dates: most acquisition dates of a sample.
    seed: seed of the whole dataset.
  """
  num_examples: tuple[tuple[str, int], ...] = ()
  height: int = 48
  width: int = 48
  min_dates: int = 20
  max_dates: int = 40
  seed: int = 0


def _config(name, description, train, evaluation, size):
  return SyntheticConfig(
      name=name, description=description, height=size, width=size,
      num_examples=(("train", train), ("validation", evaluation), ("test", evaluation)))


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for the synthetic SITS crop-type segmentation dataset."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "Labels and parcel ids also at 5 m and 2.5 m (labels_x2, "
                            "labels_x4); geometry rendered at 0.83 m instead of 2.5 m."}
  BUILDER_CONFIGS = [
      _config("tiny", "For tests: 24/8/8 samples of 24x24 pixels.", 24, 8, 24),
      _config("small", "For quick CPU runs: 512/128/128 samples of 48x48 pixels.", 512, 128, 48),
      _config("default", "2000/250/250 samples of 48x48 pixels.", 2000, 250, 48),
  ]
  DEFAULT_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    """Returns the dataset metadata."""
    return self.dataset_info_from_configs(
        features=features.sits_features(label_magnifications=simulator.LABEL_MAGNIFICATIONS),
        supervised_keys=None,
        homepage="https://github.com/michaeltrs/DeepSatModels",
        metadata=features.sits_metadata(features.BANDS, simulator.CLASS_NAMES),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    """Returns the generator of each split; there is nothing to download."""
    del dl_manager
    return {split: self._generate_examples(split, num)
            for split, num in self.builder_config.num_examples}

  def _generate_examples(self, split: str, num: int):
    """Yields (index, example) for the `num` examples of `split`, simulated on 2 threads.

    numpy releases the GIL in the heavy array work, so a second thread simulates while TFDS
    serialises; a short window of pending examples bounds the memory.
    """
    config = self.builder_config

    def simulate(index):
      return simulator.generate_sample(
          simulator.sample_rng(config.seed, split, index), config.height, config.width,
          min_dates=config.min_dates, max_dates=config.max_dates)

    with futures.ThreadPoolExecutor(_THREADS) as pool:
      pending = (pool.submit(simulate, index) for index in range(num))
      window = collections.deque(itertools.islice(pending, 4 * _THREADS))
      for index in range(num):
        example = window.popleft().result()
        window.extend(itertools.islice(pending, 1))
        yield index, example
