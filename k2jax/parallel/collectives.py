"""Bytes each device sends per step in each collective, read from a compiled program's HLO text.

`summarize(compiled.as_text(), mesh)` walks the optimized HLO module (the text of
`jax.jit(...).lower(...).compile()`), finds every collective and returns one row per
(kind, mesh axes): how many collective ops, how many times they run per step, and the bytes
one device sends per step.

**Bytes sent per device** (the NCCL "bus bytes" of nccl-tests' PERFORMANCE.md; a ring
algorithm moves exactly these), for a group of n devices and B = the operand bytes one device
holds (the sum over operands for a combined collective):

  all-gather          (n - 1) * B            = (n - 1) / n x output bytes
  reduce-scatter      (n - 1) / n * B        (B: the whole, unscattered input)
  all-reduce          2 (n - 1) / n * B      (a reduce-scatter, then an all-gather)
  all-to-all          (n - 1) / n * B
  collective-permute  B x the share of devices that send to another device

Time on a link of bus bandwidth W is then bytes / W (roofline.py). Each row keeps the
size-independent "whole" bytes (all-gather: its output; the others: B) and n, so the planner
can re-price a data axis compiled smaller than the real one (`scaled_bytes`).

**Counting.** Computations are visited from ENTRY; a `while` body runs its
`known_trip_count` times (the backend config XLA writes for a scan over layers); a loop
without one is counted once and reported in `unknown_trip_loops` with whether it holds
collectives. Called computations (`calls=`, `to_apply=`, branches) inherit their caller's
count. Async pairs count once: `*-start` and the op wrapped by `async-start`, never
`*-done`.

**Mesh axes.** Replica groups come in three spellings: explicit `{{0,1},{2,3}}`, iota
`[G,S]<=[dims]T(perm)`, and `mesh['axis_0'=8,...] {'axis_0'}` (XLA's own tile mesh, not the
JAX mesh; optional `device_ids=(...)`, sub-axes `'a':(pre)size`). All become lists of
partition ids, which index `mesh.devices.flat`; a group's axes are the JAX mesh axes along
which its devices' coordinates vary.

**What XLA:CPU compiles differs from XLA:GPU** (research note scale_out.md §3, §5):
- a partial -> sharded reduction (gradients under FSDP, Megatron's sequence-parallel output)
  is an `all-reduce` followed by a `dynamic-slice`; XLA:GPU's ReduceScatterCreator turns the
  pair into a `reduce-scatter` at half the bytes. Such all-reduces are flagged `sliced`;
- bf16 collectives are promoted to f32 (the reduction computation is named `*_promoted`, or
  the operand is converted up from bf16 just before): flagged `promoted`, at twice the bytes
  a GPU would send.
The rows report what the compiled program holds; `gpu_bytes` applies both corrections.
"""

import collections
import dataclasses
import json
import math
import re

import numpy as np

KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_OPCODES = {kind: kind for kind in KINDS} | {
  'all-gather-start': 'all-gather',
  'all-reduce-start': 'all-reduce',
  'collective-permute-start': 'collective-permute',
  'reduce-scatter-start': 'reduce-scatter',
  'all-to-all-start': 'all-to-all',
  'ragged-all-to-all': 'all-to-all',
}
_DTYPE_BYTES = {
  'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
  'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
}  # fmt: skip
_NARROW = ('bf16', 'f16')
_PASS_THROUGH = {'get-tuple-element', 'bitcast', 'copy', 'convert', 'parameter'}
_ARRAY = re.compile(r'\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]')
_HEADER = re.compile(r'^(ENTRY\s+)?%(\S+)\s+\(.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(ROOT\s+)?%(\S+)\s*=\s*')
_CALLEES = re.compile(
  r'\b(calls|to_apply|body|condition|true_computation|false_computation)=%([\w.-]+)'
)
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_IOTA = re.compile(r'\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?')
_MESH = re.compile(
  r'mesh\[([^\]]*)\](?:,\s*device_ids=\((\[[\d,]*\](?:<=\[[\d,]*\])?(?:T\([\d,]*\))?|[\d,]*)\))?'
  r'(?:\s*\{([^}]*)\})?'
)


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # the result shape text, e.g. 'f32[8,16]{1,0}' or a tuple '(...)'
  opcode: str
  operands: list[str]
  attributes: str
  computation: str


def array_bytes(shape: str) -> float:
  """Bytes of every array in a shape text (a tuple sums its elements)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype.startswith('f8'):  # f8e4m3fn, f8e5m2, ...
      size = 1
    elif dtype in ('s4', 'u4'):
      size = 0.5
    else:
      size = _DTYPE_BYTES.get(dtype, 0)  # token[] and the like: nothing sent
    total += size * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  pairs = {'(': ')', '{': '}', '[': ']'}
  stack = []
  for i in range(start, len(text)):
    char = text[i]
    if char in pairs:
      stack.append(pairs[char])
    elif stack and char == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
  return len(text)


def parse_module(text: str):
  """(instructions by name, computation names in text order, entry name)."""
  instructions, order, entry, current = {}, [], None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      order.append(current)
      if header.group(1):
        entry = current
      continue
    match = _INSTRUCTION.match(line)
    if not match or current is None:
      continue
    rest = line[match.end() :]
    rest = re.sub(r'/\*[^*]*\*/', '', rest)
    if rest.startswith('('):
      end = _balanced(rest, 0)
    else:
      end = rest.find(' ')
    shape, tail = rest[:end], rest[end:].lstrip()
    op = re.match(r'([\w-]+)\(', tail)
    if not op:
      continue
    close = _balanced(tail, op.end() - 1)
    operands = re.findall(r'%([\w.-]+)', tail[op.end() : close - 1])
    instructions[match.group(2)] = Instruction(
      match.group(2), shape, op.group(1), operands, tail[close:], current
    )
  return instructions, order, entry


def computation_counts(instructions, order, entry):
  """How many times each computation runs per call of ENTRY; and the loops of unknown count."""
  calls = collections.defaultdict(list)  # caller -> [(callee, factor)]
  unknown = []
  for inst in instructions.values():
    factor = 1
    if inst.opcode == 'while':
      trip = _TRIP.search(inst.attributes)
      if trip:
        factor = int(trip.group(1))
      else:
        unknown.append(inst)
    if inst.opcode in ('async-done', 'async-update'):
      continue  # the wrapped op is counted through its async-start
    for _, callee in _CALLEES.findall(inst.attributes):
      calls[inst.computation].append((callee, factor))
    for branches in _BRANCHES.findall(inst.attributes):
      for callee in re.findall(r'%([\w.-]+)', branches):
        calls[inst.computation].append((callee, 1))
  counts = collections.Counter({entry: 1})
  # HLO text lists callees before their callers, ENTRY last: walk it backwards.
  for name in reversed(order):
    for callee, factor in calls.get(name, ()):
      counts[callee] += counts[name] * factor
  return counts, unknown


def _iota(reshape, perm, shape):
  ids = np.arange(math.prod(reshape)).reshape(reshape)
  if perm:
    ids = ids.transpose(perm)
  return ids.reshape(shape)


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(',') if x.strip()]


def _mesh_groups(match, num_partitions: int) -> np.ndarray:
  axes = re.findall(r"'([^']+)'=(\d+)", match.group(1))
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  device_ids = match.group(2)
  if not device_ids:
    ids = np.arange(math.prod(sizes))
  elif device_ids.startswith('['):
    dims = re.match(r'\[([\d,]*)\](?:<=\[([\d,]*)\])?(?:T\(([\d,]*)\))?', device_ids)
    reshape = _ints(dims.group(2) or dims.group(1))
    ids = _iota(reshape, _ints(dims.group(3) or ''), -1)
  else:
    ids = np.array(_ints(device_ids))
  # Sub-axes 'a':(pre)size split axis a into [pre, size, rest]; group over the middle ones.
  refs = re.findall(r"'([^']+)'(?::\((\d+)\)(\d+))?", match.group(3) or '')
  split_sizes, grouped = [], []
  for name, size in zip(names, sizes):
    subs = sorted((int(p), int(s)) for n, p, s in refs if n == name and p)
    whole = any(n == name and not p for n, p, _ in refs)
    if whole:
      grouped.append(len(split_sizes))
      split_sizes.append(size)
      continue
    done = 1
    for pre, sub in subs:
      if pre != done:
        split_sizes.append(pre // done)
      grouped.append(len(split_sizes))
      split_sizes.append(sub)
      done = pre * sub
    if done != size or not subs:
      split_sizes.append(size // done)
  ids = ids.reshape(split_sizes)
  rest = [i for i in range(len(split_sizes)) if i not in grouped]
  group_size = math.prod(split_sizes[i] for i in grouped)
  return ids.transpose(rest + grouped).reshape(-1, group_size)


def replica_groups(attributes: str, num_partitions: int) -> np.ndarray | None:
  """[groups, group size] partition ids of a collective (None: not a grouped collective)."""
  start = attributes.find('replica_groups=')
  if start < 0:
    return None
  text = attributes[start + len('replica_groups=') :]
  if text.startswith('mesh['):
    return _mesh_groups(_MESH.match(text), num_partitions)
  iota = _IOTA.match(text)
  if iota:
    shape = _ints(iota.group(1))
    return _iota(_ints(iota.group(2)), _ints(iota.group(3) or ''), shape)
  if text.startswith('{}'):
    return np.arange(num_partitions).reshape(1, -1)
  body = text[: _balanced(text, 0)]
  groups = [_ints(g) for g in re.findall(r'\{([\d,]+)\}', body)]
  return np.array(groups)


def group_axes(group, mesh_shape: dict) -> tuple[str, ...]:
  """The mesh axes along which the devices of `group` (partition ids) differ.

  An axis only partly covered (a group of 2 on an axis of 8) is named 'axis/2'.
  """
  names, sizes = list(mesh_shape), list(mesh_shape.values())
  coords = np.array(np.unravel_index(np.asarray(group), sizes))
  axes = []
  for i, name in enumerate(names):
    distinct = len(set(coords[i].tolist()))
    if distinct > 1:
      axes.append(name if distinct == sizes[i] else f'{name}/{distinct}')
  return tuple(axes)


def sent_bytes(kind: str, n: int, whole: float) -> float:
  """Bytes one device sends in one run of a collective over n devices (module docstring)."""
  if n <= 1:
    return 0.0
  if kind == 'all-gather':
    return (n - 1) / n * whole
  if kind == 'all-reduce':
    return 2 * (n - 1) / n * whole
  if kind in ('reduce-scatter', 'all-to-all'):
    return (n - 1) / n * whole
  return whole  # collective-permute: whole = B x share of devices that send


@dataclasses.dataclass
class Collective:
  kind: str
  name: str
  axes: tuple[str, ...]
  group_size: int
  runs: int  # executions per step
  whole_bytes: float  # size-independent: all-gather output, else the operand (module docstring)
  sliced: float  # share of an all-reduce whose result is only dynamic-sliced (GPU: reduce-scatter)
  promoted: bool  # a bf16/f16 collective XLA:CPU runs in f32

  @property
  def bytes(self) -> float:
    return self.runs * sent_bytes(self.kind, self.group_size, self.whole_bytes)


def _promoted(inst, instructions) -> bool:
  if inst.opcode.startswith('all-reduce') and re.search(
    r'to_apply=%[\w.-]*_promoted', inst.attributes
  ):
    return True
  for operand in inst.operands:  # the operand was converted up from bf16 just before
    source = instructions.get(operand)
    if source is None or not _ARRAY.match(source.shape) or not source.shape.startswith('f32'):
      continue
    if source.opcode == 'convert' and any(
      instructions.get(o) and instructions[o].shape.startswith(_NARROW) for o in source.operands
    ):
      return True
    callee = re.search(r'calls=%([\w.-]+)', source.attributes)
    if source.opcode == 'fusion' and callee:
      body = [i for i in instructions.values() if i.computation == callee.group(1)]
      root = body[-1] if body else None
      if (
        root
        and root.opcode == 'convert'
        and any(
          instructions.get(o) and instructions[o].shape.startswith(_NARROW) for o in root.operands
        )
      ):
        return True
  return False


def _only_sliced(name: str, users, instructions) -> bool:
  """True when every use of the value `name` is a dynamic-slice (possibly fused, or behind
  get-tuple-element, bitcast, copy or convert)."""
  pending, seen, found = [name], set(), False
  while pending:
    for user in users.get(pending.pop(), ()):
      if user.name in seen:
        continue
      seen.add(user.name)
      callee = re.search(r'calls=%([\w.-]+)', user.attributes)
      body = {i.opcode for i in instructions.values() if callee and i.computation == callee[1]}
      if user.opcode in _PASS_THROUGH or (user.opcode == 'fusion' and body <= _PASS_THROUGH):
        pending.append(user.name)  # a cast or a copy: follow its users
      elif user.opcode == 'dynamic-slice' or (user.opcode == 'fusion' and 'dynamic-slice' in body):
        found = True
      else:
        return False
  return found


def _sliced_share(inst, operand_bytes: list[int], users, instructions) -> float:
  """The share of an all-reduce's bytes whose result is only dynamic-sliced: per element of
  a combined (tuple) all-reduce, through its get-tuple-element."""
  total = sum(operand_bytes) or 1
  if not inst.shape.startswith('('):
    return 1.0 if _only_sliced(inst.name, users, instructions) else 0.0
  sliced = 0
  for user in users.get(inst.name, ()):
    index = re.search(r'index=(\d+)', user.attributes)
    if user.opcode != 'get-tuple-element' or not index:
      return 0.0
    if int(index[1]) < len(operand_bytes) and _only_sliced(user.name, users, instructions):
      sliced += operand_bytes[int(index[1])]
  return sliced / total


def collectives(text: str, mesh_shape: dict):
  """(list of Collective, unknown-trip loops: [{'name', 'holds_collectives'}])."""
  instructions, order, entry = parse_module(text)
  counts, unknown = computation_counts(instructions, order, entry)
  num_partitions = math.prod(mesh_shape.values())
  users = collections.defaultdict(list)
  for inst in instructions.values():
    for operand in inst.operands:
      users[operand].append(inst)
  found = []
  for inst in instructions.values():
    kind = _OPCODES.get(inst.opcode)
    runs = counts.get(inst.computation, 0)
    if kind is None or runs == 0:
      continue
    if inst.opcode.endswith('-start') and 'calls=%' in inst.attributes:
      continue  # an async wrapper: the op it wraps is counted in its own computation
    each = [array_bytes(instructions[o].shape) if o in instructions else 0 for o in inst.operands]
    operand_bytes = sum(each)
    if kind == 'collective-permute':
      pairs = re.findall(r'\{(\d+),(\d+)\}', inst.attributes.split('source_target_pairs=')[-1])
      moving = [(s, t) for s, t in pairs if s != t]
      whole = operand_bytes * len(moving) / num_partitions
      # Its axes: those along which a source and its target differ.
      differ = {a for s, t in moving for a in group_axes([int(s), int(t)], mesh_shape)}
      axes = tuple(a for a in mesh_shape if a in differ or f'{a}/2' in differ)
      size = 2 if moving else 1
    else:
      groups = replica_groups(inst.attributes, num_partitions)
      group = groups[0] if groups is not None else list(range(num_partitions))
      size = len(group)
      axes = group_axes(group, mesh_shape)
      whole = operand_bytes * (size if kind == 'all-gather' else 1)
    sliced = _sliced_share(inst, each, users, instructions) if kind == 'all-reduce' else 0.0
    found.append(
      Collective(kind, inst.name, axes, size, runs, whole, sliced, _promoted(inst, instructions))
    )
  loops = []
  for loop in unknown:
    inside = _reachable(re.search(r'body=%([\w.-]+)', loop.attributes).group(1), instructions)
    holds = any(_OPCODES.get(i.opcode) and i.computation in inside for i in instructions.values())
    loops.append({'name': loop.name, 'holds_collectives': holds})
  return found, loops


def _reachable(root: str, instructions) -> set[str]:
  edges = collections.defaultdict(set)
  for inst in instructions.values():
    for _, callee in _CALLEES.findall(inst.attributes):
      edges[inst.computation].add(callee)
  seen, pending = {root}, [root]
  while pending:
    for callee in edges[pending.pop()]:
      if callee not in seen:
        seen.add(callee)
        pending.append(callee)
  return seen


def gpu_bytes(op: Collective) -> float:
  """The bytes XLA:GPU would send for this op: a sliced all-reduce as a reduce-scatter, a
  promoted collective in its own 16-bit type."""
  sliced = op.runs * sent_bytes('reduce-scatter', op.group_size, op.whole_bytes * op.sliced)
  sent = sliced + op.runs * sent_bytes(op.kind, op.group_size, op.whole_bytes * (1 - op.sliced))
  return sent / 2 if op.promoted else sent


def summarize(text: str, mesh_shape: dict) -> dict:
  """One row per (kind, axes), sorted by bytes; JSON-ready."""
  found, loops = collectives(text, mesh_shape)
  rows = {}
  for op in found:
    key = (op.kind, op.axes)
    row = rows.setdefault(
      key,
      {
        'kind': op.kind,
        'axes': list(op.axes),
        'group_size': op.group_size,
        'ops': 0,
        'runs': 0,
        'bytes': 0.0,
        'whole_bytes': 0.0,  # per step: sum of runs x whole bytes
        'sliced_bytes': 0.0,  # of `bytes`: all-reduces that are reduce-scatters on GPU
        'promoted_bytes': 0.0,  # of `bytes`: bf16 collectives run in f32 on CPU
        'gpu_bytes': 0.0,
      },
    )
    row['ops'] += 1
    row['runs'] += op.runs
    row['bytes'] += op.bytes
    row['whole_bytes'] += op.runs * op.whole_bytes
    row['sliced_bytes'] += op.bytes * op.sliced
    row['promoted_bytes'] += op.bytes if op.promoted else 0.0
    row['gpu_bytes'] += gpu_bytes(op)
  table = sorted(rows.values(), key=lambda r: -r['bytes'])
  return {
    'rows': table,
    'total_bytes': sum(r['bytes'] for r in table),
    'total_gpu_bytes': sum(r['gpu_bytes'] for r in table),
    'unknown_trip_loops': loops,
  }


def rescale(row: dict, compiled: dict, real: dict, key: str = 'gpu_bytes') -> float:
  """A row's bytes with its axes at their `real` sizes instead of the `compiled` ones.

  Valid when each device's operands are the same at both sizes (the planner's reduced
  meshes): only the (n - 1) / n factor changes. A permute does not depend on n.
  """
  n = row['group_size']
  if row['kind'] == 'collective-permute' or n <= 1:
    return row[key]
  factor = 1.0
  for axis in row['axes']:
    name = axis.split('/')[0]
    factor *= real.get(name, 1) / compiled.get(name, 1)
  n_real = max(1, round(n * factor))
  if n_real <= 1:
    return 0.0
  return row[key] * (n_real - 1) / n_real / ((n - 1) / n)


if __name__ == '__main__':  # python -m k2jax.parallel.collectives FILE.hlo data=8,tensor=8
  import sys

  shape = {k: int(v) for k, v in (p.split('=') for p in sys.argv[2].split(','))}
  print(json.dumps(summarize(open(sys.argv[1]).read(), shape), indent=1))
