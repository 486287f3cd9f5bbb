"""Pod plans: compile an experiment's real training step for a TPU slice on this host and read its memory.

libtpu describes a TPU slice without the hardware (`jax.experimental.topologies.get_topology_desc`); a jitted
step with abstract, sharded inputs lowers and compiles for it, and the compiled program reports per-chip HBM
(`memory_analysis`) and FLOPs (`cost_analysis`).

XLA counts a while-loop body once, so FLOPs come from two extra compiles with all loops unrolled at depth
1 and 2 blocks, extrapolated linearly in depth (every block is identical).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llama4_jax import loops
from llama4_jax.counting import count_params, training_flops_per_token
from llama4_jax.distill.step import make_distill_step
from llama4_jax.distill.teacher import abstract_teacher, teacher_shardings
from llama4_jax.model.moe import MoE
from llama4_jax.sharding import TRAIN_RULES, logical_to_spec, make_mesh, state_shardings, use_sharding
from llama4_jax.train.step import abstract_train_state, make_train_step, step_shardings

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    name: str  # libtpu's name in topology strings
    hbm_bytes: int  # per chip
    peak_bf16_flops: float  # per chip
    chips_per_name_unit: float  # v5p-N counts TensorCores (2 per chip); v5e/v6e count chips
    dims: int


GENERATIONS = {
    "v5p": TpuGeneration("v5p", 95 * 10**9, 459e12, 0.5, 3),
    "v5e": TpuGeneration("v5e", 16 * 10**9, 197e12, 1.0, 2),
    "v5litepod": TpuGeneration("v5e", 16 * 10**9, 197e12, 1.0, 2),
    "v6e": TpuGeneration("v6e", 32 * 10**9, 918e12, 1.0, 2),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # e.g. v5p-256
    generation: TpuGeneration
    chips: int
    shape: tuple[int, ...]

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"


def parse_topology(name: str) -> Topology:
    """'v5p-256' (256 TensorCores = 128 chips, 4x4x8), 'v5e-16', 'v6e-64' -> Topology."""
    match = re.fullmatch(r"(v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not match:
        raise ValueError(f"topology {name!r} not understood; expected e.g. v5p-8, v5p-256, v5e-16, v6e-64")
    generation = GENERATIONS[match.group(1)]
    chips = int(int(match.group(2)) * generation.chips_per_name_unit)
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"topology {name!r}: {chips} chips; slices here must have a power-of-two chip count")
    shape = [1] * generation.dims
    while math.prod(shape) < chips:  # grow the smallest dimension: 2x2x1, 2x2x2, 2x2x4, 2x4x4, ...
        shape[shape.index(min(shape))] *= 2
    if generation.dims == 3 and chips >= 8:
        shape = sorted(shape)
    return Topology(name, generation, chips, tuple(shape))


def topology_devices(topology: Topology) -> list:
    # libtpu probes the host for a TPU unless told what to expect; these keep it quiet on a CPU host.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.name.replace("v5litepod", "v5e"))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Describing a topology needs no chip, so several processes (parallel plans, tests) may load libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology.libtpu_name).devices)


@dataclasses.dataclass(frozen=True)
class PlanReport:
    experiment: str
    topology: Topology
    mesh: dict[str, int]
    params_bytes: int  # per chip
    optimizer_bytes: int
    teacher_bytes: int
    batch_bytes: int
    temp_bytes: int  # activations and temporaries
    total_bytes: int
    compiled_flops: float  # per chip per step
    analytic_flops: float  # per chip per step (6 x active params + attention, no remat)
    moe_compiled_flops: float  # one MoE layer, forward+backward, per chip
    moe_analytic_flops: float

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.topology.generation.hbm_bytes


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _shard_bytes(abstract_tree) -> int:
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(abstract_tree))


PLAN_TOPK = 64  # cached-target plans assume top-64 targets (+ the tail column)


def _compile_step(experiment, mesh: Mesh):
    """The jitted training step lowered for `mesh` with abstract sharded inputs: (compiled, abstract args).

    With a distill section the step is the distillation step and its args end with the frozen teacher's
    params (its own dtype, sharded by the inference rules), the step index and TAID's t."""
    train = experiment.train
    graphdef, params, tx = abstract_train_state(experiment)
    shardings = step_shardings(params, tx, mesh)
    args = (
        _abstract(params, shardings.params),
        _abstract(jax.eval_shape(tx.init, params), shardings.opt_state),
        {k: jax.ShapeDtypeStruct((train.batch_size, train.seq_len), jnp.float32 if k == "weights" else jnp.int32,
                                 sharding=shardings.batch[k]) for k in ("inputs", "targets", "weights")},
    )
    if experiment.distill is None:
        step = make_train_step(graphdef, tx, train)
    elif experiment.distill.targets == "cache":  # planned as top-64 targets read beside the batch; no teacher
        spec = NamedSharding(mesh, logical_to_spec(("batch", "length", None), TRAIN_RULES))
        shape = (train.batch_size, train.seq_len)
        args[2]["target_ids"] = jax.ShapeDtypeStruct((*shape, PLAN_TOPK), jnp.int32, sharding=spec)
        args[2]["target_values"] = jax.ShapeDtypeStruct((*shape, PLAN_TOPK + 1), jnp.float32, sharding=spec)
        step = make_distill_step(graphdef, tx, train, experiment.distill, None, "topk")
        scalar = NamedSharding(mesh, jax.sharding.PartitionSpec())
        args += (None, jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar),
                 jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar))
    else:
        teacher_graphdef, teacher = abstract_teacher(experiment.distill, train)
        step = make_distill_step(graphdef, tx, train, experiment.distill, teacher_graphdef)
        scalar = NamedSharding(mesh, jax.sharding.PartitionSpec())
        args += (_abstract(teacher, teacher_shardings(teacher, mesh)),
                 jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar), jax.ShapeDtypeStruct((), jnp.float32,
                                                                                          sharding=scalar))
    jitted = jax.jit(step, out_shardings=(shardings.params, shardings.opt_state, None), donate_argnums=(0, 1))
    with use_sharding(mesh), jax.set_mesh(mesh):
        return jitted.lower(*args).compile(), args


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def _truncated(config, blocks: int):
    """The config cut to its first `blocks` scanned blocks (same per-layer pattern)."""
    layers = blocks * config.block_size
    return config.replace(num_hidden_layers=layers, moe_layers=tuple(i for i in config.moe_layers if i < layers),
                          no_rope_layers=config.no_rope_layers[:layers], layer_types=config.layer_types[:layers])


def compiled_step_flops(experiment, mesh: Mesh) -> float:
    """Per-chip FLOPs of one step: loops unrolled at 1 and 2 blocks, extrapolated to the full depth (XLA counts
    a loop body once). With a teacher, its depth is extrapolated the same way, independently."""
    def flops(student_blocks: int, teacher_blocks: int = 1) -> float:
        shallow = dataclasses.replace(experiment, model=_truncated(experiment.model, student_blocks))
        if experiment.distill is not None and experiment.distill.targets == "online":
            teacher = _truncated(experiment.distill.teacher, teacher_blocks)
            shallow = dataclasses.replace(shallow, distill=experiment.distill.replace(teacher=teacher))
        with loops.unrolled_loops():
            return _flops(_compile_step(shallow, mesh)[0])

    base = flops(1)
    total = base
    if experiment.model.num_blocks > 1:
        total += (experiment.model.num_blocks - 1) * (flops(2) - base)
    if (experiment.distill is not None and experiment.distill.targets == "online"
            and experiment.distill.teacher.num_blocks > 1):
        total += (experiment.distill.teacher.num_blocks - 1) * (flops(1, 2) - base)
    return total


def moe_layer_flops(experiment, mesh: Mesh) -> tuple[float, float]:
    """(compiled, analytic) per-chip FLOPs of one MoE layer's forward+backward on the experiment's tokens.

    Shows that the routed experts cost only the chosen experts' FLOPs (no dense expansion over E). With a
    dropless expert-parallel mesh the static buffers are sized for the worst case (every token to one rank),
    so the compiled count includes up to `expert`-times the routed FLOPs; the grouped kernels skip the
    empty tiles at run time, which a static count cannot see.
    """
    config, train = experiment.model, experiment.train
    dtype = jnp.dtype(train.compute_dtype)
    factory = lambda: MoE(config, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(train.param_dtype))
    graphdef, state = nnx.split(nnx.eval_shape(factory))
    state = _abstract(state, state_shardings(state, mesh))
    x = jax.ShapeDtypeStruct((train.batch_size, train.seq_len, config.hidden_size), dtype,
                             sharding=NamedSharding(mesh, logical_to_spec(("batch", "length", None), TRAIN_RULES)))

    def loss(state, x):  # squared, so the backward needs every forward output (nothing is dead code)
        y, _ = nnx.merge(graphdef, state)(x, capacity_factor=train.capacity_factor)
        return jnp.sum(jnp.square(y.astype(jnp.float32)))

    with use_sharding(mesh), jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile()
    d, f, e, k = config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok
    tokens = train.batch_size * train.seq_len
    analytic = 6 * tokens * (d * e + 3 * d * f * (k + 1)) / mesh.size  # router + shared + k routed experts
    return _flops(compiled), analytic


def plan(experiment, topology_name: str, *, count_flops: bool = True) -> PlanReport:
    topology = parse_topology(topology_name)
    mesh = make_mesh(experiment.mesh, topology_devices(topology))
    try:
        compiled, (params, opt_state, batch, *teacher) = _compile_step(experiment, mesh)
    except jax.errors.JaxRuntimeError as error:
        return _out_of_memory_report(experiment, topology, mesh, error)
    memory = compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
    moe = moe_layer_flops(experiment, mesh) if count_flops and experiment.model.moe_layers else (math.nan,) * 2
    return PlanReport(
        experiment=experiment.name, topology=topology, mesh=dict(mesh.shape),
        params_bytes=_shard_bytes(params), optimizer_bytes=_shard_bytes(opt_state),
        teacher_bytes=_shard_bytes(teacher[0]) if teacher and teacher[0] is not None else 0,
        batch_bytes=_shard_bytes(batch),
        temp_bytes=memory.temp_size_in_bytes, total_bytes=total,
        compiled_flops=compiled_step_flops(experiment, mesh) if count_flops else math.nan,
        analytic_flops=_analytic_flops(experiment, topology), moe_compiled_flops=moe[0], moe_analytic_flops=moe[1],
    )


def _analytic_flops(experiment, topology: Topology) -> float:
    """Student training (6N + attention) plus, with a teacher, its forward (a third of its training FLOPs)."""
    seq = experiment.train.seq_len
    per_token = training_flops_per_token(experiment.model, seq)
    if experiment.distill is not None and experiment.distill.targets == "online":
        per_token += training_flops_per_token(experiment.distill.teacher, seq) / 3
    return per_token * experiment.train.batch_size * seq / topology.chips


def _out_of_memory_report(experiment, topology: Topology, mesh: Mesh, error: Exception) -> PlanReport:
    """The TPU compiler refuses programs that exceed HBM; report what it says it needed."""
    message = str(error)
    if "RESOURCE_EXHAUSTED" not in message:
        raise error
    needed = re.search(r"required for [^(]*\(([\d.]+)G\)", message)
    temp = int(float(needed.group(1)) * GIB) if needed else 0
    graphdef, params, tx = abstract_train_state(experiment)
    shardings = step_shardings(params, tx, mesh)
    params_bytes = _shard_bytes(_abstract(params, shardings.params))
    opt_bytes = _shard_bytes(_abstract(jax.eval_shape(tx.init, params), shardings.opt_state))
    teacher_bytes = 0
    if experiment.distill is not None and experiment.distill.targets == "online":
        teacher = abstract_teacher(experiment.distill, experiment.train)[1]
        teacher_bytes = _shard_bytes(_abstract(teacher, teacher_shardings(teacher, mesh)))
    return PlanReport(
        experiment=experiment.name, topology=topology, mesh=dict(mesh.shape), params_bytes=params_bytes,
        optimizer_bytes=opt_bytes, teacher_bytes=teacher_bytes, batch_bytes=0, temp_bytes=temp,
        total_bytes=max(params_bytes + opt_bytes + teacher_bytes + temp, topology.generation.hbm_bytes + 1),
        compiled_flops=math.nan, analytic_flops=_analytic_flops(experiment, topology),
        moe_compiled_flops=math.nan, moe_analytic_flops=math.nan,
    )


def format_report(report: PlanReport) -> str:
    t = report.topology
    hbm = t.generation.hbm_bytes
    ratio = report.compiled_flops / report.analytic_flops
    lines = [
        f"plan: {report.experiment} on {t.name} ({t.chips} chips, {t.libtpu_name}, {hbm / GIB:.1f} GiB HBM/chip)",
        f"mesh: {' x '.join(f'{k}={v}' for k, v in report.mesh.items())}",
        "per-chip HBM:",
        f"  parameters        {report.params_bytes / GIB:9.2f} GiB",
        f"  optimizer state   {report.optimizer_bytes / GIB:9.2f} GiB",
        f"  teacher           {report.teacher_bytes / GIB:9.2f} GiB",
        f"  batch             {report.batch_bytes / GIB:9.2f} GiB",
        f"  activations/temp  {report.temp_bytes / GIB:9.2f} GiB",
        f"  total             {report.total_bytes / GIB:9.2f} GiB of {hbm / GIB:.1f} -> "
        f"{'FITS' if report.fits else 'DOES NOT FIT'}",
        f"FLOPs per chip per step: compiled {report.compiled_flops / 1e12:.2f} T, analytic (6N + attention) "
        f"{report.analytic_flops / 1e12:.2f} T, ratio {ratio:.3f} (full remat adds one forward: ~1.33)",
        f"one MoE layer fwd+bwd per chip: compiled {report.moe_compiled_flops / 1e9:.1f} G, analytic "
        f"{report.moe_analytic_flops / 1e9:.1f} G, ratio {report.moe_compiled_flops / report.moe_analytic_flops:.3f}",
    ]
    return "\n".join(lines)


def param_count_line(experiment) -> str:
    counts = count_params(experiment.model)
    line = f"student: {counts.total / 1e9:.2f}B params, {counts.active / 1e9:.2f}B active"
    if experiment.distill is not None:
        teacher = count_params(experiment.distill.teacher)
        line += (f"; teacher ({experiment.distill.teacher_param_dtype}, frozen): {teacher.total / 1e9:.2f}B params, "
                 f"{teacher.active / 1e9:.2f}B active")
    return line


__all__ = ["PlanReport", "format_report", "param_count_line", "parse_topology", "plan"]
