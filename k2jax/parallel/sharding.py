"""The only module (with parallel/mesh.py, which places devices) that knows the device mesh.

Mesh axes: `data` (batch; with FSDP also parameters and optimizer state), `tensor` (heads,
MLP hidden, vocab) and `sequence` (activation length); on a hybrid-FSDP mesh `replica` splits
the batch with `data` (parallel/mesh.py). Model code names logical axes; the rules below map
each name to mesh axes (or None: replicated). A parameter axis with no rule is an error rather
than a silent replication, and every sharded dimension must be divisible by its mesh axes:
both are checked before anything is compiled.

`mesh.fsdp` decides what the data axes (data, and sequence, whose ranks hold other tokens of
the same rows) shard: `none` nothing; `optimizer` (ZeRO-1, K2-V2's Megatron distributed
optimizer) the gradients, Adam's moments and the update, while parameters stay replicated;
`full` (ZeRO-3) the parameters too. `param_shardings` and `update_shardings` give the two
layouts; the train step moves between them (training/train_step.py).
"""

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k2jax.parallel import mesh as device_mesh

# The mesh module builds meshes; callers keep reaching it through this module.
AXES = device_mesh.AXES
FSDP_MODES = device_mesh.FSDP_MODES
fsdp_mode = device_mesh.fsdp_mode
make_mesh = device_mesh.make_mesh
mesh_shape = device_mesh.mesh_shape


def logical_rules(fsdp=False, mesh: Mesh | None = None, *, optimizer: bool = False) -> dict:
  """Logical axis name -> mesh axis (None = replicated).

  `fsdp` is a `mesh.fsdp` mode (or the old boolean). The rules place parameters; with
  `optimizer=True` they place what the optimizer holds per parameter instead (gradients,
  Adam's moments, the update), which 'optimizer' (ZeRO-1) shards and 'none' does not.
  On a hybrid mesh (a `replica` axis) the batch is split over replica × data and the
  sharded state over the `data` group only.
  """
  mode = fsdp_mode(fsdp)
  shard_state = mode == 'full' or (optimizer and mode == 'optimizer')
  hybrid = mesh is not None and device_mesh.REPLICA in mesh.axis_names
  return {
    # Parameters.
    'layers': None,
    # FSDP: weights (or only the optimizer's state) sharded over the data axis, and over the
    # context-parallel ranks, which hold different tokens of the same rows and so act as data
    # parallelism for them.
    'embed': ('data', 'sequence') if shard_state else None,
    'vocab': 'tensor',
    'heads': 'tensor',
    'kv_heads': 'tensor',
    'mlp': 'tensor',
    'head_dim': None,
    'norm': None,
    # Activations.
    'activation_batch': (device_mesh.REPLICA, 'data') if hybrid else 'data',
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


def check_divisible(
  shape, logical_axes, mesh: Mesh, rules: dict[str, Any], what: str, hint: str = ''
):
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
        f'{" / ".join("mesh." + axis for axis in axes if axis in AXES)}{hint}'
      )


def path_name(path) -> str:
  """'layers/attention/q' for a pytree key path."""
  return '/'.join(str(getattr(key, 'key', getattr(key, 'name', key))) for key in path)


def param_shardings(mesh: Mesh, boxed_params, fsdp=False, *, optimizer: bool = False):
  """NamedShardings for a tree of nn.Partitioned (abstract) parameters, checked for divisibility.

  With `optimizer=True`, the layout of what the optimizer keeps per parameter instead
  (`update_shardings`)."""
  rules = logical_rules(fsdp, mesh, optimizer=optimizer)
  role = 'optimizer state of parameter' if optimizer else 'parameter'
  # A sharded dimension the whole data axis cannot split may still split over a group of it.
  hint = ', or shard over a group with mesh.fsdp_group' if fsdp_mode(fsdp) != 'none' else ''

  def sharding_for(path, leaf):
    what = f'{role} {path_name(path)}'
    if not isinstance(leaf, nn.Partitioned):
      raise ValueError(f'{what} has no logical axis names')
    check_divisible(leaf.value.shape, leaf.names, mesh, rules, what, hint)
    return NamedSharding(mesh, partition_spec(leaf.names, rules, what))

  return jax.tree_util.tree_map_with_path(
    sharding_for, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )


def update_shardings(mesh: Mesh, boxed_params, fsdp=False):
  """Where each parameter's gradient, Adam moments and update lie: sharded over the data axes
  under 'optimizer' and 'full', as the parameters under 'none'."""
  return param_shardings(mesh, boxed_params, fsdp, optimizer=True)


BATCH_AXES = ('activation_batch', 'activation_length')


def batch_sharding(mesh: Mesh, batch_shape, fsdp=False) -> NamedSharding:
  """How a [batch, length] input array lies on the mesh; checks divisibility."""
  rules = logical_rules(fsdp, mesh)
  check_divisible(batch_shape, BATCH_AXES, mesh, rules, 'batch [global_batch_size, seq_len]')
  return NamedSharding(mesh, partition_spec(BATCH_AXES, rules, 'batch'))


def check_activations(mesh: Mesh, model_cfg, seq_len: int, fsdp=False):
  """Checks the dims that activations shard (residual length, heads, kv heads, mlp, vocab)."""
  rules = logical_rules(fsdp, mesh)
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
def activate(mesh: Mesh, fsdp):
  """Makes the mesh and logical rules current, so model activation constraints take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(logical_rules(fsdp, mesh).items())):
    yield


def describe(mesh: Mesh, mesh_cfg=None) -> str:
  """'data 8 × tensor 1 × sequence 1'; given the run's `mesh` config, also its FSDP mode and
  which axes cross hosts (the start-up log line)."""
  text = ' × '.join(f'{axis} {size}' for axis, size in mesh.shape.items())
  if mesh_cfg is None:
    return text
  mode = fsdp_mode(mesh_cfg.get('fsdp', False))
  if mode != 'none':
    text += f' (fsdp {mode}'
    if device_mesh.REPLICA in mesh.axis_names:
      text += f', sharded in groups of {mesh.shape["data"]} data shards'
    text += ')'
  return f'{text}; placement: {device_mesh.describe_placement(mesh)}'


def devices_summary() -> str:
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return (
    f'{len(devices)} {"/".join(kinds)} device(s) over {jax.process_count()} process(es), '
    f'this is process {jax.process_index()}'
  )


# Where the residual stream and the attention / MLP activations split their length.
LENGTH_AXES = ('activation_length', 'activation_residual_length')


def splits_length() -> bool:
  """Whether the current mesh splits the activations' length (tensor or sequence parallelism).

  If not (no mesh, or the batch over `data` only), [B, L] activations merge into one token
  dim [B*L] without communication: it splits where B does.
  """
  return any(current_split(name) > 1 for name in LENGTH_AXES)


def length_shards(mesh: Mesh) -> int:
  """Into how many pieces the attention's length is split (the context-parallel degree)."""
  return split_count(mesh, logical_rules(False, mesh), 'activation_length')


def local_size(mesh: Mesh, size: int, logical_axis: str, fsdp=False) -> int:
  """How much of a dimension of `size` named `logical_axis` one device holds."""
  return max(1, size // split_count(mesh, logical_rules(fsdp, mesh), logical_axis))


def batch_shards(mesh: Mesh) -> int:
  """Into how many pieces the batch is split (the data-parallel degree, hybrid or not)."""
  return split_count(mesh, logical_rules(False, mesh), 'activation_batch')


def current_split(logical_axis: str) -> int:
  """Into how many pieces the current mesh and rules (see `activate`) split a dimension named
  `logical_axis`; 1 outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return split_count(mesh, dict(nn.get_logical_axis_rules()), logical_axis)
