"""One of several processes of a CPU 'pod' (run by tests/test_distributed.py): initialise jax.distributed,
feed only this process's rows of the global batch, run a sharded forward/backward, write the result."""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")

from llama4_jax import distributed  # noqa: E402


def main(port: str, process_id: str, num_processes: str, out: str) -> None:
    distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(num_processes),
                           process_id=int(process_id))
    sys.path.insert(0, os.path.dirname(__file__))
    from test_distributed import GLOBAL_BATCH, MESH, global_inputs, loss_and_grad_norm

    from llama4_jax.sharding import make_mesh

    mesh = make_mesh(MESH)
    first, rows = distributed.process_rows(GLOBAL_BATCH)
    local = {k: v[first:first + rows] for k, v in global_inputs().items()}  # each host reads only its rows
    batch = distributed.global_batch(local, mesh, GLOBAL_BATCH)
    loss, grad_norm = loss_and_grad_norm(mesh, batch)
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump({"loss": loss, "grad_norm": grad_norm, "devices": jax.device_count(),
                       "local_devices": jax.local_device_count(), "processes": jax.process_count()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
