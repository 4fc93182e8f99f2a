"""The step planner behind `python -m k2jax.estimate`: a stage on its real cluster.

K2-V2's meshes (3,200 or 1,600 GPUs) are larger than any machine that compiles here, so
`at_scale` compiles the same step on a reduced data axis with the same per-device shapes:
the same rows per data shard, and, with `mesh.fsdp_group` G, the same group (the compiled
mesh is replica 2 x data G, so each device holds exactly the state it holds at full size).
The collective rows are then re-priced for the real group sizes (collectives.rescale): the
bytes moved by a collective depend on its group size only through (n - 1) / n once the
per-device shapes agree. Without a group (fsdp_group 0) the data axis itself is smaller and
the state and gradient bytes are corrected by their closed forms; the report says which.

`dry_run=True` compiles nothing: FLOPs, state bytes and collective bytes come from closed
forms (roofline.closed_form_comm), activations from the saved remat inputs only (a lower
bound). It is what the tests and a laptop use.

JAX (and modules importing it) is imported inside the functions: `estimate` must be able to
choose the number of simulated devices before JAX starts.
"""

import math
import os

from k2jax import roofline
from k2jax.parallel import collectives

# K2-V2's GPUs per stage (docs/recipe.md; configs/midtrain.py STAGES). SFT's count is not in
# the released scripts [?]: 128 nodes, the largest data axis dividing its batch of 1024 at tensor 8.
K2V2_GPUS = {
  'pretrain': 3200,
  'stage1': 3200,
  'stage2': 1600,
  'stage3': 1600,
  'stage4': 1600,
  'sft': 1024,
}
STAGE_SPECS = (
  ('pretrain', 'configs/pretrain.py'),
  ('stage1', 'configs/midtrain.py:stage1'),
  ('stage2', 'configs/midtrain.py:stage2'),
  ('stage3', 'configs/midtrain.py:stage3'),
  ('stage4', 'configs/midtrain.py:stage4'),
  ('sft', 'configs/sft.py'),
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_DEVICES = 128  # simulated devices the reduced meshes are compiled on


def stage_of(spec: str) -> str | None:
  """'configs/midtrain.py:stage3' -> 'stage3'; None for a config that is not a K2-V2 stage."""
  for stage, known in STAGE_SPECS:
    if spec.split('/')[-1] == known.split('/')[-1]:
      return stage
  return None


def _mode(value) -> str:
  from k2jax.parallel import mesh

  return mesh.fsdp_mode(value)


def real_mesh(cfg, gpus: int) -> dict:
  """Axis sizes of the stage's mesh on `gpus` devices, with `replica` for a hybrid group."""
  t, s = cfg.mesh.tensor, cfg.mesh.sequence
  data = cfg.mesh.data if cfg.mesh.data > 0 else gpus // (t * s)
  if data * t * s != gpus:
    raise ValueError(f'mesh data {data} x tensor {t} x sequence {s} does not make {gpus} GPUs')
  from k2jax.parallel import mesh  # imports JAX

  group = mesh.fsdp_group(cfg.mesh, data) if _mode(cfg.mesh.get('fsdp', False)) != 'none' else data
  shape = {'data': group, 'tensor': t, 'sequence': s}
  return {'replica': data // group, **shape} if group < data else shape


def compile_mesh(real: dict, devices: int) -> tuple[int, int]:
  """(data axis to compile, fsdp_group to compile) with the real per-device shapes."""
  t, s, group = real['tensor'], real['sequence'], real['data']
  if 'replica' in real:  # keep the group; two of them, so the replica collectives show
    data = 2 * group
  else:
    data = max(1, min(group, devices // (t * s)))
    group = data
  if data * t * s > devices:
    raise ValueError(f'the reduced mesh needs {data * t * s} devices, more than {devices}')
  return data, group


def state_bytes(model_cfg, fsdp: str, mesh_shape: dict) -> dict:
  """Closed-form bytes per device of fp32 weights, Adam's moments and the fp32 gradient:
  matrices split over tensor, and over the fsdp group x sequence where the mode shards them
  (the gradient too under `optimizer`: the compiled step reduce-scatters it layer by layer)."""
  c = model_cfg
  norms = c.num_layers * 2 * c.hidden_size + c.hidden_size
  matrices = c.param_count() - norms
  t = mesh_shape.get('tensor', 1)
  group = mesh_shape.get('data', 1) * mesh_shape.get('sequence', 1)
  weights = 4 * (math.ceil(matrices / (t * (group if fsdp == 'full' else 1))) + norms)
  moments = 8 * (math.ceil(matrices / (t * (group if fsdp != 'none' else 1))) + norms)
  grads = 4 * (math.ceil(matrices / (t * (group if fsdp != 'none' else 1))) + norms)
  return {'params': weights, 'opt_state': moments, 'grads': grads}


def saved_activation_bytes(model_cfg, rows_per_shard: int, seq_len: int, mesh_shape: dict):
  """The remat's saved block inputs, bf16, split over sequence x tensor (sequence parallel)."""
  split = mesh_shape.get('sequence', 1) * mesh_shape.get('tensor', 1)
  return model_cfg.num_layers * rows_per_shard * seq_len // split * model_cfg.hidden_size * 2


def roofline_for(result: dict, model_cfg, cfg, real: dict, gpus: int, hw, overlap: str) -> dict:
  """Adds the roofline at the real mesh to a plan `result` (compiled or dry-run)."""
  tokens = cfg.data.global_batch_size * cfg.data.seq_len
  model_flops = model_cfg.flops_per_token(cfg.data.seq_len) * tokens
  recompute = roofline.recompute_flops_per_token(model_cfg, cfg.data.seq_len) * tokens
  return roofline.step(
    model_flops=model_flops,
    hardware_flops=model_flops + recompute,
    tokens=tokens,
    devices=gpus,
    comm_rows=result['comm_rows'],
    mesh_shape=real,
    hw=hw,
    overlap=overlap,
  ) | {'recompute_flops_per_step': recompute}


def at_scale(
  cfg, gpus: int, *, hw, overlap: str, dry_run: bool, plan_fn=None, devices=COMPILE_DEVICES
):
  """A stage on `gpus` GPUs: compiled by `plan_fn` on a reduced mesh of at most `devices`
  simulated devices, or in closed form."""
  from k2jax.model import config as model_config

  fsdp = _mode(cfg.mesh.get('fsdp', False))
  real = real_mesh(cfg, gpus)
  data_real = gpus // (cfg.mesh.tensor * cfg.mesh.sequence)
  batch, accum = cfg.data.global_batch_size, cfg.optim.grad_accum_steps
  if batch % data_real or (batch // data_real) % accum:
    raise ValueError(
      f'data.global_batch_size={batch} does not divide over {data_real} data shards x '
      f'optim.grad_accum_steps={accum}'
    )
  model_cfg = model_config.from_config(cfg.model)
  state = state_bytes(model_cfg, fsdp, real)
  notes = []
  embed_split = real['data'] * real['sequence']
  if fsdp != 'none' and model_cfg.hidden_size % embed_split:
    notes.append(
      f'embed {model_cfg.hidden_size} does not divide over the fsdp group x sequence '
      f'({embed_split}): the run would refuse this mesh; set mesh.fsdp_group'
    )
  if dry_run:
    result = _closed_forms(cfg, model_cfg, fsdp, real, batch // data_real, state)
  else:
    result = _compiled(cfg, model_cfg, fsdp, real, batch // data_real, state, plan_fn, devices)
  result.update(
    gpus=gpus,
    mesh=real,
    fsdp=fsdp,
    tokens_per_step=batch * cfg.data.seq_len,
    state_bytes_per_device=state,
    fits=result['memory_bytes_per_device'] <= hw.memory_gb * 1e9,
    notes=notes + result.pop('notes', []),
  )
  result['roofline'] = roofline_for(result, model_cfg, cfg, real, gpus, hw, overlap)
  return result


def _closed_forms(cfg, model_cfg, fsdp, real, rows_per_shard, state) -> dict:
  accum, seq_len = cfg.optim.grad_accum_steps, cfg.data.seq_len
  comm_rows = roofline.closed_form_comm(
    model_cfg,
    mesh_shape=real,
    fsdp=fsdp,
    micro_batch_per_shard=rows_per_shard // accum,
    accum_steps=accum,
    seq_len=seq_len,
  )
  saved = saved_activation_bytes(model_cfg, rows_per_shard // accum, seq_len, real)
  return {
    'mode': 'dry-run (closed forms; memory = state + gradients + saved block inputs, a '
    'lower bound)',
    'memory_bytes_per_device': sum(state.values()) + saved,
    'comm_rows': comm_rows,
    'param_count': model_cfg.param_count(),
  }


def _compiled(cfg, model_cfg, fsdp, real, rows_per_shard, state, plan_fn, devices) -> dict:
  import jax

  data, group = compile_mesh(real, devices)
  compiled_cfg = cfg.copy_and_resolve_references()
  compiled_cfg.mesh.data = data
  if fsdp != 'none':
    compiled_cfg.mesh.fsdp_group = group
  compiled_cfg.data.global_batch_size = rows_per_shard * data
  count = data * real['tensor'] * real['sequence']  # the first devices, if more are simulated
  compiled = plan_fn(compiled_cfg, jax.devices()[:count])
  shape = compiled['mesh']
  rows = [
    {**r, 'bytes': collectives.rescale(r, shape, real)} for r in compiled['collectives']['rows']
  ]
  memory = compiled['memory_per_device']['total']
  notes = []
  if any(shape.get(a) != n for a, n in real.items() if a != 'replica'):
    # A smaller data axis holds more state per device: corrected by the closed forms.
    memory += sum(state.values()) - sum(state_bytes(model_cfg, fsdp, shape).values())
    notes.append('state and gradient bytes corrected from the reduced data axis by closed forms')
  return {
    'mode': f'compiled on {compiled["num_devices"]} simulated devices, mesh '
    + ' x '.join(f'{a} {n}' for a, n in shape.items())
    + ' (the real mesh with fewer data shards, same shapes per device)',
    'memory_bytes_per_device': memory,
    'comm_rows': rows,
    'compiled': compiled,
    'param_count': compiled['param_count'],
    'notes': notes,
  }


def format_comm(rows: list[dict], real: dict, hw) -> list[str]:
  lines = [f'  {"kind":<19} {"axes":<20} {"n":>4} {"runs":>6} {"GB/device":>10} {"link":>7}']
  for row in sorted(rows, key=lambda r: -r['bytes']):
    if row['bytes'] <= 0:
      continue
    name, gbps = roofline.link(row['axes'], real, hw)
    lines.append(
      f'  {row["kind"]:<19} {"+".join(row["axes"]) or "-":<20} {row["group_size"]:>4} '
      f'{row["runs"]:>6} {row["bytes"] / 1e9:10.2f} {name:>7}'
    )
  return lines


def format_plan(stage: str, result: dict, hw) -> str:
  r = result['roofline']
  mesh = ' x '.join(f'{a} {n}' for a, n in result['mesh'].items())
  lines = [
    f'plan for {stage} on {result["gpus"]:,} H200s: mesh {mesh}, fsdp {result["fsdp"]}',
    f'  {result["mode"]}',
    f'  {result["param_count"]:,} parameters ({result["param_count"] / 1e9:.2f}B), '
    f'{result["tokens_per_step"]:,} tokens per '
    'step',
    f'  memory per device {result["memory_bytes_per_device"] / 1e9:.1f} GB of '
    f'{hw.memory_gb:.0f}: {"fits" if result["fits"] else "does NOT fit"}',
    '  collectives per device per step at this mesh (GPU bytes: reduce-scatters and bf16 where '
    'XLA:CPU compiled all-reduce + slice or f32):',
    *format_comm(result['comm_rows'], result['mesh'], hw),
    f'  roofline: compute {r["compute_seconds"]:.2f} s at {hw.sustained_tflops:.0f} TFLOP/s '
    f'sustained; NVLink {r["nvlink_seconds"]:.2f} s at {hw.nvlink_gbps:.0f} GB/s, InfiniBand '
    f'{r["ib_seconds"]:.2f} s at {hw.ib_gbps:.0f} GB/s; overlap {r["overlap"]}',
    f'  step {r["step_seconds"]:.2f} s, {r["tokens_per_second_per_device"]:,.0f} tokens/s per GPU, '
    f'MFU {100 * r["mfu"]:.1f}% of {hw.peak_tflops:.0f} TFLOP/s; dominant: {r["dominant"]}',
  ]
  lines += [f'  note: {note}' for note in result['notes']]
  return '\n'.join(lines)


def format_stage_table(results: list[tuple[str, dict]], hw) -> str:
  lines = [
    f'{"stage":<9} {"GPUs":>5} {"mesh (replica x data x tensor x seq)":>37} {"fsdp":>9} '
    f'{"params":>7} {"tokens/step":>12} {"GB/dev":>7} {"fits":>5} {"step s":>7} '
    f'{"tok/s/GPU":>9} {"MFU":>6} {"dominant":>16}'
  ]
  for stage, r in results:
    roof = r['roofline']
    mesh = ' x '.join(str(n) for n in r['mesh'].values())
    lines.append(
      f'{stage:<9} {r["gpus"]:>5} {mesh:>37} {r["fsdp"]:>9} {r["param_count"] / 1e9:6.2f}B '
      f'{r["tokens_per_step"]:>12,} {r["memory_bytes_per_device"] / 1e9:7.1f} '
      f'{"yes" if r["fits"] else "NO":>5} {roof["step_seconds"]:7.2f} '
      f'{roof["tokens_per_second_per_device"]:9,.0f} {100 * roof["mfu"]:5.1f}% '
      f'{roof["dominant"]:>16}'
    )
  return '\n'.join(lines)
