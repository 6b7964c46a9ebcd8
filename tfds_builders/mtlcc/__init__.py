"""The MTLCC (Germany) dataset builder; importing this package registers `mtlcc`.

The import is relative so that `tfds build tfds_builders/mtlcc`, which imports the folder as a
top-level package, registers the same builder once.
"""

from .mtlcc_dataset_builder import Builder
