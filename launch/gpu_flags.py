"""GPU settings for H100 / H200 nodes, one process per node: XLA flags, memory, NCCL.

`python -m launch.gpu_flags h200` prints `export NAME='value'` lines for a shell to `eval`
(launch/run.sh does, for `K2JAX_GPU_PRESET=h200`); `--format=json` prints the mapping.

Written for the pinned jaxlib 0.10.2: XLA aborts at backend start on a flag it does not know
(`Unknown flag in XLA_FLAGS`), and several names in today's recipes are gone or not yet there
(`--xla_gpu_graph_level`, `--xla_gpu_pipeline_all_gather=on`, `--xla_gpu_enable_async_*`, ...).
tests/test_launch.py starts JAX with every flag shipped here and fails on any the jaxlib rejects;
the CPU jaxlib parses the `xla_gpu_*` flags too (one flag table for all backends). Change a flag
only with that test, and keep XLA_FLAGS identical on every host: they are part of the
compilation cache key and of what each process compiles.

Sources for each value: docs/multihost.md#gpu-flags (JAX-Toolbox, MaxText and GPU recipes for
Llama-3.1-70B on H200, and the K2-V2 run's own NCCL settings on Azure ND H200 v5).
"""

import argparse
import json
import shlex
import sys

# (flag, value, why). Every H100/H200 preset sets all of them: XLA's defaults move between
# versions, so the behaviour is stated, not inherited.
XLA_FLAGS = (
  (
    '--xla_gpu_enable_latency_hiding_scheduler',
    'true',
    'schedule async collectives to overlap compute: hides the FSDP all-gathers and '
    'reduce-scatters behind the layer matmuls (off by default)',
  ),
  (
    '--xla_gpu_enable_pipelined_all_gather',
    'true',
    "start the next layer's all-gather in the previous iteration of the scanned layer stack",
  ),
  (
    '--xla_gpu_enable_pipelined_reduce_scatter',
    'true',
    "finish a layer's gradient reduce-scatter during the next iteration of the backward scan",
  ),
  (
    '--xla_gpu_enable_pipelined_all_reduce',
    'true',
    'the same for all-reduces (tensor-parallel partial sums, replicated gradients)',
  ),
  (
    '--xla_gpu_enable_while_loop_double_buffering',
    'true',
    'unroll the layer scan by two so that the pipelined collectives have an iteration to '
    'overlap with',
  ),
  (
    '--xla_gpu_all_gather_combine_threshold_bytes',
    '2147483648',
    "combine all-gathers up to 2 GiB: one K2-V2 layer's bf16 weights are 1.71 GB, so a "
    "layer's weights arrive in one collective (70B on H200 recipes use 2 GiB)",
  ),
  (
    '--xla_gpu_all_reduce_combine_threshold_bytes',
    '2147483648',
    'combine all-reduces up to 2 GiB: fewer, larger NCCL calls',
  ),
  (
    '--xla_gpu_reduce_scatter_combine_threshold_bytes',
    '16777216',
    'combine reduce-scatters up to 16 MiB only: larger combined gradient buffers cost memory '
    'at the peak of the backward pass (the tested 70B H200 value)',
  ),
  (
    '--xla_gpu_enable_all_gather_combine_by_dim',
    'false',
    'combine all-gathers along different dimensions too: fewer, bigger collectives',
  ),
  (
    '--xla_gpu_enable_reduce_scatter_combine_by_dim',
    'false',
    'the same for reduce-scatters',
  ),
  (
    '--xla_gpu_enable_triton_gemm',
    'false',
    'matmuls through cuBLAS, as every H100/H200 recipe: less autotuning, stable speed',
  ),
  (
    '--xla_gpu_enable_command_buffer',
    '',
    'no CUDA graphs on Hopper (the old --xla_gpu_graph_level=0, which this jaxlib rejects); '
    'they also block automatic profile-guided latency estimates',
  ),
  (
    '--xla_disable_hlo_passes',
    'rematerialization',
    "no recompute XLA chooses by itself: memory follows the config's model.remat policy",
  ),
  (
    '--xla_gpu_enable_highest_priority_async_stream',
    'true',
    'collectives on the highest-priority stream, so compute kernels cannot starve them',
  ),
  (
    '--xla_gpu_use_memcpy_local_p2p',
    'true',
    'copy engines for transfers between the GPUs of one process (one process per node here)',
  ),
)

# H100 (80 GB): the same schedule with smaller combined all-gathers and all-reduces, whose
# buffers are a larger share of its memory.
_H100_OVERRIDES = {
  '--xla_gpu_all_gather_combine_threshold_bytes': (
    '1073741824',
    'combine all-gathers up to 1 GiB: an 80 GB H100 has less room for gathered weights',
  ),
  '--xla_gpu_all_reduce_combine_threshold_bytes': ('1073741824', 'as the all-gathers'),
}

# (name, value, why) of the process environment besides XLA_FLAGS.
ENVIRONMENT = (
  (
    'XLA_PYTHON_CLIENT_MEM_FRACTION',
    '0.90',
    "JAX preallocates this share of each GPU's memory; the rest is left to NCCL's buffers and "
    'CUDA libraries. Raise to 0.95 after a clean run if memory is short',
  ),
  (
    'CUDA_DEVICE_MAX_CONNECTIONS',
    '1',
    'one hardware queue, so kernels are issued in the order XLA scheduled them and '
    'collectives overlap as planned (Hopper; not for Blackwell)',
  ),
  (
    'NCCL_DEBUG',
    'WARN',
    'warnings and errors in the per-node logs; INFO (with NCCL_DEBUG_SUBSYS=INIT,NET) to '
    'debug a bring-up',
  ),
  (
    'NCCL_IB_TIMEOUT',
    '22',
    'InfiniBand retry timeout 4.096 us x 2^22 (~17 s): rides out a link flap instead of '
    "failing the job (K2-V2's mid-training setting)",
  ),
  (
    'JAX_REMOVE_CUSTOM_PARTITIONING_PTR_FROM_CACHE_KEY',
    'true',
    'keys of programs with custom-partitioned ops stable across processes, so a restart hits '
    'the persistent compilation cache',
  ),
)

PRESETS = ('h100', 'h200')

# NCCL settings of one kind of cluster, added with --fabric (K2JAX_FABRIC in launch/run.sh).
FABRICS = {
  # Azure ND H100 v5 / ND H200 v5 (InfiniBand NDR, 8 NICs): the K2-V2 run's own settings and
  # Azure's validated hopper.conf.
  'ndv5': (
    (
      'NCCL_TOPO_FILE',
      '/opt/microsoft/ndv5-topo.xml',
      'the VM topology: without it NCCL mis-pairs GPUs and NICs inside the VM',
    ),
    ('NCCL_IB_PCI_RELAXED_ORDERING', '1', 'needed for full InfiniBand bandwidth on these VMs'),
    ('NCCL_SOCKET_IFNAME', 'eth0', 'bootstrap over the front-end network'),
    ('NCCL_IB_QPS_PER_CONNECTION', '4', 'more queue pairs per connection spread the traffic'),
    ('NCCL_MIN_NCHANNELS', '32', 'enough channels to reach NVLink bandwidth in large collectives'),
    ('NCCL_PXN_DISABLE', '1', 'no NVLink hop before the NIC (one NIC per GPU here)'),
    ('NCCL_P2P_NET_CHUNKSIZE', '2097152', "Azure's validated chunk size for NDR"),
  ),
}


def xla_flags(preset: str) -> list[tuple[str, str, str]]:
  """(flag, value, why) of a preset."""
  if preset not in PRESETS:
    raise ValueError(f'unknown GPU preset {preset!r}; known: {", ".join(PRESETS)}')
  overrides = _H100_OVERRIDES if preset == 'h100' else {}
  return [(flag, *overrides.get(flag, (value, why))) for flag, value, why in XLA_FLAGS]


def xla_flags_string(preset: str) -> str:
  return ' '.join(f'{flag}={value}' for flag, value, _ in xla_flags(preset))


def settings(fabric: str = '') -> list[tuple[str, str, str]]:
  """(name, value, why) of the environment variables besides XLA_FLAGS."""
  if fabric and fabric not in FABRICS:
    raise ValueError(f'unknown fabric {fabric!r}; known: {", ".join(FABRICS)}')
  return [*ENVIRONMENT, *FABRICS.get(fabric, ())]


def environment(preset: str, fabric: str = '', existing_xla_flags: str = '') -> dict[str, str]:
  """Every variable the preset sets; XLA_FLAGS keeps flags already set (e.g. --xla_dump_to)."""
  flags = xla_flags_string(preset)
  env = {'XLA_FLAGS': f'{existing_xla_flags} {flags}'.strip()}
  env.update({name: value for name, value, _ in settings(fabric)})
  return env


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('preset', choices=PRESETS)
  parser.add_argument(
    '--fabric', default='', help=f'also the NCCL settings of: {", ".join(FABRICS)}'
  )
  parser.add_argument('--format', choices=('shell', 'json', 'explain'), default='shell')
  parser.add_argument(
    '--keep_xla_flags', default='', help='XLA flags already set, kept before the preset'
  )
  args = parser.parse_args(argv)
  try:
    env = environment(args.preset, args.fabric, args.keep_xla_flags)
  except ValueError as error:
    parser.error(str(error))
  if args.format == 'json':
    print(json.dumps(env, indent=2))
  elif args.format == 'explain':
    for flag, value, why in xla_flags(args.preset):
      print(f'{flag}={value}\n    {why}')
    for name, value, why in settings(args.fabric):
      print(f'{name}={value}\n    {why}')
  else:
    for name, value in env.items():
      print(f'export {name}={shlex.quote(value)}')


if __name__ == '__main__':
  sys.exit(main())
