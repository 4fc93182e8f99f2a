"""The device mesh, placed on the cluster's topology.

Users give total axis sizes (`mesh.data`, `mesh.tensor`, `mesh.sequence`; one may be -1 to
fill). Where each device goes is decided here, from the topology:

- Devices are grouped into *granules*, the units with the fast interconnect: the slice
  (`device.slice_index`, one NVLink domain per node on H100/H200 clusters) when there are
  several, else the process (CPU, or one GPU node per process).
- Each axis is split into a part inside a granule and a part across granules, filling the
  granule innermost-first: `tensor` (collectives twice per layer), then `sequence` (K/V
  gathers per layer), then `data` (one gradient reduction per step). So "tensor 8, sequence 8"
  on 8-GPU nodes keeps each tensor group inside a node and runs `sequence` across 8 nodes.
- Inside a granule devices go in id order; granules are tiled with the across-granule index
  outermost on each axis (as JAX's hybrid device mesh, but with a pluggable granule, so it
  also works where `jax.make_mesh` refuses devices from more than one slice).

The mesh keeps the axis names and order `data, tensor, sequence`, so every PartitionSpec
means what it did; only device placement follows the topology. With hybrid sharding
(`mesh.fsdp_group`, see `fsdp_group`), the data axis is split into `replica` (outer, across
groups) × `data` (the group that shards weights / optimizer state).
"""

import math

import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ('data', 'tensor', 'sequence')  # the config's axis names, and the mesh's order
PLACEMENT = ('tensor', 'sequence', 'data')  # innermost first: filled inside a granule first
REPLICA = 'replica'  # hybrid sharding: data groups that replicate weights / optimizer state

# mesh.fsdp: what is sharded over the data axes (data, and sequence, which holds other tokens
# of the same rows and so acts as data parallelism for the weights).
FSDP_MODES = ('none', 'optimizer', 'full')


def fsdp_mode(value) -> str:
  """`mesh.fsdp` as one of FSDP_MODES. Booleans (older configs and checkpoints) mean
  True -> 'full' (ZeRO-3, the old behaviour), False -> 'none'."""
  if isinstance(value, bool):
    return 'full' if value else 'none'
  if isinstance(value, str) and value.lower() in ('true', 'false'):  # an old command line
    return 'full' if value.lower() == 'true' else 'none'
  if value not in FSDP_MODES:
    raise ValueError(f'mesh.fsdp={value!r} is not one of {"|".join(FSDP_MODES)}')
  return value


def fsdp_group(mesh_cfg, data: int | None = None) -> int | None:
  """How many data shards share one copy of the sharded state (`mesh.fsdp_group`; 0: all).

  A group larger than the data axis is the whole axis (a stage config sized for 400 nodes
  still runs on a few), and with `mesh.fsdp=none` there is nothing to shard: one group, so
  that `--config.mesh.fsdp=none` alone turns a stage's sharding off. Returns the group size
  for a `data` axis size, or None without one (only the key itself checked). Raises a
  ValueError for a group that does not divide the data axis.
  """
  group = mesh_cfg.get('fsdp_group', 0) or 0
  if isinstance(group, bool) or not isinstance(group, int) or group < 0:
    raise ValueError(f'mesh.fsdp_group must be an integer >= 0 (0: all data shards), got {group!r}')
  if data is None:
    return None
  if fsdp_mode(mesh_cfg.get('fsdp', False)) == 'none':
    return data
  group = min(group or data, data)
  if data % group:
    raise ValueError(
      f'mesh.fsdp_group={group} does not divide the data axis (data {data}); '
      'use a divisor of it, or 0 for all data shards'
    )
  return group


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


# --- topology ------------------------------------------------------------------------------


def granule_kind(devices) -> str:
  """'slice' when the devices span several slices (NVLink domains / TPU slices), else
  'process'. Single-process CPU devices have no slice_index; under jax.distributed on CPU
  every device reports slice 0."""
  slices = {getattr(d, 'slice_index', None) for d in devices}
  return 'slice' if len(slices) > 1 else 'process'


def granule_key(device, kind: str) -> int:
  return device.slice_index if kind == 'slice' else device.process_index


def granules(devices) -> tuple[str, list[list]]:
  """(kind, devices grouped by granule, each in id order, groups in key order)."""
  kind = granule_kind(devices)
  groups: dict[int, list] = {}
  for device in devices:
    groups.setdefault(granule_key(device, kind), []).append(device)
  ordered = [sorted(groups[key], key=lambda d: d.id) for key in sorted(groups)]
  counts = sorted({len(group) for group in ordered})
  if len(counts) > 1:
    raise ValueError(
      f'every {kind} must hold the same number of devices to build a mesh, got '
      f'{" and ".join(map(str, counts))}'
    )
  return kind, ordered


def split_sizes(sizes: dict[str, int], per_granule: int, kind: str = 'process'):
  """Each axis size as (inside a granule, across granules), filling `per_granule` devices
  innermost-first (PLACEMENT). An axis must divide what is left of the granule, or be a
  multiple of it; otherwise its groups would straddle granules irregularly: ValueError."""
  inside, across = {}, {}
  left = per_granule
  for axis in PLACEMENT:
    size = sizes[axis]
    if left % size == 0:
      inside[axis], left = size, left // size
    elif size % left == 0:
      inside[axis], left = left, 1
    else:
      placed = ' × '.join(f'{a} {inside[a]}' for a in PLACEMENT if a in inside and inside[a] > 1)
      raise ValueError(
        f'mesh.{axis}={size} cannot be placed on {per_granule} devices per {kind}'
        f'{f" after {placed}" if placed else ""}: it must divide the {left} left or be a '
        f'multiple of {left}'
      )
    across[axis] = size // inside[axis]
  return inside, across


def device_grid(sizes: dict[str, int], devices) -> tuple[np.ndarray, str]:
  """The devices as an array of shape [data, tensor, sequence] (AXES order) placed by the
  topology, and the granule kind. Works on anything with `id`, `process_index` (and
  optionally `slice_index`), so it is testable with stand-in devices."""
  kind, groups = granules(devices)
  inside, across = split_sizes(sizes, len(groups[0]), kind)
  order = PLACEMENT[::-1]  # outermost first: data, sequence, tensor
  inner = tuple(inside[a] for a in order)
  outer = tuple(across[a] for a in order)
  grid = np.empty(tuple(sizes[a] for a in order), dtype=object)
  for index, group in zip(np.ndindex(*outer), groups):
    block = np.empty(len(group), dtype=object)
    block[:] = group
    where = tuple(slice(i * n, (i + 1) * n) for i, n in zip(index, inner))
    grid[where] = block.reshape(inner)
  return grid.transpose([order.index(a) for a in AXES]), kind


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The mesh of `mesh_cfg` over `devices` (default: all), placed by the topology.

  With `mesh.fsdp_group` G (0 < G < data) the data axis becomes `replica` (data / G) ×
  `data` (G): consecutive data shards, the nearest ones, form a group.
  """
  import jax

  devices = list(devices if devices is not None else jax.devices())
  platform = devices[0].platform if devices else None
  shape = mesh_shape(mesh_cfg, len(devices), platform=platform)
  grid, _ = device_grid(dict(zip(AXES, shape)), devices)
  names = AXES
  group = fsdp_group(mesh_cfg, shape[0])
  if group != shape[0]:
    grid = grid.reshape(shape[0] // group, group, *shape[1:])
    names = (REPLICA, *AXES)
  # Auto axes: the XLA partitioner propagates shardings from our annotations.
  return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def placement(grid: np.ndarray, names) -> str:
  """Which axes stay inside one granule and which cross granules, in words:
  'tensor 8 within each process; data 400 across 400 processes'."""
  kind = granule_kind(grid.flat)
  keys = np.vectorize(lambda d: granule_key(d, kind), otypes=[int])(grid)
  if len(np.unique(keys)) == 1:
    return f'every axis within one {kind}'
  plural = {'process': 'processes', 'slice': 'slices'}[kind]
  parts = []
  for axis, name in enumerate(names):
    size = grid.shape[axis]
    if size == 1:
      continue
    rows = np.moveaxis(keys, axis, -1).reshape(-1, size)
    spans = max(len(set(row.tolist())) for row in rows)
    where = f'within each {kind}' if spans == 1 else f'across {spans} {plural}'
    parts.append(f'{name} {size} {where}')
  return '; '.join(parts)


def describe_placement(mesh: Mesh) -> str:
  """`placement` of a built mesh: what crosses hosts (logged at start-up)."""
  return placement(mesh.devices, mesh.axis_names)
