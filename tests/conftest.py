"""Test set-up: 8 simulated CPU devices and a quick-compiling backend, set before jax is imported anywhere.

The suite checks numerics, not speed, and most of its time is XLA compilation. It compiles with XLA's backend
(LLVM) optimisation level 0: the HLO passes and fusions are XLA's defaults, only the machine code is less optimised,
and compilation is about 30 % faster. ``MEMARCH_TEST_BACKEND_OPT=3 pytest`` runs the suite at XLA's default level.
Tests that start subprocesses pass these flags on (less the device count where the subprocess picks its own).
"""
import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), DEVICE_COUNT_FLAG,
    "--xla_backend_optimization_level=" + os.environ.get("MEMARCH_TEST_BACKEND_OPT", "0")]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
