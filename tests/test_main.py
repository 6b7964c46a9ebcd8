"""End to end: `python -m cscl_jax.main` in a subprocess (configs/test.py).

Pre-trains in the default workdir, then fine-tunes from it; reads the console as a user
would (the first and last lines say what ran and where it went, no third-party noise);
refuses a misspelt config field; stops cleanly on SIGTERM; and runs both stages on fake
PASTIS and MTLCC folders.
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tfds_builders.mtlcc import fake_data as mtlcc_fake_data
from tfds_builders.pastis import fake_data as pastis_fake_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lines a newcomer should not have to read (issue 20), as the libraries print them.
NOISE = re.compile(r"oneDNN|absl::InitializeLog|Unable to initialize backend|libtpu|"
                   r"FeatureConnector\.dtype|differ on disk and in the code|"
                   r"Constructing tf\.data|Load dataset info|Creating a tf\.data|"
                   r"cache_dataset_ops|orbax|did not provide metrics|Traceback")


def _command(*flags: str) -> list[str]:
  return [sys.executable, "-m", "cscl_jax.main", f"--config={ROOT}/configs/test.py", *flags]


def _env() -> dict[str, str]:
  """The user's environment: none of the tests' TF settings, the project importable, one
  CPU device (conftest's 8 are for the in-process tests; one compiles ~1.3x quicker)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
  return {**env, "PYTHONPATH": ROOT, "XLA_FLAGS": "--xla_backend_optimization_level=0"}


def _main(cwd: str, *flags: str) -> list[str]:
  """Runs the entry point in `cwd`; returns its console lines."""
  result = subprocess.run(_command(*flags), cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return (result.stdout + result.stderr).splitlines()


def _files(workdir: str, pattern: str) -> list[str]:
  return glob.glob(os.path.join(workdir, "**", pattern), recursive=True)


def _run_lines(log: list[str]) -> str:
  """The lines of the run itself (absl prefix dropped), without the TFDS build's."""
  return "\n".join(line.split("] ", 1)[-1] for line in log)


def test_pretrain_then_finetune(tmp_path):
  data_dir = str(tmp_path / "tfds")
  log = _main(str(tmp_path), f"--config.dataset.data_dir={data_dir}")  # no --workdir
  pretrain = str(tmp_path / "workdirs" / "test")
  noise = [line for line in log if NOISE.search(line)]
  assert not noise, "\n".join(noise)
  text = _run_lines(log)
  first = text[text.index("pretrain of unet3df"):]
  assert re.match(r"pretrain of unet3df \([\d,]+ parameters\), workdir workdirs/test, "
                  r"fresh start\.\nData: sits_synthetic/tiny, train 24 examples, "
                  r"validation 8 .*\nDevices: 1 process\(es\) x \d+ cpu; batch 8 global, "
                  r"\d per device\.\nSteps 0 -> 4 \(3 per epoch", first), first[:800]
  assert "Eval at step 4" in text
  last = text[text.index("Done at step 4"):].splitlines()
  assert re.match(r"Done at step 4: loss=-?[\d.]+, sim_same=", last[0])
  assert last[1].startswith(f"Checkpoints: {pretrain}/checkpoints (latest 4")
  assert "metrics: workdirs/test/metrics.json" in last[2]
  assert "tensorboard --logdir=workdirs/test" in last[2]

  finetune = str(tmp_path / "ft")
  text = _run_lines(_main(ROOT, f"--workdir={finetune}", f"--config.dataset.data_dir={data_dir}",
                          "--config.model.stage=finetune", f"--config.init_from={pretrain}"))
  assert "Loaded pre-trained encoder from " + os.path.join(pretrain, "checkpoints") in text
  assert re.search(r"Done at step 4: loss=[\d.]+, oa=[\d.]+, miou=[\d.]+", text)
  for workdir in (pretrain, finetune):
    assert _files(workdir, "events.out.tfevents*")
    assert _files(workdir, "eval_0000004.png")
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
    assert os.path.exists(os.path.join(workdir, "config.json"))
  with open(os.path.join(pretrain, "metrics.json")) as f:
    assert {"step", "loss", "sim_same", "sim_diff"} <= set(json.load(f))
  with open(os.path.join(finetune, "metrics.json")) as f:
    scores = json.load(f)
  assert scores["step"] == 4
  assert 0 <= scores["miou"] <= 1 and 0 <= scores["boundary/miou"] <= 1


def test_a_misspelt_config_field_is_an_error(tmp_path):
  """main locks the config: a typo in --config.x fails before anything runs."""
  result = subprocess.run(_command(f"--workdir={tmp_path}", "--config.model.num_feature=3"),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "num_feature" in result.stderr and "num_features" in result.stderr
  assert not os.listdir(tmp_path)


def test_sigterm_saves_and_exits_with_143_without_a_traceback(tmp_path):
  data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "run")
  child = subprocess.Popen(
      _command(f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
               "--config.num_train_steps=100000", "--config.eval_every_steps=100000",
               "--config.checkpoint_every_steps=100000"),
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    log = []
    for line in child.stdout:  # Training runs once the first progress line is out.
      log.append(line)
      if "steps/s" in line:
        child.send_signal(signal.SIGTERM)
        break
    log += child.stdout.readlines()
    assert child.wait(timeout=120) == 128 + signal.SIGTERM, "".join(log[-30:])
  finally:
    child.kill()
  stops = [line for line in log if "Stopped at step" in line]
  assert len(stops) == 1 and "Run the same command again to resume" in stops[0]
  assert not any("Traceback" in line for line in log), "".join(log[-30:])
  step = int(re.search(r"Stopped at step (\d+)", stops[0]).group(1))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


@pytest.mark.parametrize("name, builder_config, flags", [
    ("pastis", "fold1_24x24", ("--config.model.num_channels=11", "--config.model.num_classes=19")),
    ("mtlcc", "all", ("--config.model.num_classes=17",))])
def test_benchmark_datasets_pretrain_then_finetune(tmp_path, name, builder_config, flags):
  """Two steps of each stage on the fake PASTIS (10 bands) and MTLCC folders."""
  if name == "pastis":
    manual_dir = pastis_fake_data.write(tmp_path / "PASTIS", patches_per_fold=2, size=48)
  else:
    manual_dir = mtlcc_fake_data.write(tmp_path / "MTLCC", num_tiles=(4, 4, 1))
  common = (f"--config.dataset.data_dir={tmp_path / 'tfds'}", f"--config.dataset.name={name}",
            f"--config.dataset.config={builder_config}",
            f"--config.dataset.manual_dir={manual_dir}", "--config.model.img_res=24",
            "--config.num_train_steps=2", "--config.num_eval_batches=1", *flags)
  pretrain, finetune = str(tmp_path / "pre"), str(tmp_path / "ft")
  assert "Eval at step 2" in _run_lines(_main(ROOT, f"--workdir={pretrain}", *common))
  log = _run_lines(_main(ROOT, f"--workdir={finetune}", *common,
                         "--config.model.stage=finetune", f"--config.init_from={pretrain}"))
  assert "Loaded pre-trained encoder" in log and "Eval at step 2: loss=" in log
  with open(os.path.join(finetune, "metrics.json")) as f:
    assert 0 <= json.load(f)["miou"] <= 1
