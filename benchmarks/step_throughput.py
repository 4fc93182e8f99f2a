"""Training-step throughput on CPU: k2jax vs HF transformers Llama, same shapes, fp32.

`python benchmarks/step_throughput.py [--steps=N --batch=B --seq_len=L --threads=T]`

One full training step (forward, backward, clip, AdamW update) of a small K2-shaped decoder,
timed in k2jax (the library's jitted train step, as k2jax/training/run.py builds it) and in HF
`LlamaForCausalLM` + `torch.optim.AdamW`. Each framework runs in its own subprocess, one after
the other, with the same thread count, so neither competes for cores or allocator. The
parent prints a table of medians over repetitions and the ratio k2jax / HF.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# K2-V2's proportions (FFN 3.5x hidden, GQA, untied head) scaled down: 28.8M parameters, the
# smallest with hidden 512, at least 6 layers and a vocab of at least 8192 (20.5M body + 8.4M
# embedding and head).
SHAPE = dict(
  vocab_size=8192,
  hidden_size=512,
  ffn_size=1792,
  num_layers=6,
  num_heads=8,
  num_kv_heads=2,
  head_dim=64,
)
ROPE_BASE = 5e5
NORM_EPS = 1e-5
# Optimizer hyperparameters shared by both sides (configs/base.py's, at a constant lr).
LR, B1, B2, EPS, WEIGHT_DECAY, CLIP = 3e-4, 0.9, 0.95, 1e-8, 0.05, 1.0
# torch.optim.AdamW's implementations; clip + update of these parameters on 2 threads took
# 42 ms fused, 107 ms for-loop, 134 ms foreach, so the baseline gets the fused one.
ADAMW_MODES = {
  'fused': dict(fused=True),
  'forloop': dict(foreach=False),
  'foreach': dict(foreach=True),
}


def make_tokens(args):
  """Random inputs / next-token targets, identical in both workers."""
  import numpy as np

  rng = np.random.default_rng(args.seed)
  ids = rng.integers(0, SHAPE['vocab_size'], (args.batch, args.seq_len + 1), dtype=np.int32)
  return ids[:, :-1], ids[:, 1:]


def eigen_pool_threads() -> int:
  """Threads in XLA's intra-op pool ("tf_XLAEigen"), counted from /proc to prove the setting."""
  count = 0
  for tid in os.listdir('/proc/self/task'):
    try:
      with open(f'/proc/self/task/{tid}/comm') as f:
        count += 'XLAEigen' in f.read()
    except OSError:
      pass
  return count


def busy_cpu_seconds() -> float:
  """CPU seconds every process on the machine has used (from /proc/stat)."""
  with open('/proc/stat') as f:
    fields = [int(x) for x in f.readline().split()[1:]]
  user, nice, system, _, _, irq, softirq, steal = fields[:8]
  return (user + nice + system + irq + softirq + steal) / os.sysconf('SC_CLK_TCK')


def time_steps(run_steps, args) -> dict:
  """Seconds per step of `reps` repetitions of `steps` steps, and how busy the CPU was.

  `own_cpu` is this process's CPU time over wall time x threads (about 1 when its threads
  ran undisturbed); `other_cores` is how many cores other processes kept busy meanwhile. A
  shared machine distorts the comparison: a descheduled OpenMP thread stalls torch's
  parallel regions far more than XLA's task pool, so report numbers only when it is ~0.
  """
  per_step = []
  wall, own, busy = time.perf_counter(), sum(os.times()[:2]), busy_cpu_seconds()
  for _ in range(args.reps):
    start = time.perf_counter()
    run_steps(args.steps)
    per_step.append((time.perf_counter() - start) / args.steps)
  wall, own = time.perf_counter() - wall, sum(os.times()[:2]) - own
  return dict(
    median_s=statistics.median(per_step),
    all_s=per_step,
    own_cpu=own / (wall * args.threads),
    other_cores=max(0.0, busy_cpu_seconds() - busy - own) / wall,
  )


def block_step_flops(model_cfg, args) -> float:
  """XLA's FLOP count of one layer's forward + backward.

  HloCostAnalysis counts a while loop's body once, not once per trip, so the step's count
  holds the nn.scan layer body once; this measures that body to scale it to all layers.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from k2jax.model.transformer import Block

  block = Block(model_cfg)
  shape = (args.batch, args.seq_len)
  x = jnp.zeros((*shape, model_cfg.hidden_size), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(args.seq_len), shape)
  segments = jnp.ones(shape, jnp.int32)
  params = nn.unbox(block.init(jax.random.key(0), x, positions, segments)['params'])

  def loss(params, x):
    return jnp.sum(block.apply({'params': params}, x, positions, segments)[0])

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return float(grad.lower(params, x).compile().cost_analysis().get('flops', 0.0))


def run_k2jax(args) -> dict:
  import jax
  import jax.numpy as jnp
  import ml_collections

  from configs import base
  from k2jax.model.config import ModelConfig
  from k2jax.model.kernels import select
  from k2jax.model.transformer import Transformer
  from k2jax.parallel import sharding
  from k2jax.training import optim, train_step

  model_cfg = ModelConfig(
    **SHAPE,
    rope_base=ROPE_BASE,
    norm_eps=NORM_EPS,
    dtype='float32',
    param_dtype='float32',
    remat='none',
    attention='auto',  # the trainer's default; on CPU at these lengths: `xla`
  )
  attention = select.choose(
    'auto',
    select.Platform.current(),
    q_length=args.seq_len,
    kv_length=args.seq_len,
    compute_dtype=model_cfg.dtype,
    head_dim=model_cfg.head_dim,
    documents=model_cfg.documents,
  )
  optim_cfg = base.get_config().optim
  optim_cfg.update(
    dict(
      schedule='constant',
      warmup_steps=0,
      peak_lr=LR,
      b1=B1,
      b2=B2,
      eps=EPS,
      weight_decay=WEIGHT_DECAY,
      clip_norm=CLIP,
    )
  )
  total_steps = 1000
  mesh_cfg = ml_collections.ConfigDict(dict(data=-1, tensor=1, sequence=1))

  # The same construction as k2jax/training/run.py, on a 1-device mesh.
  mesh = sharding.make_mesh(mesh_cfg)
  batch_sharding = sharding.batch_sharding(mesh, (args.batch, args.seq_len))
  model = Transformer(model_cfg)
  schedule = optim.make_schedule(optim_cfg, total_steps)
  boxed = train_step.abstract_params(model, args.seq_len)
  tx = optim.make_optimizer(optim_cfg, total_steps, train_step.weight_decay_mask(boxed))
  _, state_sharding = train_step.state_shardings(mesh, tx, boxed, fsdp=False)

  inputs, targets = make_tokens(args)
  host_batch = {
    'inputs': inputs,
    'targets': targets,
    'positions': jnp.broadcast_to(jnp.arange(args.seq_len, dtype=jnp.int32), inputs.shape),
    'segment_ids': jnp.ones(inputs.shape, jnp.int32),
    'loss_mask': jnp.ones(inputs.shape, jnp.float32),
  }
  with sharding.activate(mesh, False):
    init = jax.jit(train_step.make_init_fn(model, tx, args.seq_len), out_shardings=state_sharding)
    state = init(jax.random.key(args.seed))
    batch = {k: jax.device_put(v, batch_sharding) for k, v in host_batch.items()}
    step_fn = jax.jit(
      train_step.make_train_step(model, tx, schedule, accum_steps=1),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=0,
    )
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()  # AOT: compile once, read its cost model
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    block_flops = block_step_flops(model_cfg, args)
    params = sum(x.size for x in jax.tree.leaves(state.params))

    holder = [state, None]

    def run_steps(n):
      state, metrics = holder[0], None
      for _ in range(n):
        state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))  # only sync point of the timed loop
      holder[0], holder[1] = state, metrics

    run_steps(args.warmup)
    loss_after_warmup = float(holder[1]['loss'])
    timing = time_steps(run_steps, args)
  return dict(
    framework='k2jax',
    params=params,
    param_count_cfg=model_cfg.param_count(),
    **timing,
    compile_s=compile_s,
    xla_flops=float(cost.get('flops', 0.0)),
    block_flops=block_flops,
    xla_bytes=float(cost.get('bytes accessed', 0.0)),
    model_flops=model_cfg.flops_per_token(args.seq_len) * args.batch * args.seq_len,
    loss=loss_after_warmup,
    devices=len(jax.devices()),
    attention=f'auto -> {attention.name} ({attention.reason})',
    threads=f'PJRT_NPROC={os.environ.get("PJRT_NPROC")}, '
    f'{eigen_pool_threads()} tf_XLAEigen threads',
    versions=f'jax {jax.__version__}',
  )


def run_hf(args) -> dict:
  import torch
  import transformers
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  config = LlamaConfig(
    vocab_size=SHAPE['vocab_size'],
    hidden_size=SHAPE['hidden_size'],
    intermediate_size=SHAPE['ffn_size'],
    num_hidden_layers=SHAPE['num_layers'],
    num_attention_heads=SHAPE['num_heads'],
    num_key_value_heads=SHAPE['num_kv_heads'],
    head_dim=SHAPE['head_dim'],
    max_position_embeddings=args.seq_len,
    rope_parameters={'rope_type': 'default', 'rope_theta': ROPE_BASE},
    rms_norm_eps=NORM_EPS,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    attention_dropout=0.0,
    use_cache=False,
  )
  model = LlamaForCausalLM._from_config(config, attn_implementation='sdpa', dtype=torch.float32)
  model.train()
  params = sum(p.numel() for p in model.parameters())
  # Decay matrices only, as k2jax does (norm scales are 1-D).
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW(
    [{'params': decay, 'weight_decay': WEIGHT_DECAY}, {'params': no_decay, 'weight_decay': 0.0}],
    lr=LR,
    betas=(B1, B2),
    eps=EPS,
    **ADAMW_MODES[args.hf_adamw],
  )

  inputs, targets = make_tokens(args)
  inputs = torch.from_numpy(inputs).long()
  targets = torch.from_numpy(targets).long()
  losses = []

  def step():
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=inputs).logits  # fp32 [B, L, V]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return loss

  def run_steps(n):
    for _ in range(n):
      loss = step()
    losses.append(loss.item())  # torch CPU is synchronous; .item() is free

  run_steps(args.warmup)
  timing = time_steps(run_steps, args)
  return dict(
    framework='hf',
    params=params,
    **timing,
    loss=losses[0],
    attn=model.config._attn_implementation,
    threads=f'torch.get_num_threads()={torch.get_num_threads()}',
    versions=f'torch {torch.__version__}, transformers {transformers.__version__}',
    optimizer=f'AdamW({args.hf_adamw})',
  )


def worker_env(args, framework: str) -> dict:
  env = dict(os.environ)
  # One real CPU device: drop any simulated-device flag (e.g. the tests' forced count).
  flags = [
    f
    for f in env.get('XLA_FLAGS', '').split()
    if not f.startswith('--xla_force_host_platform_device_count')
  ]
  env['XLA_FLAGS'] = ' '.join(flags)
  env['JAX_PLATFORMS'] = 'cpu'
  # XLA:CPU sizes its intra-op pool (Eigen matmuls, XNNPACK, parallel loops) from PJRT_NPROC,
  # else from the CPU affinity mask; torch uses OpenMP / set_num_threads.
  env['PJRT_NPROC'] = str(args.threads)
  env['OMP_NUM_THREADS'] = env['MKL_NUM_THREADS'] = str(args.threads)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


def run_worker(args, framework: str) -> dict:
  argv = [
    sys.executable,
    os.path.abspath(__file__),
    f'--worker={framework}',
    *(f'--{k}={v}' for k, v in vars(args).items() if v is not None),
  ]
  proc = subprocess.run(
    argv, env=worker_env(args, framework), cwd=REPO, capture_output=True, text=True
  )
  if proc.returncode:
    sys.stderr.write(proc.stderr)
    raise SystemExit(f'{framework} worker failed with exit code {proc.returncode}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def report(args, jx: dict, hf: dict):
  tokens = args.batch * args.seq_len
  s = SHAPE
  print(
    f'model: K2-shaped decoder, vocab {s["vocab_size"]}, hidden {s["hidden_size"]}, '
    f'ffn {s["ffn_size"]}, {s["num_layers"]} layers, {s["num_heads"]} heads / '
    f'{s["num_kv_heads"]} kv heads x {s["head_dim"]}, untied embeddings, no biases, '
    f'rope_theta {ROPE_BASE:g}, rms eps {NORM_EPS:g}'
  )
  print(
    f'batch: {args.batch} x {args.seq_len} = {tokens} tokens/step, random ids (seed '
    f'{args.seed}); float32 params and compute on both sides'
  )
  print(
    f'k2jax: remat none, attention {jx["attention"]}, jit(make_train_step, '
    f'donate_argnums=0) on a {jx["devices"]}-device mesh; HF: LlamaForCausalLM '
    f'attn_implementation={hf["attn"]}'
  )
  print(
    f'optimizer: clip {CLIP} -> AdamW lr {LR:g}, betas ({B1}, {B2}), eps {EPS:g}, '
    f'wd {WEIGHT_DECAY} (matrices only); HF: clip_grad_norm_ + torch.optim.{hf["optimizer"]}'
  )
  print(f'threads: {args.threads} per framework; k2jax {jx["threads"]}; HF {hf["threads"]}')
  print(
    f'timing: {args.warmup} warmup step(s) excluded (k2jax compiled before), median of '
    f'{args.reps} reps x {args.steps} steps; {jx["versions"]}; {hf["versions"]}'
  )
  print()
  print(
    f'{"framework":<24}{"params":>12}{"tokens/s":>10}{"ms/step":>9}{"best ms":>9}'
    f'{"own cpu":>9}{"others":>8}  ms/step of each rep'
  )
  for name, r in (('k2jax (XLA:CPU)', jx), ('HF Llama + torch AdamW', hf)):
    reps = ' '.join(f'{t * 1e3:.0f}' for t in r['all_s'])
    print(
      f'{name:<24}{r["params"]:>12,}{tokens / r["median_s"]:>10,.0f}'
      f'{r["median_s"] * 1e3:>9.0f}{min(r["all_s"]) * 1e3:>9.0f}'
      f'{r["own_cpu"]:>9.0%}{r["other_cores"]:>8.2f}  {reps}'
    )
  print(
    f'(own cpu: CPU time / (wall x {args.threads} threads); others: cores that other '
    f'processes kept busy during the timed steps)'
  )
  print(
    f'\nratio k2jax / HF tokens/s: {hf["median_s"] / jx["median_s"]:.2f}x (median), '
    f'{min(hf["all_s"]) / min(jx["all_s"]):.2f}x (best rep)'
  )
  if max(jx['other_cores'], hf['other_cores']) > 0.2:
    print(
      'WARNING: other processes were using the CPU; these timings are distorted (torch '
      'suffers most) - rerun on an idle machine'
    )
  if jx['params'] != hf['params']:
    print(f'WARNING: parameter counts differ ({jx["params"]:,} vs {hf["params"]:,})')
  print(
    f'loss after warmup: k2jax {jx["loss"]:.4f}, HF {hf["loss"]:.4f} '
    f'(ln {s["vocab_size"]} = {math.log(s["vocab_size"]):.4f})'
  )
  # The step's HLO holds the scanned layer body once; add the other layers' share.
  xla = jx['xla_flops'] + (s['num_layers'] - 1) * jx['block_flops']
  print(
    f'k2jax FLOPs/step: XLA cost analysis {jx["xla_flops"] / 1e9:.1f} G as reported '
    f'(scan body counted once), {xla / 1e9:.1f} G with the body x {s["num_layers"]} layers; '
    f'ModelConfig.flops_per_token x tokens {jx["model_flops"] / 1e9:.1f} G'
  )
  print(
    f'achieved: k2jax {xla / 1e9 / jx["median_s"]:.1f} GFLOP/s, HF (same FLOPs) '
    f'{xla / 1e9 / hf["median_s"]:.1f} GFLOP/s; k2jax compile {jx["compile_s"]:.1f} s'
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=2, help='timed steps per repetition')
  parser.add_argument('--reps', type=int, default=3, help='timed repetitions (median reported)')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps (k2jax: after compile)')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=256)
  parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument(
    '--hf_adamw',
    choices=tuple(ADAMW_MODES),
    default='fused',
    help='torch AdamW implementation (fused: its fastest on CPU here)',
  )
  parser.add_argument('--only', choices=('k2jax', 'hf'), default=None, help='run one side')
  parser.add_argument('--worker', choices=('k2jax', 'hf'), default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    # Both frameworks on the same cores; threads created later inherit the mask.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    result = run_k2jax(args) if args.worker == 'k2jax' else run_hf(args)
    print(json.dumps(result))
    return

  results = {}
  for framework in ('k2jax', 'hf'):
    if args.only in (None, framework):
      results[framework] = run_worker(args, framework)
  if len(results) == 2:
    report(args, results['k2jax'], results['hf'])
  else:
    print(json.dumps(results, indent=2))


if __name__ == '__main__':
  main()
