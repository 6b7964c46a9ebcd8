"""Input pipeline: SITS datasets from TFDS to per-device batches for `jax.pmap`.

Every dataset follows `cscl_jax.features`. An example becomes, as in the reference
pre-processing (SPEC.md §4):

  inputs  float32 [T, S, S, C+1] the dataset's C bands x REFLECTANCE_SCALE (in the order of its
                                 info.metadata["bands"]), then doy / DOY_SCALE; the time
                                 axis cut to T = max_seq_len dates (config.dataset.time_sampling:
                                 "first": the first T, as the reference; "even": T evenly spaced
                                 by index, first and last kept) or zero-padded;
                                 S = img_res, a random crop for training, the centre for eval.
  labels  int32   [mS, mS]       class index, num_classes = unknown; m =
                                 config.dataset.label_magnification (= model.output_magnification):
                                 the dataset's `labels_x{m}` for m > 1, cropped at m times the
                                 input's offsets and flipped with it.
  valid   bool    [mS, mS]       labels != num_classes.

Training also flips at random horizontally and vertically. Batches are [D, b, ...] with
D = jax.local_device_count() and b = batch_size / process_count / D; each process reads its own
share of the split (`tfds.split_for_jax_process`).

Training iterators are infinite and deterministic: epoch e is the process's share shuffled with
a seed from (config.seed, e) and cut into whole batches, so step s is batch s % steps_per_epoch
of epoch s // steps_per_epoch. Resuming at `start_step` skips the examples of the batches
already seen before they are pre-processed, and crops and flips use stateless seeds from
(shuffle seed, position in the epoch): a resumed run sees exactly the batches an uninterrupted
one would.

Eval iterators make one pass over the split in order. Every process yields the same number of
batches (collectives need that); the last ones are padded with blank examples whose
`example_mask` is False and whose pixels are all invalid, as flax's imagenet example pads, so
every example of the split counts exactly once on any number of processes and devices.
"""

import dataclasses
import math
import os
from typing import Any, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cscl_jax import features
from tfds_builders import mtlcc
from tfds_builders import pastis
from tfds_builders import sits_synthetic
from tfds_builders import t31tfm_1618

# TFDS dataset name -> package of its builder (importing the package registers the builder).
_BUILDERS = {"mtlcc": mtlcc, "pastis": pastis, "sits_synthetic": sits_synthetic,
             "t31tfm_1618": t31tfm_1618}
_TIME_SAMPLINGS = ("first", "even")


@dataclasses.dataclass(frozen=True)
class SitsInfo:
  """What training needs to know about a dataset.

  Attributes:
    num_classes: number of real classes; the label `num_classes` means unknown.
    class_names: name of each class.
    num_examples: examples per split, all processes together.
    image_size: (H, W) of the stored images.
    bands: the image's bands, in channel order; the inputs append day of year.
    builder: the prepared TFDS builder (`create_split(..., info=info)` reads through it
      instead of opening and checking the dataset again).
  """
  num_classes: int
  class_names: tuple[str, ...]
  num_examples: dict[str, int]
  image_size: tuple[int, int]
  bands: tuple[str, ...]
  builder: Any = dataclasses.field(default=None, compare=False, repr=False)

  @property
  def unknown_label(self) -> int:
    return self.num_classes

  @property
  def rgb_channels(self) -> tuple[int, int, int]:
    """The input channels of B04, B03, B02 (red, green, blue); (0, 1, 2) if one is absent."""
    rgb = ("B04", "B03", "B02")
    return tuple(self.bands.index(b) for b in rgb) if set(rgb) <= set(self.bands) else (0, 1, 2)


def _build_command(config: ml_collections.ConfigDict, **flags: str) -> str:
  """The `tfds build` command line of config.dataset; `flags` override its flags."""
  d = config.dataset
  flags = {**{k: d[k] for k in ("data_dir", "manual_dir") if d[k]}, **flags}
  return (f"python -m tensorflow_datasets.scripts.cli.main build tfds_builders/{d.name} "
          f"--config={d.config}" + "".join(f" --{k}={v}" for k, v in flags.items()))


def _generated_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Returns the builder of a dataset written by `python -m cscl_jax.datagen` (latest version)."""
  d = config.dataset
  folder = tfds.core.Path(d.data_dir or tfds.core.constants.DATA_DIR) / d.name / d.config
  versions = sorted((p for p in folder.glob("*/dataset_info.json")
                     if tfds.core.Version.is_valid(p.parent.name)),
                    key=lambda p: tfds.core.Version(p.parent.name)) if folder.exists() else []
  if not versions:
    raise ValueError(f"config.dataset.name={d.name!r} is neither a SITS dataset "
                     f"{sorted(_BUILDERS)} nor a dataset made by `python -m cscl_jax.datagen` "
                     f"in {folder} (set config.dataset.data_dir to its --out).")
  return tfds.builder_from_directory(str(versions[-1].parent))


def _prepared_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Returns the dataset builder, preparing the dataset first if it is not on disk."""
  d = config.dataset
  if d.name not in _BUILDERS:
    return _generated_builder(config)
  builder = _BUILDERS[d.name].Builder(config=d.config, data_dir=d.data_dir)
  if not builder.is_prepared():
    if jax.process_count() > 1:
      raise RuntimeError(f"{d.name}/{d.config} is not prepared in {builder.data_dir}; build it "
                         f"once before a multi-process run: {_build_command(config)}")
    _check_manual_dir(config, builder)
    logging.info("Preparing %s/%s in %s (only on first use).", d.name, d.config,
                 builder.data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=d.manual_dir))
  return builder


def _bands(builder) -> tuple[str, ...]:
  """The dataset's band set: metadata["bands"], checked against the image feature's channels."""
  num_bands = builder.info.features["image"].shape[-1]
  # Datasets built before the band set was recorded hold the 13 reference bands.
  bands = tuple(builder.info.metadata.get("bands", features.BANDS))
  if len(bands) != num_bands:
    raise ValueError(f"{builder.name}: metadata['bands'] names {len(bands)} bands {bands} but "
                     f"the image feature has {num_bands} channels; rebuild the dataset.")
  return bands


def _check_manual_dir(config, builder) -> None:
  """One clear error where a dataset downloaded by hand is not in its manual dir."""
  instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if not instructions:
    return
  manual_dir = config.dataset.manual_dir or os.path.join(builder.data_dir_root, "downloads",
                                                         "manual")
  if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
    raise ValueError(
        f"{config.dataset.name} is downloaded by hand, and its manual dir {manual_dir!r} "
        f"{'is empty' if os.path.isdir(manual_dir) else 'does not exist'}. "
        f"{instructions.strip()}\nThen pass --config.dataset.manual_dir=<that folder>, or "
        f"build it once: {_build_command(config, manual_dir='<that folder>')}")


def _info_and_check(config, builder) -> SitsInfo:
  """Reads the dataset's info; raises one error listing every config field that misfits."""
  d = config.dataset
  first = next(iter(builder.info.splits))
  m = d.label_magnification
  if m not in (1, 2, 4) or features.label_key(m) not in builder.info.features:
    fine = sorted(k for k in builder.info.features.keys() if k.startswith("labels_x"))
    raise ValueError(
        f"config.model.output_magnification={m} needs the labels {features.label_key(m)!r} "
        f"rasterised at {10 / m:g} m, which {d.name}/{d.config} does not have (its finer "
        f"labels: {fine or 'none'}). Use 1, or a dataset with them: sits_synthetic (x2, x4), "
        "t31tfm_1618 with --config.dataset.config=x4 (x4).")
  # No auto-cache: reading one example of a cached dataset makes tf.data warn.
  one = builder.as_dataset(split=first, read_config=tfds.ReadConfig(try_autocache=False))
  example = next(iter(one.take(1)))
  labels = example["labels"]
  if example[features.label_key(m)].shape != (m * labels.shape[0], m * labels.shape[1]):
    raise ValueError(f"{d.name}/{d.config}: {features.label_key(m)} has shape "
                     f"{example[features.label_key(m)].shape}, not {m}x the labels' "
                     f"{tuple(labels.shape)}; rebuild the dataset.")
  info = SitsInfo(
      num_classes=len(builder.info.metadata["class_names"]),
      class_names=tuple(builder.info.metadata["class_names"]),
      num_examples={s: v.num_examples for s, v in builder.info.splits.items()},
      image_size=tuple(labels.shape), bands=_bands(builder), builder=builder)
  problems = [f"split {s!r} (config.dataset.{k}) does not exist; the splits are "
              f"{sorted(info.num_examples)}"
              for k, s in (("train_split", d.train_split), ("eval_split", d.eval_split))
              if s not in info.num_examples]
  if d.num_classes != info.num_classes:
    problems.append(f"config.model.num_classes={d.num_classes}, but {d.name} has "
                    f"{info.num_classes} classes (unknown = {info.num_classes})")
  if d.num_channels != len(info.bands) + 1:
    problems.append(f"config.model.num_channels={d.num_channels}, but the inputs have the "
                    f"{len(info.bands)} bands of {d.name} ({' '.join(info.bands)}) + day of "
                    f"year = {len(info.bands) + 1}")
  if not 0 < d.img_res <= min(info.image_size):
    problems.append(f"config.model.img_res={d.img_res} does not fit the {info.image_size} "
                    f"images of {d.name}/{d.config}")
  if d.max_seq_len < 1:
    problems.append(f"config.model.max_seq_len={d.max_seq_len} must be >= 1")
  if d.time_sampling not in _TIME_SAMPLINGS:
    problems.append(f"config.dataset.time_sampling={d.time_sampling!r} must be one of "
                    f"{_TIME_SAMPLINGS}")
  if problems:
    raise ValueError(f"The config does not fit {d.name}/{d.config}:\n  " + "\n  ".join(problems))
  return info


def dataset_info(config: ml_collections.ConfigDict) -> SitsInfo:
  """Returns the dataset's `SitsInfo`, preparing it first if needed.

  Args:
    config: the run config; uses config.dataset.*.

  Raises:
    ValueError: where config.dataset does not fit the data (classes, channels, sizes, splits).
  """
  return _info_and_check(config, _prepared_builder(config))


def _batch_shape(config) -> tuple[int, int]:
  """Returns (local devices D, per-device batch b)."""
  devices, processes = jax.local_device_count(), jax.process_count()
  if config.batch_size % (processes * devices):
    raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of "
                     f"{processes} processes x {devices} local devices.")
  return devices, config.batch_size // processes // devices


def _time_indices(num_dates: tf.Tensor, max_len: int, sampling: str) -> tf.Tensor:
  """Dates to keep, at most max_len: the first ones, or evenly spaced by index (not by day)."""
  kept = tf.minimum(num_dates, max_len)
  steps = tf.range(kept)  # [t]
  if sampling == "first":
    return steps
  # round(i * (num_dates - 1) / (kept - 1)), half up, in exact integer arithmetic.
  span = tf.maximum(kept - 1, 1)
  return (2 * steps * (num_dates - 1) + span) // (2 * span)


def _maybe_flip(x, flip, axis):
  return tf.where(flip, tf.reverse(x, [axis]), x)


def preprocess(example: dict[str, tf.Tensor], config: ml_collections.ConfigDict,
               seed: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
  """Turns one stored example into {"inputs", "labels", "valid"} (see the module docstring).

  Args:
    example: "image" uint16 [T, H, W, C], "doy" int32 [T], "labels" int32 [H, W] (and
      "labels_x{m}" [m H, m W] for a label magnification m > 1).
    config: uses config.dataset.{img_res, max_seq_len, time_sampling, num_classes,
      num_channels, label_magnification} (num_channels = C + 1, checked by `dataset_info`).
    seed: int64 [2] stateless seed: random crop and flips (training); None: centre crop.
  """
  size, max_len = config.dataset.img_res, config.dataset.max_seq_len
  m = config.dataset.label_magnification
  labels = example[features.label_key(m)]  # [m H, m W]
  height, width = tf.unstack(tf.shape(example["labels"]))
  tf.debugging.assert_greater_equal(tf.minimum(height, width), size, message=(
      f"an image is smaller than config.model.img_res={size}"))
  if seed is None:
    top, left = (height - size) // 2, (width - size) // 2
  else:
    seeds = tf.random.experimental.stateless_split(seed, 3)
    top = tf.random.stateless_uniform([], seeds[0], 0, height - size + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[1], 0, width - size + 1, dtype=tf.int32)
  dates = _time_indices(tf.shape(example["doy"])[0], max_len, config.dataset.time_sampling)
  image = tf.gather(example["image"][:, top:top + size, left:left + size], dates)  # [t, S, S, C]
  doy = tf.cast(tf.gather(example["doy"], dates), tf.float32) / features.DOY_SCALE  # [t]
  labels = labels[m * top:m * (top + size), m * left:m * (left + size)]  # [m S, m S]
  doy = tf.broadcast_to(doy[:, None, None, None], [tf.shape(doy)[0], size, size, 1])
  inputs = tf.concat([tf.cast(image, tf.float32) * features.REFLECTANCE_SCALE, doy], -1)
  inputs = tf.pad(inputs, [[0, max_len - tf.shape(inputs)[0]], [0, 0], [0, 0], [0, 0]])
  if seed is not None:
    flips = tf.random.stateless_uniform([2], seeds[2]) < 0.5  # horizontal, vertical
    inputs, labels = _maybe_flip(inputs, flips[0], 2), _maybe_flip(labels, flips[0], 1)
    inputs, labels = _maybe_flip(inputs, flips[1], 1), _maybe_flip(labels, flips[1], 0)
  inputs = tf.ensure_shape(inputs, [max_len, size, size, config.dataset.num_channels])
  labels = tf.ensure_shape(tf.cast(labels, tf.int32), [m * size, m * size])
  return {"inputs": inputs, "labels": labels, "valid": labels != config.dataset.num_classes}


def _train_dataset(records, config, per_process, start_step, steps_per_epoch, batch):
  """Infinite [D, b, ...] batches; epoch e shuffled with a seed from (config.seed, e)."""
  start_epoch, skip = divmod(start_step, steps_per_epoch)

  def epoch(e):
    key = tf.stack([tf.constant(config.seed, tf.int64), e])
    shuffle_seed = tf.random.stateless_uniform([], key, None, None, dtype=tf.int64)
    ds = records.shuffle(config.dataset.shuffle_buffer, seed=shuffle_seed).enumerate()
    ds = ds.skip(tf.where(e == start_epoch, np.int64(skip * per_process), np.int64(0)))
    ds = ds.map(lambda i, ex: preprocess(ex, config, tf.stack([shuffle_seed, i])),
                num_parallel_calls=tf.data.AUTOTUNE)
    return batch(ds)

  return tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch)


def _eval_dataset(records, config, num_examples, batch):
  """One ordered pass, padded with blank examples to `num_examples`; [D, b, ...] batches."""
  real = records.map(lambda ex: {**preprocess(ex, config), "example_mask": tf.constant(True)},
                     num_parallel_calls=tf.data.AUTOTUNE)

  def blank(spec):  # Unknown labels, no valid pixel (False), zero inputs.
    value = config.dataset.num_classes if spec.dtype.is_integer else 0
    return tf.fill(spec.shape, tf.cast(value, spec.dtype))

  padding = tf.data.Dataset.from_tensors(tf.nest.map_structure(blank, real.element_spec))
  return batch(real.concatenate(padding.repeat()).take(num_examples))


def _read_features(config: ml_collections.ConfigDict) -> tfds.decode.PartialDecoding:
  """Only the features `preprocess` reads are parsed and decoded (not the parcel ids, nor
  the label grids of other magnifications: zlib-compressed, most of the decoding time)."""
  keys = {"image", "doy", "labels", features.label_key(config.dataset.label_magnification)}
  return tfds.decode.PartialDecoding({k: True for k in keys})


def create_split(config: ml_collections.ConfigDict, split: str, *, train: bool,
                 start_step: int = 0,
                 info: SitsInfo | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Returns an iterator of numpy batches of this process's share of `split`.

  Args:
    config: the run config; uses config.dataset.*, config.batch_size and config.seed.
    split: TFDS split name, e.g. config.dataset.train_split.
    train: training (infinite, shuffled, random crops and flips, whole batches only) or
      eval (one ordered pass, centre crops, the last batches padded; see module docstring).
    start_step: training step to resume at; its batch comes first.
    info: `dataset_info(config)`, to read through its builder without opening and checking
      the dataset again (None: open and check it).

  Returns:
    Batches {"inputs": float32 [D, b, T, S, S, C+1], "labels": int32 [D, b, mS, mS],
    "valid": bool [D, b, mS, mS]} (m = config.dataset.label_magnification); eval batches
    also hold "example_mask": bool [D, b], False for padding.

  Raises:
    ValueError: where the config does not fit the data, or the training split holds no
      whole batch.
  """
  builder = (info or dataset_info(config)).builder
  devices, per_device = _batch_shape(config)
  per_process = devices * per_device
  batch = lambda ds: (ds.batch(per_device, drop_remainder=True)
                      .batch(devices, drop_remainder=True))
  decoders = _read_features(config)
  if not train:
    # The largest process share sets the number of batches of every process.
    shares = tfds.even_splits(split, n=jax.process_count(), drop_remainder=False)
    largest = max(builder.info.splits[s].num_examples for s in shares)
    records = builder.as_dataset(split=tfds.split_for_jax_process(split), shuffle_files=False,
                                 decoders=decoders)
    ds = _eval_dataset(records, config, math.ceil(largest / per_process) * per_process, batch)
    return iter(tfds.as_numpy(ds.prefetch(config.dataset.prefetch)))
  process_split = tfds.split_for_jax_process(split, drop_remainder=True)
  num_batches = builder.info.splits[process_split].num_examples // per_process
  if num_batches == 0:
    raise ValueError(f"Split {split!r} of {config.dataset.name} holds fewer examples per "
                     f"process than one batch of {per_process}; lower config.batch_size.")
  records = builder.as_dataset(split=process_split, shuffle_files=False, decoders=decoders)
  ds = _train_dataset(records, config, per_process, start_step, num_batches, batch)
  return iter(tfds.as_numpy(ds.prefetch(config.dataset.prefetch)))
