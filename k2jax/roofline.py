"""A roofline of one training step on H200s: compute, communication, what overlaps.

  compute  = hardware FLOPs per device / sustained TFLOP/s
             (model FLOPs: 6 x matmul params + causal attention, ModelConfig.flops_per_token,
             plus the forward the remat policy recomputes in the backward pass)
  comm     = for each collective row (parallel/collectives.py): bytes sent per device / the
             bus bandwidth of its link: NVLink inside a node, InfiniBand across nodes
  step     = max(compute, overlapped comm) + exposed comm

Which collectives overlap: `overlap='cross_node'` (default) hides the cross-node ones (FSDP
weight all-gathers and gradient reduce-scatters, which XLA's latency-hiding scheduler and
pipelined collectives move off the critical path: launch/ presets) behind compute and
leaves the tensor-parallel ones inside a node exposed (each sits between two matmuls of a
layer); 'all' hides everything, 'none' nothing. MFU counts model FLOPs only (no recompute),
as MaxText and Megatron do, against the dense BF16 peak.

Defaults and their sources are in docs/performance.md (research note launch.md §5).
"""

import dataclasses
import math

OVERLAP = ('cross_node', 'all', 'none')


@dataclasses.dataclass(frozen=True)
class Hardware:
  peak_tflops: float = 989.0  # H200 dense BF16: the MFU denominator
  # What XLA sustains on a 70B step: MaxText Llama-3.1-70B on H200 ran 508 model TFLOP/s with
  # a remat that recomputes the MLP forward (x1.25 hardware FLOPs) => ~635 (performance.md).
  sustained_tflops: float = 635.0
  nvlink_gbps: float = 370.0  # NCCL bus bandwidth of all-gather / reduce-scatter in a node
  ib_gbps: float = 47.0  # per GPU: one 400 Gb/s NDR NIC each, 46-49 GB/s achieved
  gpus_per_node: int = 8
  memory_gb: float = 141.0  # HBM3e per H200

  def __post_init__(self):
    for field in dataclasses.fields(self):
      if getattr(self, field.name) <= 0:
        raise ValueError(f'{field.name} must be positive, got {getattr(self, field.name)}')


def recompute_flops_per_token(model_cfg, seq_len: int) -> float:
  """Forward FLOPs per token that `model_cfg.remat` runs a second time in the backward pass."""
  c = model_cfg
  attention_proj = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  out_proj = c.hidden_size * c.head_dim * c.num_heads
  mlp = 3 * c.hidden_size * c.ffn_size
  core = 2 * seq_len * c.num_heads * c.head_dim  # causal QK^T and AV, forward
  per_layer = {
    'none': 0,
    'full': 2 * (attention_proj + mlp) + core,
    'offload_block_input': 2 * (attention_proj + mlp) + core,
    'save_dots': core,
    'save_qkv_attn': 2 * (out_proj + mlp),
    'save_attn': 2 * (attention_proj + mlp),
  }[c.remat]
  return c.num_layers * per_layer


def link(axes, mesh_shape: dict, hw: Hardware) -> tuple[str, float]:
  """('nvlink' | 'ib', bus GB/s) of a collective over `axes` of the real mesh.

  Assumes the topology-aware layout (scale-out issue): tensor innermost, then sequence, then
  data, nodes of `gpus_per_node` consecutive devices. A group stays in a node when the axes
  up to its outermost one fit a node; across nodes, its k members per node share k NICs
  (NCCL: bus bandwidth ~ min(NVLink, k x IB)).
  """
  order = [a for a in ('tensor', 'sequence', 'data', 'replica') if a in mesh_shape]  # inner first
  names = [a.split('/')[0] for a in axes]
  if not names:
    return 'nvlink', hw.nvlink_gbps
  outer = max(order.index(a) for a in names)
  span = math.prod(mesh_shape[a] for a in order[: outer + 1])
  if span <= hw.gpus_per_node:
    return 'nvlink', hw.nvlink_gbps
  inner = 1  # group members inside one node
  block = 1
  for axis in order:
    if block * mesh_shape[axis] > hw.gpus_per_node:
      if axis in names:
        inner *= max(1, hw.gpus_per_node // block)
      break
    block *= mesh_shape[axis]
    if axis in names:
      inner *= mesh_shape[axis]
  return 'ib', min(hw.nvlink_gbps, inner * hw.ib_gbps)


def step(
  *,
  model_flops: float,
  hardware_flops: float,
  tokens: float,
  devices: int,
  comm_rows: list[dict],
  mesh_shape: dict,
  hw: Hardware = Hardware(),
  overlap: str = 'cross_node',
) -> dict:
  """The roofline of one step. FLOPs and tokens are per step over all devices; each comm row
  has 'axes' and 'bytes' (sent per device per step)."""
  if overlap not in OVERLAP:
    raise ValueError(f'overlap={overlap!r} is not one of {"|".join(OVERLAP)}')
  compute = hardware_flops / devices / (hw.sustained_tflops * 1e12)
  hidden = exposed = 0.0
  by_link = {'nvlink': 0.0, 'ib': 0.0}
  for row in comm_rows:
    kind, gbps = link(row['axes'], mesh_shape, hw)
    seconds = row['bytes'] / (gbps * 1e9)
    by_link[kind] += seconds
    if overlap == 'all' or (overlap == 'cross_node' and kind == 'ib'):
      hidden += seconds
    else:
      exposed += seconds
  seconds = max(compute, hidden) + exposed
  terms = {'compute': compute, 'exposed comm': exposed, 'overlapped comm': hidden}
  dominant = 'compute' if compute >= hidden else 'overlapped comm'
  if exposed > max(compute, hidden):
    dominant = 'exposed comm'
  return {
    'step_seconds': seconds,
    'compute_seconds': compute,
    'nvlink_seconds': by_link['nvlink'],
    'ib_seconds': by_link['ib'],
    'exposed_comm_seconds': exposed,
    'overlapped_comm_seconds': hidden,
    'dominant': dominant,
    'terms': terms,
    'tokens_per_second_per_device': tokens / seconds / devices,
    'mfu': model_flops / (seconds * devices * hw.peak_tflops * 1e12),
    'overlap': overlap,
  }


def closed_form_comm(model_cfg, *, mesh_shape: dict, fsdp: str, micro_batch_per_shard: int,
                     accum_steps: int, seq_len: int) -> list[dict]:  # fmt: skip
  """Collective bytes per device per step without compiling (the planner's dry run).

  The patterns the compiled 70B step shows (docs/performance.md): per layer and micro-batch,
  Megatron sequence parallelism over `tensor` gathers the [rows, length, hidden] activations
  before, and reduce-scatters them after, attention and the MLP, in the forward, again in
  the recompute, and their conjugates in the backward (counts in the code); FSDP gathers each layer's weights
  (f32, as compiled) over data x sequence in the forward and again in the backward, and
  reduce-scatters their bf16 gradients; without FSDP the gradients are all-reduced once per
  step; ZeRO-1 ('optimizer') reduce-scatters them and all-gathers the updated weights once.
  Context parallelism gathers K and V over `sequence` (forward, recompute) and
  reduce-scatters dK, dV.
  """
  from k2jax.parallel.collectives import sent_bytes

  c = model_cfg
  t, s, d = (mesh_shape.get(a, 1) for a in ('tensor', 'sequence', 'data'))
  layers = c.num_layers
  remat = c.remat != 'none'
  rows = []

  def add(kind, axes, n, whole, runs):
    if n > 1 and runs:
      rows.append({'kind': kind, 'axes': axes, 'group_size': n, 'runs': runs,
                   'bytes': runs * sent_bytes(kind, n, whole)})  # fmt: skip

  act = micro_batch_per_shard * (seq_len // s) * c.hidden_size * 2  # bf16, per tensor group
  # Per layer, as the compiled step has them: gathers before attention and the MLP (forward,
  # recompute, and of the two cotangents); reduce-scatters after them (forward; recompute of
  # attention's only, the MLP's output is not needed again) and of dX in the backward, one
  # per projection (q, k, v; gate, up) rather than one of their sum.
  gathers, scatters = (6, 8) if remat else (4, 7)
  add('all-gather', ['tensor'], t, act, gathers * layers * accum_steps)
  add('reduce-scatter', ['tensor'], t, act, scatters * layers * accum_steps)
  layer_params = c.layer_param_count() / t
  other_params = (c.param_count() - layers * c.layer_param_count()) / t  # embeddings, head
  params = layer_params * layers + other_params
  shard_axes = [a for a in ('data', 'sequence') if mesh_shape.get(a, 1) > 1]
  n = d * s
  replicas = mesh_shape.get('replica', 1)
  if fsdp != 'none':  # hybrid: the group's gradient shard is all-reduced across groups
    add('all-reduce', ['replica'], replicas, params * 2 / n, accum_steps)
  if fsdp == 'full':
    add('all-gather', shard_axes, n, layer_params * 4, 2 * layers * accum_steps)
    add('all-gather', shard_axes, n, other_params * 4, 2 * accum_steps)
    add('reduce-scatter', shard_axes, n, params * 2, accum_steps)
  elif fsdp == 'optimizer':
    add('reduce-scatter', shard_axes, n, params * 2, accum_steps)
    add('all-gather', shard_axes, n, params * 4, 1)
  else:
    add('all-reduce', shard_axes, n, params * 2, accum_steps)
  kv = micro_batch_per_shard * seq_len * max(1, c.num_kv_heads // t) * c.head_dim * 2 * 2
  add('all-gather', ['sequence'], s, kv, (2 if remat else 1) * layers * accum_steps)
  add('reduce-scatter', ['sequence'], s, kv, layers * accum_steps)
  return rows
