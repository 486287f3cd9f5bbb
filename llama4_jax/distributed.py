"""Multi-host runs: process start-up and per-host input.

On a Cloud TPU pod every worker runs the same command; `jax.distributed.initialize()` finds the coordinator
from the TPU metadata (likewise under SLURM or with JAX_COORDINATOR_ADDRESS set). Each process then reads
only its slice of the global batch, and `global_batch` assembles the slices into one global array sharded
over the mesh, without any host holding the whole batch.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from llama4_jax.sharding import TRAIN_RULES, Rules, logical_to_spec

# Environment variables that mean "this process is one of several".
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                      "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def launched_as_multi_process(environ=os.environ) -> bool:
    if environ.get("JAX_COORDINATOR_ADDRESS") or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    if "," in environ.get("TPU_WORKER_HOSTNAMES", ""):  # a pod slice with several hosts
        return True
    return any(int(environ.get(name, "1") or 1) > 1 for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def initialize(**kwargs) -> None:
    """Call `jax.distributed.initialize` when launched as several processes (no-op otherwise, and idempotent).

    kwargs (coordinator_address, num_processes, process_id, ...) are passed through for launchers that do not
    set the environment, e.g. several CPU or GPU processes started by hand.
    """
    if jax.distributed.is_initialized():
        return
    if kwargs or launched_as_multi_process():
        jax.distributed.initialize(**kwargs)


def process_rows(global_batch_size: int, process_index: int | None = None, process_count: int | None = None):
    """(first row, number of rows) of the global batch this process reads."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch_size % count:
        raise ValueError(f"train.batch_size ({global_batch_size}) must be divisible by the number of processes "
                         f"({count}) so each host feeds an equal share")
    rows = global_batch_size // count
    return index * rows, rows


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, global_batch_size: int,
                 rules: Rules = TRAIN_RULES) -> dict[str, jax.Array]:
    """This process's rows (local_rows, T) of each batch field -> global (global_batch_size, T) arrays sharded
    by the ("batch", "length") rule. Requires the mesh's batch axes to place each process's devices on a
    contiguous block of rows, which `make_mesh` does (processes own consecutive devices)."""
    sharding = NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))
    out = {}
    for key, value in local.items():
        shape = (global_batch_size, *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out
