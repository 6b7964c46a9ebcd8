"""Test set-up: 8 simulated CPU devices (for pmap tests), quick compiles, quiet TensorFlow.

Runs before any test module imports jax, so every test process (and every subprocess a test
starts with this environment) sees 8 devices. The tests' shapes are tiny, so compiling
dominates their time: XLA's backend optimisation level 0 (LLVM's code generation) makes the
suite ~1.3x quicker.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests import `cscl_jax`, `configs` and `tfds_builders` from the project root.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
