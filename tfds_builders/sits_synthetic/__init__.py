"""The synthetic SITS dataset builder; importing this package registers `sits_synthetic`.

The import is relative so that `tfds build tfds_builders/sits_synthetic`, which imports the
folder as a top-level package, registers the same builder once.
"""

from .sits_synthetic_dataset_builder import Builder
