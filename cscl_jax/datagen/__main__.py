"""Makes a training dataset from Sentinel-2 products and parcel polygons.

  python -m cscl_jax.datagen --products=products/T31TFM --parcels=RPG_2018.gpkg \
      --class_column=CODE_CULTU --label_map=map.json --out=/data/sits --name=my_region

writes the TFDS dataset /data/sits/my_region/default/1.0.0, which trains with
  python -m cscl_jax.main --config=configs/pretrain.py --workdir=... \
      --config.dataset.name=my_region --config.dataset.data_dir=/data/sits \
      --config.model.num_classes=<number of classes in the summary>
See README.md, "Your own region" and "Many tiles".
"""

import datetime
import json

from absl import app
from absl import flags
from absl import logging

from cscl_jax.datagen import generate
from cscl_jax.datagen import parcels
from cscl_jax.datagen import pipeline
from cscl_jax.datagen import products
from cscl_jax.datagen import windows

_PRODUCTS = flags.DEFINE_list(
    "products", None, "Folders (or globs) of one tile each: *.SAFE products or per-date "
    "folders <YYYY-MM-DD>/<BAND>.tif. Local or gs://.", required=True)
_PARCELS = flags.DEFINE_string("parcels", None, "Parcel polygons: any OGR vector file or "
                               "GeoParquet, any CRS.", required=True)
_CLASS_COLUMN = flags.DEFINE_string("class_column", None, "Column of the crop codes.",
                                    required=True)
_ID_COLUMN = flags.DEFINE_string("id_column", None, "Column of integer parcel ids "
                                 "(default: FID + 1).")
_LABEL_MAP = flags.DEFINE_string("label_map", None, 'JSON {"raw code": "class name"}; '
                                 "unmapped codes are unknown. Default: one class a code.")
_LABEL_RES = flags.DEFINE_enum("label_res", "10", ["10", "5", "2.5"], "Metres of the label "
                               "grid; 5 / 2.5 add labels_x2 / labels_x4 (SPEC.md §5).")
_WINDOW = flags.DEFINE_integer("window", 48, "Window size in 10 m pixels (multiple of 6).")
_MAX_CLOUD = flags.DEFINE_float("max_cloud", 0.5, "Drop a window's date whose cloud, shadow, "
                                "snow or no-data fraction exceeds this.")
_MIN_LABELLED = flags.DEFINE_float("min_labelled", 0.05, "Skip windows with a smaller "
                                   "fraction of labelled pixels.")
_MIN_COVERAGE = flags.DEFINE_float("min_coverage", 0.5, "Coverage by its largest parcel a "
                                   "pixel needs to be labelled.")
_START = flags.DEFINE_string("start", None, "First date kept, YYYY-MM-DD.")
_END = flags.DEFINE_string("end", None, "Last date kept, YYYY-MM-DD.")
_SPLITS = flags.DEFINE_string("splits", "train=0.8,validation=0.1,test=0.1",
                              "Split fractions (by spatial block).")
_BLOCK = flags.DEFINE_float("block", 3840.0, "Spatial block size in metres.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the block-to-split assignment.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Local processes (Beam DirectRunner, "
                                "multi-processing) when > 1.")
_BEAM = flags.DEFINE_string("beam_pipeline_options", None, 'Beam options, e.g. '
                            '"runner=DataflowRunner,project=P,region=R,temp_location=gs://..."')
_OUT = flags.DEFINE_string("out", None, "Data dir of the dataset (local or gs://).",
                           required=True)
_NAME = flags.DEFINE_string("name", "datagen", "Dataset name (config.dataset.name).")


def _date(text: str | None) -> datetime.date | None:
  return datetime.date.fromisoformat(text) if text else None


def main(argv):
  del argv
  window = _WINDOW.value
  if window <= 0 or window % 6:
    raise app.UsageError(f"--window={window} must be a positive multiple of 6.")
  tiles = products.discover_tiles(_PRODUCTS.value, _date(_START.value), _date(_END.value))
  options = pipeline.Options(
      parcels=_PARCELS.value, class_column=_CLASS_COLUMN.value, id_column=_ID_COLUMN.value,
      label_map=parcels.load_label_map(_LABEL_MAP.value), window=window,
      label_res=float(_LABEL_RES.value), max_cloud=_MAX_CLOUD.value,
      min_labelled=_MIN_LABELLED.value, min_coverage=_MIN_COVERAGE.value)
  builder, summary = generate.generate(
      tiles, options, _OUT.value, _NAME.value, windows.parse_splits(_SPLITS.value),
      _BLOCK.value, _SEED.value, _WORKERS.value, _BEAM.value)
  logging.info("Wrote %s:\n%s", builder.data_dir, json.dumps(summary, indent=1))
  print(f"Wrote {builder.data_dir}. Train on it with --config.dataset.name={_NAME.value} "
        f"--config.dataset.data_dir={_OUT.value} "
        f"--config.model.num_classes={len(builder.info.metadata['class_names'])}")


if __name__ == "__main__":
  app.run(main)
