"""Multi-host: two real processes (4 CPU devices each, gloo collectives) each feed half of the global batch;
the sharded loss and gradient norm equal a single-process run on 8 devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama4_jax import TINY_SCOUT, Llama4ForCausalLM, distributed
from llama4_jax.sharding import MeshConfig, init_sharded, make_mesh, use_sharding
from llama4_jax.train.step import loss_fn

GLOBAL_BATCH, SEQ = 8, 16
MESH = MeshConfig(data=2, fsdp=2, expert=2)
CONFIG = TINY_SCOUT.replace(initializer_range=0.3)


class _Train:
    load_balance_coef = 0.0
    router_z_coef = 0.0


def global_inputs() -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (GLOBAL_BATCH, SEQ + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((GLOBAL_BATCH, SEQ), np.float32)}


def loss_and_grad_norm(mesh, batch) -> tuple[float, float]:
    model = init_sharded(lambda: Llama4ForCausalLM(CONFIG, rngs=nnx.Rngs(0)), mesh)
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def run(params, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, batch, _Train())
        return loss, jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))

    with use_sharding(mesh):
        loss, norm = run(params, batch)
    return float(loss), float(norm)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_rows_split_the_global_batch():
    assert [distributed.process_rows(32, i, 4) for i in range(4)] == [(0, 8), (8, 8), (16, 8), (24, 8)]
    with pytest.raises(ValueError, match="divisible"):
        distributed.process_rows(30, 0, 4)
    assert not distributed.launched_as_multi_process({})
    assert distributed.launched_as_multi_process({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
    assert not distributed.launched_as_multi_process({"TPU_WORKER_HOSTNAMES": "localhost"})


def test_two_processes_equal_one(tmp_path):
    port, out = str(_free_port()), tmp_path / "result.json"
    worker = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, worker, port, str(i), "2", str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    result = json.loads(out.read_text())
    assert (result["devices"], result["local_devices"], result["processes"]) == (8, 4, 2)

    mesh = make_mesh(MESH)  # this process: 8 fake devices
    batch = distributed.global_batch(global_inputs(), mesh, GLOBAL_BATCH)
    loss, grad_norm = loss_and_grad_norm(mesh, batch)
    np.testing.assert_allclose(result["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(result["grad_norm"], grad_norm, rtol=1e-5)
