"""Procedural Sentinel-2-like image time series of crop parcels (pure numpy).

One sample is a small agricultural scene seen on irregular dates of one year, built like this:

* Geometry, drawn on a 12x finer grid and then averaged to the 10 m pixel grid, so that pixels
  on a boundary are genuinely mixed: Voronoi parcels (seeds also outside the image, so fields run
  across its borders), thin grass margins along some parcel boundaries, 0-2 straight roads.
  Most parcels grow one of the 12 crops of `CLASS_NAMES`; the others are forest, an unlisted
  crop, built-up land or water, labelled unknown like margins and roads.
* Ground truths on three grids from that one geometry: 10 m, 5 m (x2) and 2.5 m (x4), each cell
  labelled with the entity covering most of it (ties, only where three entities meet, go to
  the lower entity index), so the x2 / x4 labels are real finer ground truths, never upsampled
  10 m labels. The scene is uniform within an entity at the render scale except for smooth
  10 m fields (phenology shift, brightness), so each 10 m pixel is the area average of the
  fine scene: a mix of its entities by their area fractions.
* Phenology: green, dry and flowering cover fractions per surface type (green-up, senescence,
  harvest, rapeseed flowering, mowing cuts); the rest of the pixel is soil. Several crops are
  deliberately close (winter wheat/barley; maize/sunflower/soybean; the meadows and alfalfa).
  Timings vary per sample (weather), per parcel and per pixel (a smooth shift of a few days).
* Spectra: a linear mix of green vegetation (with a per-crop spectral signature), dry
  vegetation, yellow flowers and soil (darker on wet dates) endmembers in the 13 bands, a smooth
  per-pixel brightness field and sensor noise.
* Clouds and their shadows cover parts of some dates.
* The 20 m and 60 m bands are blurred with the footprint of "average at the native resolution,
  then upsample bilinearly to 10 m" (a tent filter), as in the real pre-processing.

Values are uint16 digital numbers: surface reflectance x 1e4, as in Sentinel-2 L2A products
(processing baselines before 04.00, i.e. without the +1000 radiometric offset), bands in
`cscl_jax.features.BANDS` order. Everything follows from the `np.random.Generator` passed in.
"""

from typing import NamedTuple
import zlib

import numpy as np

CLASS_NAMES = ("winter_wheat", "winter_barley", "spring_barley", "winter_rapeseed", "maize",
               "sunflower", "soybean", "potato", "permanent_meadow", "temporary_meadow",
               "alfalfa", "vineyard")
UNKNOWN = len(CLASS_NAMES)  # label of margins, roads and non-crop parcels
# Geometry is drawn on a grid RENDER times finer than 10 m (0.83 m): 3x3 render cells to
# a 2.5 m label cell, so the largest coverage there ties only where three entities meet.
RENDER = 12
LABEL_MAGNIFICATIONS = (2, 4)  # the 5 m and 2.5 m label grids besides 10 m

_NEVER = 999.0  # a day that never comes within the year


class _Surface(NamedTuple):
  """Phenology (days of year) and spectral signature of one surface type."""
  vmin: float  # green cover before green-up (winter crops are already up)
  vmax: float  # green cover at peak
  sos: float  # green-up mid-point
  rise: float  # green-up width
  sen: float  # senescence mid-point (green turns dry)
  fall: float  # senescence width
  harvest: float  # dry cover is cut down to stubble
  vdry: float  # dry cover after senescence
  flower: float = _NEVER  # day of peak (yellow) flowering
  cuts: tuple[float, float, float] = (_NEVER, _NEVER, _NEVER)  # mowing days
  gain: tuple[float, float, float] = (1.0, 1.0, 1.0)  # green spectrum x (visible, NIR, SWIR)


_CROPS = (
    _Surface(0.25, 0.90, 80, 12, 165, 8, 195, 0.75, gain=(0.95, 0.95, 1.00)),  # winter wheat
    _Surface(0.25, 0.85, 70, 12, 152, 8, 182, 0.70, gain=(1.00, 0.92, 1.02)),  # winter barley
    _Surface(0.00, 0.85, 110, 9, 178, 8, 208, 0.70, gain=(1.00, 0.94, 1.00)),  # spring barley
    _Surface(0.35, 0.90, 60, 12, 160, 8, 187, 0.75, flower=112,
             gain=(1.10, 1.05, 1.00)),  # winter rapeseed
    _Surface(0.00, 0.95, 160, 10, 245, 10, 280, 0.80, gain=(1.00, 1.12, 0.95)),  # maize
    _Surface(0.00, 0.85, 148, 9, 222, 9, 255, 0.80, gain=(0.92, 1.08, 0.97)),  # sunflower
    _Surface(0.00, 0.90, 168, 9, 250, 9, 275, 0.60, gain=(1.00, 1.09, 0.97)),  # soybean
    _Surface(0.00, 0.90, 140, 8, 212, 7, 240, 0.50, gain=(1.05, 1.15, 0.90)),  # potato
    _Surface(0.55, 0.88, 80, 20, _NEVER, 10, _NEVER, 0.00, cuts=(150, 230, _NEVER),
             gain=(1.05, 0.90, 1.05)),  # permanent meadow
    _Surface(0.50, 0.85, 75, 18, _NEVER, 10, _NEVER, 0.00, cuts=(135, 190, 250),
             gain=(1.02, 0.93, 1.02)),  # temporary meadow
    _Surface(0.35, 0.95, 85, 15, _NEVER, 10, _NEVER, 0.00, cuts=(140, 180, 225),
             gain=(0.95, 1.05, 0.98)),  # alfalfa
    _Surface(0.05, 0.45, 130, 10, 285, 12, _NEVER, 0.15, gain=(1.10, 0.85, 1.10)),  # vineyard
)
_MARGIN = _Surface(0.55, 0.80, 90, 20, 300, 20, _NEVER, 0.20, gain=(1.05, 0.88, 1.05))
_FOREST = _Surface(0.35, 0.90, 115, 8, 300, 10, _NEVER, 0.30, gain=(0.70, 0.85, 0.85))
_BARE = _Surface(0.0, 0.0, _NEVER, 10, _NEVER, 10, _NEVER, 0.0)

# Endmember reflectances in BANDS order: B04 B03 B02 B08 | B05 B06 B07 B8A B11 B12 | B01 B09 B10.
_GREEN = np.array([.035, .075, .040, .400, .110, .290, .370, .420, .200, .100, .030, .130, .005])
_DRY = np.array([.150, .110, .080, .280, .190, .230, .260, .290, .350, .250, .060, .100, .005])
_FLOWERS = np.array([.110, .160, .050, .420, .200, .320, .380, .420, .250, .140, .040, .140, .005])
_SOIL = np.array([.170, .130, .100, .240, .190, .210, .225, .250, .320, .270, .085, .090, .004])
_ASPHALT = np.array([.100, .090, .080, .120, .105, .110, .115, .125, .150, .140, .080, .060, .003])
_URBAN = np.array([.160, .140, .120, .200, .170, .180, .190, .200, .240, .220, .110, .100, .005])
_WATER = np.array([.020, .040, .050, .015, .020, .015, .012, .012, .008, .006, .060, .005, .002])
_CLOUD = np.array([.450, .460, .480, .500, .480, .490, .500, .500, .350, .250, .500, .300, .250])
# Band groups for the green-vegetation gains, and the native resolution of each band.
_GAIN_GROUP = np.array([0, 0, 0, 1, 0, 1, 1, 1, 2, 2, 0, 1, 0])  # visible | NIR | SWIR
_BANDS_20M = slice(4, 10)
_BANDS_60M = slice(10, 13)
_SHIFT_STEP = 3.0  # days
_SHIFTS = _SHIFT_STEP * np.arange(-2, 3)  # per-pixel phenology shifts interpolated between


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """Returns the generator of sample `index` of `split`: a stable hash of the three."""
  return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def acquisition_days(rng: np.random.Generator, num_dates: int) -> np.ndarray:
  """Returns `num_dates` sorted distinct days of year on a 5-day revisit, more in summer."""
  days = np.arange(rng.integers(1, 6), 366, 5)
  weight = 1.0 + 1.5 * np.exp(-((days - 190) / 70.0) ** 2)  # fewer cloud-free winter dates
  return np.sort(rng.choice(days, size=num_dates, replace=False, p=weight / weight.sum()))


def cover_fractions(surfaces: _Surface, doy: np.ndarray) -> np.ndarray:
  """Returns green, dry and flower cover [3, S, T] of surfaces (fields arrays [S]) on days [T]."""
  col = lambda field: np.asarray(field, np.float32)[:, None]  # [S, 1]
  t = np.asarray(doy, np.float32)[None]  # [1, T]
  up = _sigmoid((t - col(surfaces.sos)) / col(surfaces.rise))
  down = _sigmoid((t - col(surfaces.sen)) / col(surfaces.fall))
  cuts = np.asarray(surfaces.cuts, np.float32)[..., None]  # [S, 3, 1]
  regrowth = np.exp(-np.clip(t[:, None] - cuts, 0, None) / 20)
  cut = np.prod(1 - 0.65 * (t[:, None] >= cuts) * regrowth, axis=1)
  vmin, vmax = col(surfaces.vmin), col(surfaces.vmax)
  green = (vmin + (vmax - vmin) * up) * (1 - down) * cut
  harvest = col(surfaces.harvest)
  harvested = _sigmoid((t - harvest) / 2)
  stubble = 0.25 * harvested * np.exp(-np.clip(t - harvest, 0, None) / 40)
  dry = col(surfaces.vdry) * down * (1 - harvested) + stubble
  flowers = 0.6 * green * np.exp(-((t - col(surfaces.flower)) / 9) ** 2)
  return np.stack([green - flowers, dry, flowers])


def _sigmoid(x):
  return 1 / (1 + np.exp(-np.clip(x, -50, 50)))


def _stack(surfaces) -> _Surface:
  """Turns a list of surfaces into one `_Surface` of arrays [S] (cuts [S, 3], gain [S, 3])."""
  return _Surface(*(np.array(f, np.float32) for f in zip(*surfaces)))


def _parcels(rng, num):
  """Draws the surfaces, soils and labels of `num` parcels."""
  kind = rng.choice(5, size=num, p=[0.82, 0.06, 0.05, 0.04, 0.03])  # crop|forest|other|urban|water
  crop = rng.integers(0, len(CLASS_NAMES), size=num)
  other = rng.integers(0, len(CLASS_NAMES), size=num)
  surfaces = [_CROPS[c] if k == 0 else (_FOREST, _CROPS[o], _BARE, _BARE)[k - 1]
              for k, c, o in zip(kind, crop, other)]
  shift = rng.normal(0, 6, size=num) + np.where(kind == 2, rng.normal(0, 20, size=num), 0)
  surfaces = [s._replace(sos=s.sos + d, sen=s.sen + d, harvest=s.harvest + d,
                         flower=s.flower + d, cuts=tuple(np.add(s.cuts, rng.normal(d, 8, 3))),
                         vmax=min(0.97, s.vmax * rng.uniform(0.9, 1.06)))
              for s, d in zip(surfaces, shift)]
  soil = np.where((kind == 3)[:, None], _URBAN, np.where((kind == 4)[:, None], _WATER, _SOIL))
  soil = soil * rng.uniform(0.75, 1.25, size=(num, 1)) * np.where(kind == 1, 0.6, 1.0)[:, None]
  labels = np.where(kind == 0, crop, UNKNOWN)
  return surfaces, soil, labels


def _geometry(rng, height, width, num_parcels):
  """Returns the entity at every render cell [H*R, W*R]: parcel i, margin P or road P + 1."""
  r = RENDER
  ys = ((np.arange(height * r, dtype=np.float32) + 0.5) / r)[:, None]  # [Hr, 1]
  xs = ((np.arange(width * r, dtype=np.float32) + 0.5) / r)[None, :]  # [1, Wr]
  seeds = rng.uniform(-0.15, 1.15, size=(num_parcels, 2)) * (height, width)
  # Nearest (a) and second-nearest (b) seed of every cell, one seed at a time: [Hr, Wr] each.
  d2_a, d2_b = (np.full((height * r, width * r), np.inf, np.float32) for _ in range(2))
  a, b = (np.zeros((height * r, width * r), np.int32) for _ in range(2))
  for i, (y, x) in enumerate(seeds.astype(np.float32)):
    d2 = (ys - y) ** 2 + (xs - x) ** 2
    closer = d2 < d2_a
    second = ~closer & (d2 < d2_b)
    b[second], d2_b[second] = i, d2[second]
    b[closer], d2_b[closer] = a[closer], d2_a[closer]
    a[closer], d2_a[closer] = i, d2[closer]
  # Distance to the bisector between the nearest and second-nearest seed.
  gap = np.linalg.norm(seeds[:, None] - seeds[None], axis=-1).astype(np.float32)  # [P, P]
  to_edge = (d2_b - d2_a) / (2 * gap[a, b])
  margin = np.where(rng.random(num_parcels) < 0.6, rng.uniform(0.3, 1.0, num_parcels), 0.0)
  entity = np.where(to_edge < margin[a], num_parcels, a)
  for _ in range(rng.choice(3, p=[0.4, 0.4, 0.2])):  # roads
    angle = rng.uniform(0, np.pi)
    normal = np.array([np.cos(angle), np.sin(angle)])
    offset = normal @ (rng.uniform(0.1, 0.9, 2) * (height, width))
    road = np.abs(ys * normal[0] + xs * normal[1] - offset) < rng.uniform(0.4, 1.0)
    entity = np.where(road, num_parcels + 1, entity)
  return entity


def cell_fractions(entity: np.ndarray, num_entities: int, magnification: int) -> np.ndarray:
  """Returns the area fraction of each entity in each cell of the grid m times finer than 10 m.

  Args:
    entity: entity index of every render cell [H * RENDER, W * RENDER].
    num_entities: E.
    magnification: m, a divisor of RENDER; cells are 10 m / m wide.

  Returns:
    float32 [m H, m W, E], each cell's fractions summing to 1.
  """
  s = RENDER // magnification
  hs, ws = entity.shape
  cell = (np.arange(hs)[:, None] // s) * (ws // s) + np.arange(ws)[None] // s
  counts = np.bincount((cell * num_entities + entity).ravel(),
                       minlength=(hs // s) * (ws // s) * num_entities)
  return counts.reshape(hs // s, ws // s, num_entities).astype(np.float32) / s**2


def _smooth_field(rng, height, width, num_waves=6):
  """Returns a smooth random field [H, W] of unit variance (random plane waves)."""
  ys, xs = np.mgrid[:height, :width]
  angle, phase = rng.uniform(0, 2 * np.pi, (2, num_waves, 1, 1))
  k = 2 * np.pi / rng.uniform(8, 40, (num_waves, 1, 1))
  waves = np.cos(k * (np.cos(angle) * ys + np.sin(angle) * xs) + phase)
  return (waves.sum(0) * np.sqrt(2.0 / num_waves)).astype(np.float32)


def _spectra(surfaces, soil, doy, moisture):
  """Returns the reflectance [E, T, 13] of each entity on each day."""
  green, dry, flowers = cover_fractions(surfaces, doy)  # [E, T] each
  bare = np.clip(1 - green - dry - flowers, 0, 1)
  veg = _GREEN * surfaces.gain[:, _GAIN_GROUP]  # [E, 13]
  return (green[..., None] * veg[:, None] + dry[..., None] * _DRY + flowers[..., None] * _FLOWERS
          + (bare * moisture)[..., None] * soil[:, None])


def _mix(weights, spectra):
  """Returns sum_{k,e} weights[p, k, e] * spectra[k, e] for each pixel p: [P, D].

  Only the few nonzero terms of each pixel are summed: a BLAS matmul would do the same work
  ~10x faster on an idle core but spins threads against the generator threads (3x slower in
  total on 2 busy cores).
  """
  p, k, e = np.nonzero(weights)  # sorted by pixel; every pixel has a term
  terms = spectra[k, e] * weights[p, k, e, None].astype(spectra.dtype)  # [N, D]
  return np.add.reduceat(terms, np.flatnonzero(np.diff(p, prepend=-1)), axis=0)


def _tent_blur(planes, radius):
  """Blurs planes [..., H, W] with a tent of `radius` pixels (edges replicated)."""
  taps = (radius - np.abs(np.arange(1 - radius, radius))).astype(np.float32)
  taps /= taps.sum()
  r, (h, w) = radius - 1, planes.shape[-2:]
  pad = [(0, 0)] * (planes.ndim - 2)
  padded = np.pad(planes, pad + [(r, r), (0, 0)], mode="edge")
  planes = sum(k * padded[..., i:i + h, :] for i, k in enumerate(taps))
  padded = np.pad(planes, pad + [(0, 0), (r, r)], mode="edge")
  return sum(k * padded[..., i:i + w] for i, k in enumerate(taps))


def _clouds(rng, image):
  """Covers random dates of `image` [T, 13, H, W] partly with clouds and their shadows."""
  height, width = image.shape[-2:]
  cloudy = np.flatnonzero(rng.random(image.shape[0]) < rng.uniform(0.05, 0.35))
  n = cloudy.size
  ys, xs = np.mgrid[:height, :width]
  centre = rng.uniform(-0.2, 1.2, (n, 3, 2, 1, 1)) * np.array([height, width])[:, None, None]
  sigma = rng.uniform(0.08, 0.3, (n, 3, 1, 1)) * max(height, width)
  present = rng.random((n, 3, 1, 1)) < np.array([1.0, 0.5, 0.3])[:, None, None]  # 1-3 blobs
  threshold = rng.uniform(0.3, 0.9, (n, 1, 1))
  sun = rng.uniform(0, 2 * np.pi)
  shadow_shift = rng.uniform(3, 8) * np.array([np.cos(sun), np.sin(sun)])

  def cover(dy, dx):  # [n, 1, H, W] in [0, 1]
    d2 = (ys - centre[:, :, 0] - dy) ** 2 + (xs - centre[:, :, 1] - dx) ** 2
    density = (present * np.exp(-d2 / (2 * sigma**2))).sum(1)
    return np.clip((density - threshold) / 0.35, 0, 1)[:, None].astype(np.float32)

  cloud = cover(0, 0) * rng.uniform(0.5, 1.0, (n, 1, 1, 1)).astype(np.float32)
  shadow = cover(*shadow_shift) * (1 - cloud)
  white = (rng.uniform(0.8, 1.2, (n, 1)) * _CLOUD).astype(np.float32)[..., None, None]
  image[cloudy] = image[cloudy] * ((1 - 0.6 * shadow) * (1 - cloud)) + cloud * white
  return image


def generate_sample(rng: np.random.Generator, height: int, width: int, *,
                    min_dates: int = 20, max_dates: int = 40) -> dict[str, np.ndarray]:
  """Simulates one sample.

  Args:
    rng: the only source of randomness (see `sample_rng`).
    height: image height in 10 m pixels.
    width: image width in 10 m pixels.
    min_dates: fewest acquisition dates.
    max_dates: most acquisition dates.

  Returns:
    The `cscl_jax.features` example: "image" uint16 [T, H, W, 13] (reflectance x 1e4),
    "doy" int32 [T], "labels" int32 [H, W] (UNKNOWN = 12 for background), "parcel_ids"
    int32 [H, W] (1.. for crop parcels, 0 elsewhere), and the same ground truths at 5 m and
    2.5 m: "labels_x2", "parcel_ids_x2" [2H, 2W], "labels_x4", "parcel_ids_x4" [4H, 4W].
  """
  doy = acquisition_days(rng, int(rng.integers(min_dates, max_dates + 1)))
  num_dates, num_parcels = doy.size, max(2, int(rng.integers(4, 15) * height * width / 48**2))
  surfaces, soil, labels = _parcels(rng, num_parcels)
  entities = _stack(surfaces + [_MARGIN, _BARE])  # parcels, margin, road
  soil = np.concatenate([soil, _SOIL[None] * rng.uniform(0.8, 1.2), _ASPHALT[None]])
  labels = np.append(labels, [UNKNOWN, UNKNOWN])
  ids = np.append(np.where(labels[:-2] < UNKNOWN, np.arange(1, num_parcels + 1), 0), [0, 0])
  entity = _geometry(rng, height, width, num_parcels)  # [H * RENDER, W * RENDER]
  fractions = cell_fractions(entity, num_parcels + 2, 1)  # [H, W, E]

  # Each pixel mixes the entities it covers (area fractions) seen on its dates shifted by a
  # smooth per-pixel offset of a few days, interpolated between shifts of _SHIFT_STEP days.
  weather = rng.normal(0, 5)  # the whole season is early or late
  moisture = np.tile(1 - 0.3 * rng.random(num_dates) ** 2, _SHIFTS.size)  # wet soil is darker
  days = (doy[None] - weather - _SHIFTS[:, None]).ravel()  # [K * T]
  spectra = _spectra(entities, soil, days, moisture).reshape(-1, _SHIFTS.size, num_dates, 13)
  shift = np.clip(3 * _smooth_field(rng, height, width).ravel(), _SHIFTS[0], _SHIFTS[-1])
  hat = np.clip(1 - np.abs(shift - _SHIFTS[:, None]) / _SHIFT_STEP, 0, None)  # [K, H * W]
  weights = hat.T[:, :, None] * fractions.reshape(height * width, 1, -1)  # [H * W, K, E]
  spectra = spectra.transpose(1, 0, 2, 3).reshape(*weights.shape[1:], -1).astype(np.float32)
  image = _mix(weights, spectra)  # [H * W, T * 13]
  image *= 1 + 0.04 * _smooth_field(rng, height, width).ravel()[:, None]  # brightness
  image = np.ascontiguousarray(  # [T, 13, H, W]
      image.reshape(height, width, num_dates, 13).transpose(2, 3, 0, 1))
  image = _clouds(rng, image)
  image += rng.standard_normal(image.shape, dtype=np.float32) * (0.002 + 0.015 * image)
  image[:, _BANDS_20M] = _tent_blur(image[:, _BANDS_20M], 2)
  image[:, _BANDS_60M] = _tent_blur(image[:, _BANDS_60M], 6)
  image = np.clip(np.rint(image * 1e4), 0, 65535).astype(np.uint16)

  sample = {"image": np.ascontiguousarray(np.transpose(image, (0, 2, 3, 1))),  # [T, H, W, 13]
            "doy": doy.astype(np.int32)}
  for m in (1,) + LABEL_MAGNIFICATIONS:  # largest coverage on each grid: [m H, m W]
    major = (fractions if m == 1 else cell_fractions(entity, num_parcels + 2, m)).argmax(-1)
    suffix = "" if m == 1 else f"_x{m}"
    sample["labels" + suffix] = labels[major].astype(np.int32)
    sample["parcel_ids" + suffix] = ids[major].astype(np.int32)
  return sample
