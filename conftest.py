"""Test set-up: 8 simulated CPU devices (for pmap tests) and quiet TensorFlow.

Runs before any test module imports jax, so every test process sees 8 devices.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests import `cscl_jax`, `configs` and `tfds_builders` from the project root.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
