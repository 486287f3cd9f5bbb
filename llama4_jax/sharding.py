"""Device meshes and logical sharding.

Every parameter carries logical axis names (`nnx.Param(..., logical_axes=("embed", "mlp"))`). One rules table
maps logical names to mesh axes; activations are constrained through `constrain` only. Training and teacher
inference may use different tables over the same mesh.

Mesh axes:
* data:   pure data parallelism (parameters replicated).
* fsdp:   data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3 style).
* expert: expert parallelism; tokens are also split over it (MoE tokens travel by all-to-all).
* tensor: tensor parallelism over heads, FFN width and vocabulary.
Multi-slice runs (several pods joined by the data-center network, DCN) give `dcn_*` sizes per axis; the
mesh axis is then the product of its DCN and ICI parts, DCN outermost.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Logical axis -> mesh axes, for training. Batch is split over every data-like axis (expert included: each
# expert-parallel rank holds its own tokens until the MoE all-to-all).
TRAIN_RULES: Rules = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    # ZeRO-3 over every data-like axis that is not already used by the tensor: dense weights shard their
    # embed dim over fsdp and expert; expert weights (whose expert dim takes the expert axis) over fsdp only.
    ("embed", ("fsdp", "expert")),
    ("expert_embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("exp", "expert"),
    ("layers", None),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Mesh axis sizes within a slice (ICI) and across slices (DCN). -1 = fill from the device count."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            for field in (name, f"dcn_{name}"):
                value = getattr(self, field)
                if value != -1 and value < 1:
                    raise ValueError(f"mesh.{field} must be a positive size or -1, got {value}")
        if sum(getattr(self, a) == -1 for a in MESH_AXES) > 1:
            raise ValueError("at most one mesh axis may be -1 (filled from the device count)")
        if any(getattr(self, f"dcn_{a}") == -1 for a in MESH_AXES):
            raise ValueError("dcn_* sizes must be given explicitly (the number of slices is not inferred)")

    @property
    def num_slices(self) -> int:
        return math.prod(getattr(self, f"dcn_{a}") for a in MESH_AXES)

    def ici_sizes(self, num_devices: int) -> dict[str, int]:
        """Per-slice axis sizes with -1 resolved; raises if they do not multiply to the devices per slice."""
        if num_devices % self.num_slices:
            raise ValueError(f"{num_devices} devices cannot form {self.num_slices} slices (product of dcn_* sizes)")
        per_slice = num_devices // self.num_slices
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        known = math.prod(s for s in sizes.values() if s != -1)
        for axis, size in sizes.items():
            if size == -1:
                if per_slice % known:
                    raise ValueError(f"mesh axis '{axis}'=-1 cannot be filled: the other axes ({known}) do not "
                                     f"divide the {per_slice} devices per slice")
                sizes[axis] = per_slice // known
        if math.prod(sizes.values()) != per_slice:
            raise ValueError(f"mesh sizes {sizes} multiply to {math.prod(sizes.values())}, but there are "
                             f"{per_slice} devices per slice; change the sizes or set one axis to -1")
        return sizes

    def axis_sizes(self, num_devices: int) -> dict[str, int]:
        ici = self.ici_sizes(num_devices)
        return {a: ici[a] * getattr(self, f"dcn_{a}") for a in MESH_AXES}


def make_mesh(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes MESH_AXES. Multi-slice meshes place DCN outermost (slices talk over the network)."""
    devices = list(devices if devices is not None else jax.devices())
    ici = config.ici_sizes(len(devices))
    if config.num_slices > 1:
        from jax.experimental import mesh_utils

        dcn = [getattr(config, f"dcn_{a}") for a in MESH_AXES]
        array = mesh_utils.create_hybrid_device_mesh([ici[a] for a in MESH_AXES], dcn, devices)
    else:
        array = np.asarray(devices).reshape([ici[a] for a in MESH_AXES])
    return Mesh(array, MESH_AXES)


def validate_rules(rules: Rules) -> None:
    seen = set()
    for logical, mesh_axes in rules:
        if logical in seen:
            raise ValueError(f"sharding rules name logical axis '{logical}' twice")
        seen.add(logical)
        for axis in as_tuple(mesh_axes):
            if axis not in MESH_AXES:
                raise ValueError(f"sharding rule '{logical}' -> '{axis}': unknown mesh axis; mesh axes are "
                                 f"{MESH_AXES}")


def as_tuple(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules, *, what: str = "tensor") -> PartitionSpec:
    """PartitionSpec for a tensor's logical axes. Raises on an unknown name or a mesh axis used twice."""
    table = dict(rules)
    used: dict[str, str] = {}
    spec = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"{what}: logical axis '{name}' has no sharding rule; known: {sorted(table)}")
        mesh_axes = as_tuple(table[name])
        for axis in mesh_axes:
            if axis in used:
                raise ValueError(f"{what}: logical axes '{used[axis]}' and '{name}' both map to mesh axis "
                                 f"'{axis}'; change the rules so each mesh axis shards one dimension")
            used[axis] = name
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, *, what: str) -> None:
    for dim, (size, axes) in enumerate(zip(shape, spec)):
        parts = math.prod(mesh.shape[a] for a in as_tuple(axes))
        if size % parts:
            raise ValueError(f"{what}: dimension {dim} has size {size}, not divisible by mesh axes {axes} "
                             f"(size {parts}); change the mesh or the model dimension")


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = TRAIN_RULES) -> nnx.State:
    """NamedSharding for every variable of an (abstract) state, from its logical_axes metadata.

    Raises if an axis does not divide its mesh axes, naming the parameter."""
    validate_rules(rules)

    def one(path, variable):
        axes = variable.get_metadata().get("logical_axes")
        if axes is None:
            axes = (None,) * len(variable.shape)
        what = _path_name(path)
        spec = logical_to_spec(axes, rules, what=what)
        check_divisible(variable.shape, spec, mesh, what=what)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# --------------------------------------------------------------------------------------------------
# Activation constraints: a context names the mesh and rules; outside it `constrain` is a no-op.

_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("llama4_sharding", default=None)


@contextlib.contextmanager
def use_sharding(mesh: Mesh, rules: Rules = TRAIN_RULES) -> Iterator[None]:
    """Within this context (while tracing), activations are constrained by `rules` on `mesh`."""
    validate_rules(rules)
    token = _CONTEXT.set((mesh, rules))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current() -> tuple[Mesh, Rules] | None:
    return _CONTEXT.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical axis names (the one helper the model uses)."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_spec(logical_axes, rules, what="activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def init_sharded(factory, mesh: Mesh, rules: Rules = TRAIN_RULES):
    """Build an nnx Module sharded from birth: shapes from `nnx.eval_shape(factory)`, then a jitted init whose
    out_shardings place every parameter shard directly on its devices (no full copy on any device or host).

    factory: a zero-argument callable returning the module (it is traced, so it must be deterministic).
    """
    abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    @jax.jit
    def init():
        return nnx.state(factory())

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
