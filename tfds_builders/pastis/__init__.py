"""The PASTIS dataset builder; importing this package registers `pastis`.

The import is relative so that `tfds build tfds_builders/pastis`, which imports the folder as a
top-level package, registers the same builder once.
"""

from .pastis_dataset_builder import Builder
