"""Parcel polygons: reading, class mapping, repair, reprojection and rasterised labels.

Parcels come from any vector file OGR reads (GeoPackage, GeoJSON, Shapefile, FlatGeobuf) or
GeoParquet, in any CRS. For a tile they are read within the tile's bounds, reprojected to the
tile's CRS (the imagery is never resampled), repaired (`shapely.make_valid`, polygonal parts
kept; what cannot be repaired is counted, never dropped silently) and mapped to classes.

Labels of a window (`rasterize`), at 10 m or finer (5 m, 2.5 m: the super-resolution labels of
SPEC.md §5, from the same geometry):
* coverage: each label pixel is split into `supersample`² sub-pixels; a parcel's coverage is the
  fraction of sub-pixel centres inside it; the pixel takes the parcel covering most of it, its
  class if that coverage is >= `min_coverage`, else unknown;
* conflicts: a pixel with a sub-pixel claimed by overlapping parcels of different classes
  (or a mapped and an unmapped one) is unknown;
* parcel ids: the id of the parcel covering most of the pixel (0 where none).
"""

import dataclasses
import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio
import rasterio.features
import rasterio.warp
import shapely

UNMAPPED = -1  # class of a parcel whose code is not in the label map


@dataclasses.dataclass(frozen=True)
class Parcels:
  """Parcels of one tile in its CRS.

  Attributes:
    frame: columns `geometry` (valid polygons), `class_index` (UNMAPPED for unmapped codes),
      `parcel_id` (int32 > 0), indexed 0..n-1.
    stats: counts: read, invalid (repaired), unrepairable, empty, unmapped, used.
  """
  frame: gpd.GeoDataFrame
  stats: dict[str, int]


def load_label_map(path: str | None) -> dict[str, str] | None:
  """Reads a label map JSON file: {raw code: class name}; several codes may share a class."""
  if path is None:
    return None
  with open(path) as f:
    spec = json.load(f)
  if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
    raise ValueError(f"--label_map={path}: expected a JSON object {{raw code: class name}}, "
                     f'e.g. {{"BTH": "wheat", "BTP": "wheat", "MIS": "maize"}}.')
  return {str(k): v for k, v in spec.items()}


def class_names(label_map: dict[str, str]) -> tuple[str, ...]:
  """Class names in order of first appearance in the label map."""
  return tuple(dict.fromkeys(label_map.values()))


def _codes(column: pd.Series) -> pd.Series:
  """Raw class codes as strings (integral floats without '.0')."""
  if pd.api.types.is_float_dtype(column) and np.all(np.mod(column.dropna(), 1) == 0):
    column = column.astype("Int64")
  return column.astype(str)


def read(path: str, class_column: str, id_column: str | None = None,
         bounds: tuple[float, float, float, float] | None = None,
         bounds_crs: rasterio.crs.CRS | None = None) -> gpd.GeoDataFrame:
  """Reads parcels (in their own CRS) with columns geometry, code, parcel_id.

  Args:
    path: vector file (GeoParquet if it ends in .parquet).
    class_column: column of the raw class codes.
    id_column: column of integer parcel ids; None: the feature's FID + 1.
    bounds: (left, bottom, right, top) in `bounds_crs`: read only parcels within them.
    bounds_crs: CRS of `bounds`.

  Raises:
    ValueError: unreadable file, missing column, no CRS, ids that are not integers.
  """
  if path.endswith(".parquet"):
    frame = gpd.read_parquet(path)
    columns = list(frame.columns)
  else:
    try:
      info = pyogrio.read_info(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"--parcels={path}: not a readable vector file ({e}).") from e
    columns = list(info["fields"])
    bbox = None
    if bounds is not None and info["crs"]:
      bbox = rasterio.warp.transform_bounds(bounds_crs, info["crs"], *bounds, densify_pts=21)
    frame = pyogrio.read_dataframe(path, bbox=bbox, fid_as_index=True)
  missing = [c for c in (class_column, id_column) if c and c not in columns]
  if missing:
    raise ValueError(f"--parcels={path} has no column {missing}; its columns are {columns}. "
                     f"Set --class_column (and --id_column) to one of them.")
  if frame.crs is None:
    raise ValueError(f"--parcels={path} has no CRS; set one (e.g. ogr2ogr -a_srs EPSG:2154).")
  if id_column:
    ids = pd.to_numeric(frame[id_column], errors="coerce")
    if ids.isna().any() or (ids % 1 != 0).any() or (ids <= 0).any() or (ids >= 2**31).any():
      raise ValueError(f"--id_column={id_column}: parcel ids must be integers in 1..2^31-1; "
                       f"leave --id_column out to number parcels by their FID.")
  else:
    ids = pd.Series(np.asarray(frame.index) + 1, index=frame.index)
  return gpd.GeoDataFrame({"code": _codes(frame[class_column]),
                           "parcel_id": ids.astype(np.int64).to_numpy()},
                          geometry=frame.geometry.values, crs=frame.crs)


def _polygonal(geometry: shapely.Geometry) -> shapely.Geometry:
  """The polygonal part of a geometry (empty if none)."""
  parts = [p for p in shapely.get_parts(geometry)
           if isinstance(p, (shapely.Polygon, shapely.MultiPolygon))]
  return shapely.union_all(parts) if parts else shapely.Polygon()


def for_tile(frame: gpd.GeoDataFrame, crs: rasterio.crs.CRS,
             bounds: tuple[float, float, float, float],
             label_map: dict[str, str] | None, names: tuple[str, ...]) -> Parcels:
  """Reprojects, repairs and maps the parcels intersecting `bounds` (in `crs`).

  Args:
    frame: from `read`.
    crs: the tile's CRS.
    bounds: the tile's (left, bottom, right, top) in `crs`.
    label_map: raw code -> class name; None: every code is its own class (named by the code).
    names: the class names, in class index order.
  """
  empty = frame.geometry.isna() | frame.geometry.is_empty
  frame = frame[~empty].to_crs(crs)
  invalid = ~frame.geometry.is_valid
  geometry = frame.geometry.values.copy()
  geometry[invalid.to_numpy()] = [_polygonal(shapely.make_valid(g))
                                  for g in geometry[invalid.to_numpy()]]
  frame = frame.set_geometry(geometry)
  unrepairable = frame.geometry.is_empty
  frame = frame[~unrepairable]
  frame = frame[frame.geometry.intersects(shapely.box(*bounds))]
  mapped = frame["code"].map(label_map) if label_map is not None else frame["code"]
  index = {name: i for i, name in enumerate(names)}
  class_index = mapped.map(index).fillna(UNMAPPED).astype(np.int64)
  stats = {"read": int(len(empty)), "empty": int(empty.sum()), "invalid": int(invalid.sum()),
           "unrepairable": int(unrepairable.sum()), "in_tile": int(len(frame)),
           "unmapped": int((class_index == UNMAPPED).sum())}
  frame = gpd.GeoDataFrame({"class_index": class_index.to_numpy(),
                            "parcel_id": frame["parcel_id"].to_numpy()},
                           geometry=frame.geometry.values, crs=crs)
  return Parcels(frame, stats)


def rasterize(parcels: gpd.GeoDataFrame, transform: rasterio.Affine, shape: tuple[int, int],
              num_classes: int, min_coverage: float = 0.5,
              supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """Labels and parcel ids of one label grid (see the module docstring).

  Args:
    parcels: `Parcels.frame` in the CRS of `transform`.
    transform: affine transform of the label grid (10, 5 or 2.5 m pixels).
    shape: (H, W) of the label grid.
    num_classes: number of classes; the unknown label.
    min_coverage: coverage needed to label a pixel.
    supersample: sub-pixels per label pixel side.

  Returns:
    labels int32 [H, W] (num_classes = unknown) and parcel_ids int32 [H, W] (0 = none).
  """
  height, width = shape
  s = supersample
  bounds = rasterio.transform.array_bounds(height, width, transform)
  near = parcels.iloc[parcels.sindex.query(shapely.box(*bounds))]
  labels = np.full(shape, num_classes, np.int32)
  if near.empty:
    return labels, np.zeros(shape, np.int32)
  fine = dict(out_shape=(height * s, width * s), transform=transform * rasterio.Affine.scale(1 / s))
  geometries = list(near.geometry)
  classes = np.where(near["class_index"] == UNMAPPED, num_classes, near["class_index"]) + 1.0
  owner = rasterio.features.rasterize(zip(geometries, range(1, len(near) + 1)), fill=0,
                                      dtype="int32", **fine)  # [H*s, W*s], last one wins
  sums = [rasterio.features.rasterize(zip(geometries, values), fill=0, dtype="float64",
                                      merge_alg=rasterio.enums.MergeAlg.add, **fine)
          for values in (np.ones(len(near)), classes, classes ** 2)]
  count, total, squares = sums
  conflict = (count > 1) & (count * squares != total ** 2)  # not all of one class
  def blocks(a):  # [H*s, W*s] -> [H, W, s*s]
    return a.reshape(height, s, width, s).transpose(0, 2, 1, 3).reshape(height, width, s * s)
  owners = blocks(owner)
  votes = np.where(owners > 0, (owners[..., :, None] == owners[..., None, :]).sum(-1), 0)
  best = np.take_along_axis(owners, votes.argmax(-1)[..., None], -1)[..., 0]  # [H, W]
  coverage = votes.max(-1) / (s * s)
  has = best > 0
  class_of = np.concatenate([[num_classes], np.where(near["class_index"] == UNMAPPED,
                                                      num_classes, near["class_index"])])
  labelled = has & (coverage >= min_coverage) & ~blocks(conflict).any(-1)
  labels = np.where(labelled, class_of[best], num_classes).astype(np.int32)
  ids = np.concatenate([[0], near["parcel_id"].to_numpy()])[best]
  return labels, np.where(has, ids, 0).astype(np.int32)
