"""The driver of dataset generation: plan the windows, build the TFDS dataset, summarise.

  builder, summary = generate(tiles, options, out="/data/sits", name="my_region")

plans in this process (parcels of each tile read once, windows touching a parcel, splits by
spatial block), then lets TFDS write `<out>/<name>/default/1.0.0` from `pipeline`'s per-window
work, in this process or on Apache Beam. The dataset's metadata records the class names, the
products and parcels it was made from and the settings; `summary.json` beside it the counts.
"""

import collections
import dataclasses
import json

from absl import logging
from apache_beam.options import pipeline_options
from etils import epath
import tensorflow_datasets as tfds

from cscl_jax.datagen import parcels as parcels_lib
from cscl_jax.datagen import pipeline
from cscl_jax.datagen import products
from cscl_jax.datagen import windows as windows_lib


def beam_options(workers: int, text: str | None) -> pipeline_options.PipelineOptions | None:
  """Beam options from --beam_pipeline_options ("runner=...,project=...") and --workers."""
  flags = [f"--{part.strip()}" for part in (text or "").split(",") if part.strip()]
  if workers > 1 and not any(f.startswith("--direct_num_workers") for f in flags):
    flags += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
  return pipeline_options.PipelineOptions(flags) if flags else None


def _class_names(frames, options: pipeline.Options) -> tuple[str, ...]:
  if options.label_map is not None:
    return parcels_lib.class_names(options.label_map)
  return tuple(sorted(set().union(*(set(f["code"]) for f in frames))))


def plan(tiles: list[products.Tile], options: pipeline.Options, block: float,
         splits: dict[str, float], seed: int):
  """Reads the parcels of each tile and lays out the windows of each tile-year.

  Returns:
    (options with the class names, tile-years [(year, tile)], tasks by split
    {split: [(tile-year index, WindowSpec)]}, parcel stats by tile folder, guard windows).

  Raises:
    ValueError: a tile-year in two folders, or no parcel intersects any tile.
  """
  seen = {}
  for year, tile in pipeline.tile_years(tiles):
    other = seen.setdefault((tile.name, year), tile.source)
    if other != tile.source:
      raise ValueError(f"Tile {tile.name} has {year} dates in two --products folders ({other}, "
                       f"{tile.source}); put the products of a tile and year in one folder.")
  bounds = [t.bounds for t in tiles]
  frames = [parcels_lib.read(options.parcels, options.class_column, options.id_column, b,
                             t.crs) for t, b in zip(tiles, bounds)]
  options = dataclasses.replace(options, class_names=_class_names(frames, options))
  per_tile = {t.source: parcels_lib.for_tile(f, t.crs, b, options.label_map,
                                             options.class_names)
              for t, f, b in zip(tiles, frames, bounds)}
  stats = {source: p.stats for source, p in per_tile.items()}
  if not any(s["in_tile"] for s in stats.values()):
    raise ValueError(
        f"No parcel of {options.parcels} intersects the tiles "
        f"{[(t.name, str(t.crs), b) for t, b in zip(tiles, bounds)]}: are the parcels and "
        f"products of the same region? (parcels are reprojected to each tile's CRS)")
  tile_years = pipeline.tile_years(tiles)
  tasks, guard = {s: [] for s in splits}, 0
  for index, (year, tile) in enumerate(tile_years):
    planned, dropped = windows_lib.plan(
        tile.name, year, tile.crs, tile.transform, tile.width, tile.height,
        list(per_tile[tile.source].frame.geometry), options.window, block, splits, seed)
    guard += dropped
    for spec in planned:
      tasks[spec.split].append((index, spec))
  return options, tile_years, tasks, stats, guard


def _metadata(options, tile_years, parcel_stats, tasks, guard) -> dict:
  return {
      "class_names": list(options.class_names),
      "unknown_label": len(options.class_names),
      "label_res_m": options.label_res,
      "products": [{"tile": t.name, "year": year, "source": t.source, "crs": t.crs.to_string(),
                    "transform": list(t.transform)[:6], "has_cloud_mask": t.has_mask,
                    "dates": [d.isoformat() for d in t.dates], "products": t.product_names}
                   for year, t in tile_years],
      "parcels": {"path": options.parcels, "class_column": options.class_column,
                  "id_column": options.id_column, "label_map": options.label_map,
                  "stats": parcel_stats},
      "windows_planned": {s: len(v) for s, v in tasks.items()}, "windows_guard": guard,
      "options": {k: v for k, v in dataclasses.asdict(options).items()
                  if k not in ("class_names", "label_map", "parcels")},
  }


def _summary(stats_dir: epath.Path, metadata: dict, splits) -> dict:
  counts = collections.Counter()
  for path in stats_dir.glob("*.json"):
    counts.update(json.loads(path.read_text()))
  names = metadata["class_names"] + ["unknown"]
  return {
      "windows": {s: counts[f"windows_{s}"] for s in splits},
      "windows_planned": metadata["windows_planned"],
      "windows_skipped": {"few_labels": counts["windows_few_labels"],
                          "no_clear_date": counts["windows_no_clear_date"],
                          "guard": metadata["windows_guard"]},
      "dates": {"kept": counts["dates_kept"], "dropped_cloudy": counts["dates_dropped"]},
      "tiles_without_cloud_mask": [f"{p['tile']}/{p['year']}" for p in metadata["products"]
                                   if not p["has_cloud_mask"]],
      "parcels": metadata["parcels"]["stats"],
      "class_pixels_10m": {n: counts[f"pixels_{i}"] for i, n in enumerate(names)},
  }


def generate(tiles: list[products.Tile], options: pipeline.Options, out: str, name: str,
             splits: dict[str, float], block: float = 3840.0, seed: int = 0,
             workers: int = 1, beam_pipeline_options: str | None = None):
  """Builds the dataset `<out>/<name>/default/1.0.0`; returns (builder, summary dict).

  Raises:
    ValueError: bad inputs (see `plan`), no window to build, or the dataset already exists.
  """
  options, tile_years, tasks, parcel_stats, guard = plan(tiles, options, block, splits, seed)
  for (year, tile) in tile_years:
    if not tile.has_mask:
      logging.warning("%s/%d has no cloud mask (L1C or no SCL.tif): every date is kept, "
                      "only no-data counts against --max_cloud.", tile.name, year)
  if not any(tasks.values()):
    raise ValueError(f"No {options.window}x{options.window} window of the tiles touches a "
                     f"parcel; is --window larger than the tiles?")
  metadata = _metadata(options, tile_years, parcel_stats, tasks, guard)
  stats_dir = epath.Path(out) / f".{name}_stats"
  tiles_only = [t for _, t in tile_years]
  beam = beam_options(workers, beam_pipeline_options)
  if beam is None:
    split_datasets = {s: pipeline.loop(tiles_only, options, v, s, str(stats_dir))
                      for s, v in tasks.items() if v}
  else:
    split_datasets = {s: pipeline.build_transform(tiles_only, options, v, str(stats_dir))
                      for s, v in tasks.items() if v}
  builder = pipeline.DatasetBuilder(
      name=name, version=pipeline.VERSION, config=pipeline.CONFIG, data_dir=out,
      features=pipeline.dataset_features(options.magnification), split_datasets=split_datasets,
      metadata=metadata, description="Made by python -m cscl_jax.datagen.")
  if builder.is_prepared():
    raise ValueError(f"{builder.data_dir} already holds a dataset; remove it or pick another "
                     f"--name.")
  if stats_dir.exists():
    stats_dir.rmtree()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(beam_options=beam))
  summary = _summary(stats_dir, metadata, splits)
  stats_dir.rmtree()
  (epath.Path(builder.data_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
  return builder, summary
