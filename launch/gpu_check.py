"""The first hour on a GPU, in under 10 minutes: what one H200 does, next to what the planner says.

  python -m launch.gpu_check                 # on a machine with one NVIDIA GPU
  python -m launch.gpu_check --dry_run       # the same code on a CPU, tiny sizes (tests)

1. Attention backends (benchmarks/gpu_attention.py): pallas, cuDNN and dense XLA on K2-V2's
   per-device shapes: their TFLOP/s and how far their outputs and gradients differ.
2. The planner (`python -m k2jax.estimate --dry_run --gpus=1`) for each model preset at 8K
   tokens, one sequence per step: the largest preset that fits one GPU's memory is trained.
3. A short training run of that preset (pre-training config, `model.attention=auto`, the demo
   corpus, the `h200` XLA flags of launch/gpu_flags.py): measured tokens/s, MFU and peak device
   memory, printed beside the planner's prediction for the same config. That is how the
   planner's sustained TFLOP/s gets calibrated.

Each phase has a time limit; a phase that fails is reported and the next one still runs. The
exit status is non-zero if any phase failed.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS_LARGEST_FIRST = ('k2v2_70b', '7b', '1b', 'debug')


def sizes(dry_run: bool) -> dict:
  """The shapes of each phase: the real check, or a CPU-sized rehearsal of the same code."""
  if dry_run:
    return dict(
      attention=['--allow_cpu', '--lengths=128', '--reps=1'],
      presets=('1b', 'debug'),  # 1b does not fit the tiny 'GPU' memory below: debug is chosen
      seq_len=128,
      batch=8,
      steps=4,
      memory_gb=0.5,
      attention_timeout=300,
      train_timeout=300,
    )
  return dict(
    attention=['--lengths=8192,65536', '--reps=5'],
    presets=PRESETS_LARGEST_FIRST,
    seq_len=8192,
    batch=1,
    steps=30,
    memory_gb=141 * 0.9,  # H200, less what XLA_PYTHON_CLIENT_MEM_FRACTION leaves to NCCL / CUDA
    attention_timeout=240,
    train_timeout=300,
  )


def overrides(preset: str, size: dict, dry_run: bool) -> list[str]:
  """The training run's config overrides, shared by the planner call and the run itself."""
  demo = os.path.join(REPO, 'data_pipeline', 'demo')
  flags = [
    f'--config.model.preset={preset}',
    '--config.model.attention=auto',
    '--config.mesh.data=1',
    '--config.mesh.tensor=1',
    '--config.mesh.sequence=1',
    f'--config.data.seq_len={size["seq_len"]}',
    f'--config.data.global_batch_size={size["batch"]}',
    '--config.data.mixture=',
    f'--config.data.train_files={os.path.join(demo, "train.jsonl")}',
    f'--config.data.tokenizer={os.path.join(demo, "tokenizer.model")}',
  ]
  if dry_run:  # CPU: fp32 compute and no remat are the debug stage's choices for speed
    flags += ['--config.model.dtype=float32', '--config.model.remat=none']
  return flags


def phase(title: str):
  print(f'\n=== {title}', flush=True)
  return time.perf_counter()


def run_attention(size: dict) -> bool:
  start = phase('attention backends: benchmarks/gpu_attention.py')
  command = [sys.executable, os.path.join(REPO, 'benchmarks', 'gpu_attention.py')]
  try:
    result = subprocess.run(
      command + size['attention'], timeout=size['attention_timeout'], cwd=REPO
    )
  except subprocess.TimeoutExpired:
    print(f'attention: stopped after {size["attention_timeout"]} s')
    return False
  print(f'attention: {time.perf_counter() - start:.0f} s, exit {result.returncode}')
  return result.returncode == 0


def plan(preset: str, size: dict, dry_run: bool) -> tuple[dict | None, str]:
  """The planner's dry-run prediction for one GPU: (its JSON plan or None, its text report)."""
  command = [
    sys.executable,
    '-m',
    'k2jax.estimate',
    '--config=configs/pretrain.py',
    '--gpus=1',
    '--dry_run',
    *overrides(preset, size, dry_run),
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu')  # the planner needs no GPU
  text = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  as_json = subprocess.run(
    command + ['--output=json'], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  try:
    plans = json.loads(as_json.stdout)['plans']
    (result,) = plans.values()
    result['roofline']['tokens_per_second_per_device']  # the fields this check reads
  except (ValueError, KeyError, TypeError):
    return None, (text.stdout + text.stderr).strip()
  return result, text.stdout.strip()


def choose_preset(size: dict, dry_run: bool) -> tuple[str, dict | None]:
  """The largest preset the planner says fits one GPU (the smallest one if it cannot say)."""
  start = phase(f'planner: the largest preset that fits one GPU at {size["seq_len"]} tokens')
  for preset in size['presets']:
    result, report = plan(preset, size, dry_run)
    if result is None:
      print(f'{preset}: the planner gave no roofline; its output:\n{report}')
      continue
    memory_gb = result['memory_bytes_per_device'] / 1e9
    fits = memory_gb <= size['memory_gb']
    print(f'{preset}: {memory_gb:.1f} GB per device planned, {"fits" if fits else "too large"}')
    if fits:
      print(report)
      print(f'planner: {time.perf_counter() - start:.0f} s')
      return preset, result
  return size['presets'][-1], None


def train(preset: str, size: dict, dry_run: bool) -> dict:
  """Trains `preset` for a few steps in this process; the last record and the peak memory."""
  start = phase(f'training {preset}: {size["batch"]} x {size["seq_len"]} tokens per step')
  if not dry_run:  # the GPU settings, before JAX starts in this process
    from launch import gpu_flags

    os.environ.update(
      gpu_flags.environment('h200', existing_xla_flags=os.environ.get('XLA_FLAGS', ''))
    )
  import jax

  from k2jax import run_config
  from k2jax.training import run

  cfg = run_config.load(os.path.join(REPO, 'configs', 'pretrain.py'))
  for flag in overrides(preset, size, dry_run) + [
    f'--config.total_steps={size["steps"]}',
    '--config.optim.warmup_steps=1',
    f'--config.log_every={max(1, size["steps"] // 3)}',
    '--config.eval_every=0',
    '--config.checkpoint.every=0',
    '--config.compile_cache_dir=off',
  ]:
    key, value = flag[len('--config.') :].split('=', 1)
    node = cfg
    *parents, leaf = key.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
  with tempfile.TemporaryDirectory() as workdir:
    records = run.train(cfg, workdir)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  measured = [r for r in records if 'tokens_per_sec' in r]
  last = measured[-1] if measured else {}
  print(f'training: {time.perf_counter() - start:.0f} s on {device.device_kind}')
  return dict(
    tokens_per_sec=last.get('tokens_per_sec'),
    mfu=last.get('mfu'),
    peak_bytes=stats.get('peak_bytes_in_use'),
    device=device.device_kind,
  )


def compare(preset: str, size: dict, measured: dict, predicted: dict | None) -> None:
  phase(f'{preset} at {size["batch"]} x {size["seq_len"]}: measured vs planned')

  def show(value, fmt):
    return 'n/a' if value is None else format(value, fmt)

  peak = measured['peak_bytes'] and measured['peak_bytes'] / 1e9
  print(
    f'measured  ({measured["device"]}): {show(measured["tokens_per_sec"], ",.0f")} tokens/s, '
    f'MFU {show(measured["mfu"] and 100 * measured["mfu"], ".1f")}%, '
    f'peak memory {show(peak, ".1f")} GB'
  )
  if predicted is None:
    print('planned: the planner gave no roofline for this config (see its output above)')
    return
  roof = predicted['roofline']
  print(
    f'planned   (H200 roofline): {roof["tokens_per_second_per_device"]:,.0f} tokens/s, '
    f'MFU {100 * roof["mfu"]:.1f}%, memory {predicted["memory_bytes_per_device"] / 1e9:.1f} GB '
    f'(dominant: {roof["dominant"]})'
  )
  if measured['tokens_per_sec']:
    ratio = measured['tokens_per_sec'] / roof['tokens_per_second_per_device']
    print(
      f'measured / planned tokens/s = {ratio:.2f}: scale `--sustained_tflops` of the planner by '
      'this to calibrate it'
    )


def parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dry_run', action='store_true', help='tiny sizes on a CPU (tests)')
  parser.add_argument('--skip_attention', action='store_true')
  return parser


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  if args.dry_run:  # one CPU device stands in for the one GPU
    kept = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
    os.environ['XLA_FLAGS'] = ' '.join([*kept, '--xla_force_host_platform_device_count=1'])
    os.environ['JAX_PLATFORMS'] = 'cpu'
  size = sizes(args.dry_run)
  start = time.perf_counter()
  ok = args.skip_attention or run_attention(size)
  preset, predicted = choose_preset(size, args.dry_run)
  measured = train(preset, size, args.dry_run)
  compare(preset, size, measured, predicted)
  print(f'\ngpu_check: {time.perf_counter() - start:.0f} s in all')
  return 0 if ok and predicted is not None and measured['tokens_per_sec'] else 1


if __name__ == '__main__':
  sys.exit(main())
