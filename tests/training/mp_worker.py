"""One process of the multi-process test: ``mp_worker.py PORT NUM_PROCESSES PROCESS_ID DATA_DIR WORKDIR``.

Prints ``LOSSES {json}`` with this process's logged train losses.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py

import helpers_training  # noqa: E402
import train  # noqa: E402


def main():
  port, num_processes, process_id, data_dir, workdir = sys.argv[1:]
  train.initialize_distributed(f"localhost:{port}", int(num_processes), int(process_id))
  assert jax.device_count() == 4 * int(num_processes), jax.devices()
  history = train.train_and_evaluate(helpers_training.tiny_config(data_dir), workdir)
  print("LOSSES " + json.dumps({str(k): v for k, v in helpers_training.losses(history).items()}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
