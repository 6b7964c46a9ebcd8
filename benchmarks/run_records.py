"""Durable records of finished benchmark runs: one small JSON file per run.

A run's workdir (checkpoints, TensorBoard events) is scratch: large, and lost with the machine
it ran on. Its record keeps what the report needs, small enough to commit beside the
results (benchmarks/results/evidence/<encoder>/):

  config      the run's whole config (ml_collections, as JSON);
  validation  its last validation metrics (pre-training: loss, sim_same, sim_diff);
  test        test metrics of its best-validation checkpoint (absent for pre-training);
  curves      {tag: {step: value}} of CURVES from its TensorBoard events;
  wall_s      seconds it trained, summed over the invocations that trained it (from the
              write times of its TensorBoard events, `report.training_seconds`).

  path(records, arm, seed)     where a run's record lives;
  make(...) / write(path, r)   build one from a finished workdir; write it atomically;
  read(path, config)           the record, None if absent; an error if another config made it.
"""

import json
import os

from flax import traverse_util
import ml_collections

from benchmarks import evidence_report as report

CURVES = ("train/loss", "eval/miou")
# Locations, not settings: a record stays valid when the data or the workdirs move.
PATH_FIELDS = ("init_from", "dataset.data_dir", "dataset.manual_dir")


def path(records: str, arm: str, seed: int) -> str:
  """<records>/<arm>/seed_<seed>.json (arm may hold a slash: paper/m375)."""
  return os.path.join(records, arm, f"seed_{seed}.json")


def _config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


def make(config: ml_collections.ConfigDict, workdir: str, validation: dict,
         test: dict | None) -> dict:
  """The record of a finished run in `workdir` (its curves and wall time read from the
  events there)."""
  curves = {tag: dict(sorted(report.read_scalars(workdir, tag).items())) for tag in CURVES}
  wall_s = report.training_seconds(workdir)
  record = {"config": _config_dict(config), "validation": validation, "curves": curves,
            "wall_s": None if wall_s is None else round(wall_s, 1)}
  if test is not None:
    record["test"] = test
  return record


def write(record_path: str, record: dict) -> None:
  """Writes `record` as JSON (curve steps become strings); a temporary file renamed into
  place, so never half written."""
  os.makedirs(os.path.dirname(record_path), exist_ok=True)
  tmp = record_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, record_path)


def read(record_path: str, config: ml_collections.ConfigDict) -> dict | None:
  """The record at `record_path` with its curves keyed by int step; None if there is none.

  Raises:
    ValueError: the record was made by a run with another config (PATH_FIELDS aside), so
      it does not answer for this one.
  """
  if not os.path.exists(record_path):
    return None
  with open(record_path) as f:
    record = json.load(f)
  have, want = (traverse_util.flatten_dict(c, sep=".")
                for c in (record["config"], _config_dict(config)))
  differ = sorted(k for k in set(have) | set(want)
                  if k not in PATH_FIELDS and have.get(k) != want.get(k))
  if differ:
    raise ValueError(
        f"{record_path} was made by a run with another config ("
        + ", ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} here" for k in differ[:5])
        + "); use the flags that made it, or point --records at another folder.")
  record["curves"] = {tag: {int(step): value for step, value in curve.items()}
                      for tag, curve in record["curves"].items()}
  return record
