r"""`python -m k2jax.estimate --config=configs/<stage>.py[:args] [--devices=N] [--mesh=data:8,tensor:8]`

Plans a run without running it: parameter count, FLOPs per token, tokens per step, then the
exact train step that k2jax.train jits (forward, backward, AdamW update; same shardings and
donation) is lowered and compiled ahead of time from abstract arguments, so the 70B state is
never allocated, and XLA's per-device memory figures are reported beside an analytic count
of parameter + optimizer bytes per device.

To plan a mesh larger than the machine, `--devices=N` simulates N CPU devices (it sets
XLA_FLAGS and JAX_PLATFORMS=cpu before JAX is imported, which is why JAX is imported late).
Memory figures compiled for CPU follow CPU fusion choices: treat them as an estimate of the
GPU's, not a measurement. The data axis splits the batch: with data 8 x tensor 8, a global
batch of 8 is one sequence per data shard, shared by its 8 tensor devices. The report also
lists the bytes each device sends per step in each collective and the mesh axes it runs over,
read from the compiled program (k2jax/parallel/collectives.py).

The planner: for a K2-V2 stage config without --devices / --mesh (or with --gpus, --stages,
--dry_run), the stage is planned on its own cluster (k2jax/planner.py): compiled on a reduced
data axis with the same shapes per device, then a roofline of the step on H200s
(k2jax/roofline.py): memory and whether it fits, step time, tokens/s per GPU, MFU.
Assumptions and their sources: docs/performance.md.

Examples:
  python -m k2jax.estimate --config=configs/pretrain.py                 # K2-V2's 3,200 GPUs
  python -m k2jax.estimate --config=configs/pretrain.py --stages [--dry_run]
  python -m k2jax.estimate --config=configs/pretrain.py --devices=64 \
      --mesh=data:8,tensor:8,sequence:1 --config.data.global_batch_size=8
  python -m k2jax.estimate --config=configs/pretrain.py:debug --devices=8 --output=json
"""

import json
import math
import os
import sys
import time

from absl import flags
from ml_collections import config_flags

from k2jax import errors, planner, roofline, run_config
from k2jax.parallel import collectives

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


class PlanError(ValueError):
  """A config or mesh that cannot work, found before compiling (reported in one line)."""


def _define_flags(argv) -> flags.FlagValues:
  """A private FlagValues, so this tool can live in one process with k2jax.train's flags
  (both define --config) and be called more than once (tests)."""
  values = flags.FlagValues()
  # sys_argv: the config override flags are declared from this argv, not from sys.argv.
  config_flags.DEFINE_config_file(
    'config', None, 'Stage config file[:args].', flag_values=values, sys_argv=list(argv)
  )
  flags.DEFINE_string(
    'mesh',
    None,
    'Mesh axis sizes, e.g. data:8,tensor:8,sequence:1; axes not '
    "named keep the config's mesh.* value.",
    flag_values=values,
  )
  flags.DEFINE_integer(
    'devices',
    None,
    'Simulate this many CPU devices (sets XLA_FLAGS and JAX_PLATFORMS=cpu before JAX starts).',
    lower_bound=1,
    flag_values=values,
  )
  flags.DEFINE_enum(
    'output',
    'text',
    ['text', 'json'],
    'text: a readable report; json: one JSON object on stdout.',
    flag_values=values,
  )
  # The planner (k2jax/planner.py, k2jax/roofline.py; docs/performance.md).
  flags.DEFINE_integer(
    'gpus',
    None,
    "Plan the step on this many H200s (default: K2-V2's count for a stage config); the mesh "
    'is compiled on a reduced data axis with the same shapes per device.',
    lower_bound=1,
    flag_values=values,
  )
  flags.DEFINE_bool('stages', False, 'One row per K2-V2 stage on its own mesh.', flag_values=values)
  flags.DEFINE_bool(
    'dry_run', False, 'Closed forms only, nothing compiled (seconds).', flag_values=values
  )
  hw = roofline.Hardware()
  flags.DEFINE_float(
    'sustained_tflops', hw.sustained_tflops, 'Sustained TFLOP/s per GPU.', flag_values=values
  )
  flags.DEFINE_float(
    'peak_tflops', hw.peak_tflops, 'Peak (MFU) TFLOP/s per GPU.', flag_values=values
  )
  flags.DEFINE_float('nvlink_gbps', hw.nvlink_gbps, 'NVLink bus GB/s per GPU.', flag_values=values)
  flags.DEFINE_float(
    'ib_gbps', hw.ib_gbps, 'InfiniBand GB/s per GPU (one NIC).', flag_values=values
  )
  flags.DEFINE_enum(
    'overlap',
    'cross_node',
    list(roofline.OVERLAP),
    'Which collectives overlap compute: cross_node (InfiniBand ones), all, none.',
    flag_values=values,
  )
  return values


def _plan_stages(values, cfg, spec: str):
  """The planner's reports: one stage (--gpus or a K2-V2 stage config) or all (--stages)."""
  hw = roofline.Hardware(
    peak_tflops=values.peak_tflops,
    sustained_tflops=values.sustained_tflops,
    nvlink_gbps=values.nvlink_gbps,
    ib_gbps=values.ib_gbps,
  )
  if values.stages and values.gpus:
    raise ValueError('--gpus plans one stage; --stages plans each on its K2-V2 GPU count')
  specs = list(planner.STAGE_SPECS) if values.stages else [(planner.stage_of(spec) or spec, None)]
  if not values.dry_run:
    simulate_devices(values.devices or planner.COMPILE_DEVICES)
  results = []
  for stage, stage_spec in specs:
    stage_cfg = (
      cfg if stage_spec is None else run_config.load(os.path.join(planner.REPO, stage_spec))
    )
    gpus = values.gpus or planner.K2V2_GPUS.get(stage)
    if gpus is None:
      raise ValueError(f'--gpus is needed: {spec} is not a K2-V2 stage config')
    results.append((stage, planner.at_scale(
      stage_cfg, gpus, hw=hw, overlap=values.overlap, dry_run=values.dry_run, plan_fn=plan,
      devices=values.devices or planner.COMPILE_DEVICES,
    )))  # fmt: skip
  return hw, results


def simulate_devices(count: int):
  """Makes JAX start with `count` CPU devices; only possible before JAX is imported."""
  if 'jax' in sys.modules:  # too late to change the backend: accept only a matching count
    import jax

    if jax.device_count() != count:
      raise ValueError(
        f'--devices={count}: JAX was already started with '
        f'{jax.device_count()} devices in this process'
      )
    return
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(DEVICE_COUNT_FLAG)]
  os.environ['XLA_FLAGS'] = ' '.join(kept + [f'{DEVICE_COUNT_FLAG}={count}'])
  os.environ['JAX_PLATFORMS'] = 'cpu'


def _shard_bytes(abstract, shardings) -> int:
  """Bytes one device holds of a tree of arrays, from each array's sharding. Every device
  holds an equal shard here (all dims divide their axes), so device 0 stands for all."""
  import jax

  leaves = jax.tree.leaves(abstract)
  shards = jax.tree.leaves(shardings)
  assert len(leaves) == len(shards), (len(leaves), len(shards))
  return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(leaves, shards))


def _cost_flops(compiled):
  """XLA's FLOP count for one device, or None where the backend does not give one."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # NotImplementedError or a backend error: the figure is optional
    return None
  if isinstance(cost, (list, tuple)):  # older JAX returned one dict per program
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def _flash_stand_in(cfg) -> str | None:
  """On CPU, compiles `blockwise` where a GPU would run a flash kernel; returns what it stands for.

  The Pallas kernel would compile interpreted and cuDNN not at all on a CPU; `blockwise` has
  the same linear memory in length, so the compiled step's memory is the GPU step's.
  """
  import jax

  if jax.devices()[0].platform != 'cpu' or cfg.model.attention not in ('auto', 'pallas', 'cudnn'):
    return None
  asked = cfg.model.attention
  cfg.model.attention = 'blockwise'
  return 'the flash kernel (cudnn or pallas)' if asked == 'auto' else asked


def _dtype_stand_in(cfg) -> str | None:
  """On CPU, compiles a bfloat16 model as float16: same sizes, without XLA:CPU's upcasts.

  XLA:CPU's float normalization rewrites every bf16 dynamic-update-slice to f32, so the scan
  that stacks each layer's input for the backward pass would hold an f32 copy of that stack
  (20 GiB at stage 3). XLA:GPU keeps bf16 for data-movement ops (gpu_float_support.cc), and
  XLA:CPU keeps float16 as it is, so float16 gives the GPU step's buffers.
  """
  import jax

  if jax.devices()[0].platform != 'cpu' or cfg.model.dtype != 'bfloat16':
    return None
  cfg.model.dtype = 'float16'
  return 'bfloat16'


def _dtype_lines(result: dict) -> list[str]:
  if not result.get('compute_dtype_stands_in_for'):
    return []
  return [
    f'compute dtype {result["compute_dtype"]}: on this CPU it stands in for '
    f'{result["compute_dtype_stands_in_for"]} (same sizes; XLA:CPU would upcast bf16 loop '
    'updates to f32, which a GPU does not)'
  ]


def _attention_line(attention: dict) -> str:
  line = f'attention {attention["backend"]}: {attention["reason"]}'
  if attention.get('stands_in_for'):
    line += (
      f'; on this CPU it stands in for {attention["stands_in_for"]} of a GPU run, with the same '
      'linear memory in length'
    )
  return line


def abstract_args(run, cfg):
  """(state, batch) of `run`'s (the train_step.Plan of `cfg`) train step as abstract arrays:
  shapes, dtypes and shardings, no buffers. The batch is the full global batch, as the data
  pipeline hands it to the step (micro-batches are split inside)."""
  import jax
  import numpy as np

  from k2jax.training import train_step

  state_args = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    run.abstract_state,
    run.state_sharding,
  )
  batch_args = {
    key: jax.ShapeDtypeStruct(
      (cfg.data.global_batch_size, cfg.data.seq_len),
      np.float32 if key == 'loss_mask' else np.int32,
      sharding=run.batch_sharding,
    )
    for key in train_step.BATCH_KEYS
  }
  return state_args, batch_args


def compile_train_step(run, cfg):
  """`run`'s train step compiled ahead of time from `abstract_args`; returns (compiled,
  seconds to lower, seconds to compile)."""
  from k2jax.parallel import sharding

  with sharding.activate(run.mesh, cfg.mesh.fsdp):
    step_fn = run.jit_train_step()
    start = time.perf_counter()
    lowered = step_fn.trace(*abstract_args(run, cfg)).lower()
    lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
  return compiled, lower_seconds, time.perf_counter() - start


def plan(cfg, devices=None) -> dict:
  """Everything the report prints, as a JSON-ready dict. Raises PlanError, before compiling,
  for a config or mesh that cannot work."""
  from k2jax.parallel import sharding
  from k2jax.training import train_step

  # Mesh, shardings and optimizer exactly as train.py builds them. Their checks raise
  # ValueError; only those become one-line errors (a failure while compiling is a bug: traceback).
  try:
    run_config.validate(cfg)
    stand_in = _flash_stand_in(cfg)
    dtype_stand_in = _dtype_stand_in(cfg)
    run = train_step.plan(cfg, devices)
  except ValueError as error:
    raise PlanError(str(error)) from error
  global_batch, seq_len = cfg.data.global_batch_size, cfg.data.seq_len
  mesh, model_cfg, fsdp = run.mesh, run.model_cfg, cfg.mesh.fsdp
  abstract_state, state_sharding, batch_sharding = (
    run.abstract_state,
    run.state_sharding,
    run.batch_sharding,
  )
  tokens_per_step = global_batch * seq_len
  flops_per_token = model_cfg.flops_per_token(seq_len)

  compiled, lower_seconds, compile_seconds = compile_train_step(run, cfg)
  batch_args = abstract_args(run, cfg)[1]

  stats = compiled.memory_analysis()
  memory = None
  if stats is not None:
    memory = {
      'argument': int(stats.argument_size_in_bytes),  # params + opt state + batch
      'output': int(stats.output_size_in_bytes),
      'alias': int(stats.alias_size_in_bytes),  # outputs written into donated arguments
      'temp': int(stats.temp_size_in_bytes),  # activations, gradients, workspace
      'generated_code': int(stats.generated_code_size_in_bytes),
    }
    # Donated outputs reuse their argument's buffer, so they are counted once.
    memory['total'] = (
      memory['argument']
      + memory['output']
      - memory['alias']
      + memory['temp']
      + memory['generated_code']
    )
    # XLA's own peak where the backend computes one (the CPU's counts only the arguments).
    memory['peak'] = int(getattr(stats, 'peak_memory_in_bytes', 0) or 0)

  devices = mesh.devices.flatten()
  params_bytes = _shard_bytes(abstract_state.params, state_sharding.params)
  opt_bytes = _shard_bytes(abstract_state.opt_state, state_sharding.opt_state)
  step_bytes = _shard_bytes(abstract_state.step, state_sharding.step)
  batch_bytes = _shard_bytes(batch_args, {key: batch_sharding for key in batch_args})
  return {
    'preset': cfg.model.preset,
    'param_count': model_cfg.param_count(),
    'param_count_non_embedding': model_cfg.param_count(include_embeddings=False),
    'seq_len': seq_len,
    'global_batch_size': global_batch,
    'grad_accum_steps': run.accum_steps,
    'tokens_per_step': tokens_per_step,
    'flops_per_token': flops_per_token,
    'flops_per_step': flops_per_token * tokens_per_step,
    'mesh': dict(mesh.shape),
    'fsdp': sharding.fsdp_mode(fsdp),  # none | optimizer | full
    'attention': {
      'backend': run.attention.name,
      'reason': run.attention.reason,
      'stands_in_for': stand_in,
    },
    'compute_dtype': cfg.model.dtype,
    'compute_dtype_stands_in_for': dtype_stand_in,
    'num_devices': len(devices),
    'platform': devices[0].platform,
    'device_kind': devices[0].device_kind,
    # Analytic bytes per device, from each array's shape, dtype and sharding.
    'state_bytes_per_device': {
      'params': params_bytes,
      'opt_state': opt_bytes,
      'step': step_bytes,
      'total': params_bytes + opt_bytes + step_bytes,
    },
    'batch_bytes_per_device': batch_bytes,
    'lower_seconds': lower_seconds,
    'compile_seconds': compile_seconds,
    'memory_per_device': memory,  # XLA's figures for the compiled step, per device
    'cost_analysis_flops_per_device': _cost_flops(compiled),
    # Bytes each device sends per step, per collective kind and mesh axes (parallel/collectives.py).
    'collectives': collectives.summarize(compiled.as_text(), dict(mesh.shape)),
  }


def _size(n: float) -> str:
  """Bytes in binary units, right-aligned so a column of them lines up."""
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= scale:
      return f'{n / scale:9.2f} {unit}'
  return f'{n:9.0f} B  '


def _flops(n: float) -> str:
  for unit, scale in (('PFLOP', 1e15), ('TFLOP', 1e12), ('GFLOP', 1e9), ('MFLOP', 1e6)):
    if n >= scale:
      return f'{n / scale:,.1f} {unit}'
  return f'{n:,.0f} FLOP'


def format_report(spec: str, result: dict) -> str:
  mesh = ' × '.join(f'{axis} {size}' for axis, size in result['mesh'].items())
  state = result['state_bytes_per_device']
  model_flops_per_device = result['flops_per_step'] / result['num_devices']
  lines = [
    f'k2jax estimate for {spec}',
    f'model {result["preset"]}: {result["param_count"]:,} parameters '
    f'({result["param_count_non_embedding"]:,} without embeddings)',
    f'training FLOPs per token at seq_len {result["seq_len"]}: '
    f'{_flops(result["flops_per_token"])} (6N + causal attention)',
    f'tokens per step: {result["tokens_per_step"]:,} ({result["global_batch_size"]} x '
    f'{result["seq_len"]}, {result["grad_accum_steps"]} micro-batch(es)); '
    f'{_flops(result["flops_per_step"])} per step, {_flops(model_flops_per_device)} per device',
    f'mesh {mesh}{"" if result["fsdp"] == "none" else " (fsdp " + result["fsdp"] + ")"} on '
    f'{result["num_devices"]} '
    f'{result["platform"]} devices',
    _attention_line(result['attention']),
    *_dtype_lines(result),
    '',
    'per device, analytic (shapes x dtypes / shardings):',
    f'  parameters          {_size(state["params"])}',
    f'  optimizer state     {_size(state["opt_state"])}',
    f'  params + optimizer  {_size(state["total"])}',
    f'  batch               {_size(result["batch_bytes_per_device"])}',
  ]
  memory = result['memory_per_device']
  if memory is None:
    lines.append('per device, compiled: memory_analysis() is not available on this backend')
  else:
    lines += [
      'per device, compiled (XLA memory_analysis):',
      f'  arguments           {_size(memory["argument"])}  (params + optimizer + batch)',
      f'  outputs             {_size(memory["output"])}',
      f'  aliased (donated)   {_size(memory["alias"])}  (outputs reusing argument buffers)',
      f'  temporaries         {_size(memory["temp"])}  (activations, gradients, workspace)',
      f'  generated code      {_size(memory["generated_code"])}',
      f'  total               {_size(memory["total"])}  (arguments + outputs - aliased + '
      'temporaries + code)',
    ]
    if memory['peak'] and result['platform'] != 'cpu':  # CPU's figure counts arguments only
      lines.append(f'  XLA peak            {_size(memory["peak"])}')
  flops = result['cost_analysis_flops_per_device']
  lines += [
    f'lower {result["lower_seconds"]:.1f} s, compile {result["compile_seconds"]:.1f} s',
    'XLA cost_analysis per device: '
    + (
      'not available'
      if flops is None
      else f'{_flops(flops)} (it counts a loop body once, so the layer scan is under-counted; '
      'the model figure above is the one to use)'
    ),
  ]
  if result.get('collectives'):
    lines += _collective_lines(result['collectives'])
  if result['platform'] == 'cpu':
    lines.append(
      'note: compiled for CPU; the memory figures follow CPU fusion and layout '
      'choices and approximate, not measure, what a GPU would use.'
    )
  return '\n'.join(lines)


def _collective_lines(summary: dict) -> list[str]:
  """The compiled program's collectives, as compiled, and as XLA:GPU would send them."""
  lines = [
    'collectives per device per step, from the compiled program (bytes sent: module docstring of '
    'k2jax/parallel/collectives.py):',
    f'  {"kind":<19} {"axes":<20} {"n":>4} {"ops":>4} {"runs":>6} {"compiled":>12} '
    f'{"of it AR+slice":>14} {"of it f32<-bf16":>15} {"GPU":>12}',
  ]
  for row in summary['rows']:
    lines.append(
      f'  {row["kind"]:<19} {"+".join(row["axes"]) or "-":<20} {row["group_size"]:>4} '
      f'{row["ops"]:>4} {row["runs"]:>6} {_size(row["bytes"])} {_size(row["sliced_bytes"]):>14} '
      f'{_size(row["promoted_bytes"]):>15} {_size(row["gpu_bytes"])}'
    )
  lines += [
    f'  total {_size(summary["total_bytes"])} as compiled, {_size(summary["total_gpu_bytes"])} as '
    'XLA:GPU would send it',
    '  XLA:CPU compiles a partial->sharded reduction as all-reduce + dynamic-slice (AR+slice: a '
    'reduce-scatter on GPU, half the bytes) and runs bf16 collectives in f32 (f32<-bf16: half on '
    'GPU); the GPU column applies both.',
  ]
  for loop in summary['unknown_trip_loops']:
    if loop['holds_collectives']:
      lines.append(f'  warning: loop {loop["name"]} has no known trip count; counted once')
  return lines


def main(argv=None) -> dict:
  """Parses `argv`, prints the report; exits 2 with a one-line error for a bad config/mesh."""
  argv = list(sys.argv if argv is None else argv)
  if '--help' in argv or '-h' in argv:
    print(__doc__)
    print(_define_flags(argv[:1]).get_help())
    sys.exit(0)
  values = _define_flags(argv)
  rest = run_config.parse_flags(values, argv)
  if len(rest) > 1:
    errors.fail(f'unexpected arguments: {" ".join(rest[1:])}')
  cfg = values.config
  if cfg is None:
    errors.fail('--config=configs/<stage>.py[:args] is required')
  spec = run_config.config_spec_from_argv(argv)
  try:
    if values.mesh:
      for axis, size in run_config.parse_mesh(values.mesh).items():
        cfg.mesh[axis] = size
    planning = (
      values.stages
      or values.dry_run
      or values.gpus
      or (values.devices is None and not values.mesh and planner.stage_of(spec))
    )
    if planning:
      hw, results = _plan_stages(values, cfg, spec)
    else:
      if values.devices is not None:
        simulate_devices(values.devices)
      result = plan(cfg)
  except ValueError as error:  # --mesh, --devices, PlanError: say which, no traceback
    errors.fail(str(error))
  if planning:
    result = {stage: r for stage, r in results}
    if values.output == 'json':
      print(json.dumps({'config': spec, 'plans': result}, default=float))
    else:
      for stage, r in results:
        if 'compiled' in r:  # the step as compiled on the reduced mesh, then the plan at scale
          name = spec if len(results) == 1 else stage
          print(format_report(f'{name}, on the reduced mesh', r['compiled']), '\n')
        print(planner.format_plan(stage, r, hw), '\n')
      if values.stages:
        print(planner.format_stage_table(results, hw))
    return result
  if values.output == 'json':
    print(json.dumps({'config': spec, **result}))
  else:
    print(format_report(spec, result))
  return result


if __name__ == '__main__':
  main()
