"""The only module that knows the device mesh.

Mesh axes: `data` (batch; with FSDP also parameters and optimizer state), `tensor` (heads,
MLP hidden, vocab) and `sequence` (activation length). Model code names logical axes; the
rules below map each name to a mesh axis (or None: replicated). A parameter axis with no rule
is an error rather than a silent replication, and every sharded dimension must be divisible
by its mesh axis: both are checked before anything is compiled.
"""

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ('data', 'tensor', 'sequence')


def mesh_shape(mesh_cfg, num_devices: int, platform: str | None = None) -> tuple[int, ...]:
  """Resolves `mesh.data/tensor/sequence` (one of them may be -1: fills) to axis sizes.

  A mesh that does not fit `num_devices` raises a ValueError naming the axes and their sizes;
  on `platform` 'cpu' it also says how to simulate the devices the mesh needs.
  """
  sizes = [int(mesh_cfg[axis]) for axis in AXES]
  fill = [axis for axis, size in zip(AXES, sizes) if size == -1]
  if len(fill) > 1:
    raise ValueError(f'only one mesh axis may be -1 (fill), got {", ".join(fill)}')
  for axis, size in zip(AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f'mesh.{axis}={size}: axis sizes are positive (or -1 to fill)')
  fixed = math.prod(size for size in sizes if size != -1)
  given = ' × '.join(f'{axis} {size}' for axis, size in zip(AXES, sizes) if size != -1)
  if fill:
    if num_devices % fixed:
      wanted = -(-num_devices // fixed) * fixed  # the next device count the mesh can fill
      raise ValueError(
        f'mesh.{fill[0]}=-1 cannot fill {num_devices} devices: {given} = {fixed} does not '
        f'divide {num_devices}; change mesh.{"/".join(a for a in AXES if a != fill[0])}'
        + _cpu_hint(platform, f'a multiple of {fixed} devices, e.g.', wanted)
      )
    sizes[AXES.index(fill[0])] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f'mesh {given} needs {math.prod(sizes)} devices, but {num_devices} are available; '
      f'make mesh.data × mesh.tensor × mesh.sequence = {num_devices} (one of them may be -1 '
      'to fill)' + _cpu_hint(platform, f'{math.prod(sizes)} devices:', math.prod(sizes))
    )
  return tuple(sizes)


def _cpu_hint(platform: str | None, what: str, devices: int) -> str:
  if platform != 'cpu':
    return ''
  return f', or on CPU simulate {what} XLA_FLAGS=--xla_force_host_platform_device_count={devices}'


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices), platform=devices[0].platform if devices else None)
  # Auto axes: the XLA partitioner propagates shardings from our annotations.
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def logical_rules(fsdp: bool) -> dict[str, Any]:
  """Logical axis name -> mesh axis (None = replicated)."""
  return {
    # Parameters.
    'layers': None,
    # FSDP / ZeRO-3: weights sharded over the data axis, and over the context-parallel ranks,
    # which hold different tokens of the same rows and so act as data parallelism for them.
    'embed': ('data', 'sequence') if fsdp else None,
    'vocab': 'tensor',
    'heads': 'tensor',
    'kv_heads': 'tensor',
    'mlp': 'tensor',
    'head_dim': None,
    'norm': None,
    # Activations.
    'activation_batch': 'data',
    'activation_length': 'sequence',
    # Megatron's sequence parallelism: between attention and MLP the residual stream is
    # also split along its length over `tensor`, instead of being copied on every tensor
    # shard; XLA gathers it before the tensor-parallel matmuls and reduce-scatters after.
    'activation_residual_length': ('sequence', 'tensor'),
    'activation_embed': None,
    'activation_heads': 'tensor',
    'activation_kv_heads': 'tensor',
    'activation_head_dim': None,
    'activation_mlp': 'tensor',
    'activation_vocab': 'tensor',
  }


def partition_spec(logical_axes, rules: dict[str, Any], what: str) -> PartitionSpec:
  missing = [name for name in logical_axes if name not in rules]
  if missing:
    raise ValueError(
      f'{what}: logical axis {missing[0]!r} has no sharding rule (known: {", ".join(rules)})'
    )
  return PartitionSpec(*(rules[name] for name in logical_axes))


def mesh_axes(rules: dict[str, Any], logical_axis) -> tuple[str, ...]:
  """The mesh axes a logical axis name maps to under `rules` (none: replicated)."""
  axes = rules.get(logical_axis)
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def split_count(mesh, rules: dict[str, Any], logical_axis) -> int:
  """Into how many pieces the mesh splits a dimension named `logical_axis`."""
  return math.prod(mesh.shape[axis] for axis in mesh_axes(rules, logical_axis))


def check_divisible(shape, logical_axes, mesh: Mesh, rules: dict[str, Any], what: str):
  """Raises a ValueError naming the dimension and mesh axis that do not divide."""
  for dim, (size, name) in enumerate(zip(shape, logical_axes)):
    axes = mesh_axes(rules, name)
    if not axes:
      continue
    axis_size = split_count(mesh, rules, name)
    if size % axis_size:
      label = f'mesh axis {axes[0]!r}' if len(axes) == 1 else f'mesh axes {"×".join(axes)}'
      raise ValueError(
        f'{what}: dimension {dim} ({name}={size}) is not divisible by {label} '
        f'of size {axis_size}; change the model shape or '
        f'{" / ".join("mesh." + axis for axis in axes)}'
      )


def path_name(path) -> str:
  """'layers/attention/q' for a pytree key path."""
  return '/'.join(str(getattr(key, 'key', getattr(key, 'name', key))) for key in path)


def param_shardings(mesh: Mesh, boxed_params, fsdp: bool):
  """NamedShardings for a tree of nn.Partitioned (abstract) parameters, checked for divisibility."""
  rules = logical_rules(fsdp)

  def sharding_for(path, leaf):
    what = f'parameter {path_name(path)}'
    if not isinstance(leaf, nn.Partitioned):
      raise ValueError(f'{what} has no logical axis names')
    check_divisible(leaf.value.shape, leaf.names, mesh, rules, what)
    return NamedSharding(mesh, partition_spec(leaf.names, rules, what))

  return jax.tree_util.tree_map_with_path(
    sharding_for, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )


BATCH_AXES = ('activation_batch', 'activation_length')


def batch_sharding(mesh: Mesh, batch_shape, fsdp: bool = False) -> NamedSharding:
  """How a [batch, length] input array lies on the mesh; checks divisibility."""
  rules = logical_rules(fsdp)
  check_divisible(batch_shape, BATCH_AXES, mesh, rules, 'batch [global_batch_size, seq_len]')
  return NamedSharding(mesh, partition_spec(BATCH_AXES, rules, 'batch'))


def check_activations(mesh: Mesh, model_cfg, seq_len: int, fsdp: bool = False):
  """Checks the dims that activations shard (residual length, heads, kv heads, mlp, vocab)."""
  rules = logical_rules(fsdp)
  for name, size in (
    ('activation_residual_length', seq_len),
    ('activation_heads', model_cfg.num_heads),
    ('activation_kv_heads', model_cfg.num_kv_heads),
    ('activation_mlp', model_cfg.ffn_size),
    ('activation_vocab', model_cfg.vocab_size),
  ):
    check_divisible((size,), (name,), mesh, rules, f'model activation {name[11:]}')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh, fsdp: bool):
  """Makes the mesh and logical rules current, so model activation constraints take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(logical_rules(fsdp).items())):
    yield


def describe(mesh: Mesh) -> str:
  return ' × '.join(f'{axis} {size}' for axis, size in mesh.shape.items())


def devices_summary() -> str:
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return (
    f'{len(devices)} {"/".join(kinds)} device(s) over {jax.process_count()} process(es), '
    f'this is process {jax.process_index()}'
  )


def host_array(sharding: NamedSharding, local: np.ndarray) -> jax.Array:
  """Assembles each process's slice of the batch into one global jax.Array."""
  return jax.make_array_from_process_local_data(sharding, local)


# Where the residual stream and the attention / MLP activations split their length.
LENGTH_AXES = ('activation_length', 'activation_residual_length')


def splits_length() -> bool:
  """Whether the current mesh splits the activations' length (tensor or sequence parallelism).

  If not (no mesh, or the batch over `data` only), [B, L] activations merge into one token
  dim [B*L] without communication: it splits where B does.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return False
  rules = dict(nn.get_logical_axis_rules())
  return any(split_count(mesh, rules, name) > 1 for name in LENGTH_AXES)


def length_shards(mesh: Mesh) -> int:
  """Into how many pieces the attention's length is split (the context-parallel degree)."""
  return split_count(mesh, logical_rules(False), 'activation_length')


def local_size(mesh: Mesh, size: int, logical_axis: str, fsdp: bool = False) -> int:
  """How much of a dimension of `size` named `logical_axis` one device holds."""
  return max(1, size // split_count(mesh, logical_rules(fsdp), logical_axis))
