"""The one feature schema shared by every SITS dataset builder.

Every builder under `tfds_builders/` yields examples with exactly these features, so the
input pipeline and the models never care which dataset they read:

  image       uint16 [T, H, W, C]   Sentinel-2 digital numbers (reflectance x 1e4), all at the
                                    10 m grid; C = the dataset's bands, in the order of
                                    `info.metadata["bands"]`; T varies.
  doy         int32  [T]            day of year of each acquisition (1..366).
  labels      int32  [H, W]         class index in 0..num_classes-1, or num_classes = unknown
                                    (background, margins, roads, unlabelled pixels).
  parcel_ids  int32  [H, W]         parcel (field) id, 0 where there is none.
  labels_x{m}, parcel_ids_x{m}      optional: the same ground truths rasterised directly on a
              int32  [m H, m W]     grid m = 2 (5 m) or 4 (2.5 m) times finer, for
                                    super-resolution (SPEC.md §5); the builder config says which.

Builders store the band names in `info.metadata["bands"]` (Sentinel-2 names as in `BANDS`)
and the class names in `info.metadata["class_names"]`; the unknown label is always
`len(class_names)`. The input pipeline appends day of year to the bands, so a model reads
len(bands) + 1 channels.
"""

from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

# All 13 bands, in the channel order of the reference pre-processing: 10 m | 20 m | 60 m.
BANDS = ("B04", "B03", "B02", "B08",
         "B05", "B06", "B07", "B8A", "B11", "B12",
         "B01", "B09", "B10")
NUM_BANDS = len(BANDS)
# Reflectance = digital number * REFLECTANCE_SCALE; day-of-year channel = doy / DOY_SCALE.
REFLECTANCE_SCALE = 1e-4
DOY_SCALE = 365.0001


def label_key(magnification: int) -> str:
  """The feature holding the labels on the grid `magnification` times finer than 10 m."""
  return "labels" if magnification == 1 else f"labels_x{magnification}"


def sits_metadata(bands: Sequence[str], class_names: Sequence[str]) -> tfds.core.MetadataDict:
  """Returns the `info.metadata` of a SITS builder: its band set and class names.

  Raises:
    ValueError: if a band is not a Sentinel-2 band name of `BANDS` or appears twice.
  """
  unknown = [b for b in bands if b not in BANDS]
  if unknown or len(set(bands)) != len(bands):
    raise ValueError(f"bands {list(bands)} must be distinct names from {BANDS}.")
  return tfds.core.MetadataDict(bands=list(bands), class_names=list(class_names))


def sits_features(num_bands: int = NUM_BANDS, label_magnifications: tuple[int, ...] = ()
                  ) -> tfds.features.FeaturesDict:
  """Returns the TFDS feature dict every SITS builder uses, for images of `num_bands` bands.

  Args:
    label_magnifications: finer label grids the dataset also holds, e.g. (2, 4).

  Tensors with several unknown dimensions must be stored as bytes. The image is stored raw:
  Sentinel-2-like data is noisy in its low bits, so zlib saves only ~20 % of the disk while it
  takes longer than simulating a synthetic example and slows every read. The small label maps
  compress well and are zlib-encoded.
  """
  fine = {}
  for m in label_magnifications:
    for name, what in (("labels", "Class index"), ("parcel_ids", "Parcel id")):
      fine[f"{name}_x{m}"] = tfds.features.Tensor(
          shape=(None, None), dtype=np.int32, encoding=tfds.features.Encoding.ZLIB,
          doc=f"{what} [{m}H, {m}W] on the {10 / m:g} m grid, from the parcels themselves.")
  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(
          shape=(None, None, None, num_bands), dtype=np.uint16,
          encoding=tfds.features.Encoding.BYTES,
          doc=f"Digital numbers [T, H, W, {num_bands}] in metadata['bands'] order, 10 m grid."),
      "doy": tfds.features.Tensor(shape=(None,), dtype=np.int32,
                                  doc="Day of year of each date [T]."),
      "labels": tfds.features.Tensor(
          shape=(None, None), dtype=np.int32, encoding=tfds.features.Encoding.ZLIB,
          doc="Class index [H, W]; len(class_names) means unknown."),
      "parcel_ids": tfds.features.Tensor(
          shape=(None, None), dtype=np.int32, encoding=tfds.features.Encoding.ZLIB,
          doc="Parcel id [H, W], 0 = none."),
      **fine,
  })
