"""The T31TFM_1618 (France) dataset builder; importing this package registers `t31tfm_1618`.

The import is relative so that `tfds build tfds_builders/t31tfm_1618`, which imports the
folder as a top-level package, registers the same builder once.
"""

from .t31tfm_1618_dataset_builder import Builder
