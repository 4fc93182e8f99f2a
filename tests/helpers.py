"""Helpers shared by the test files: import them from here, never from another test file."""

import importlib
import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TOKENIZER = os.path.join(REPO, 'data_pipeline/demo/tokenizer.model')
DEMO_EVAL = os.path.join(REPO, 'data_pipeline/demo/eval.jsonl')

# The demo run every test that needs a trained model shares (built once a session, conftest.py):
# `make demo`'s command, 100 steps of configs/pretrain.py:debug.
DEMO_CONFIG = 'configs/pretrain.py:debug'
DEMO_STEPS = 100


def cli_env(**extra) -> dict:
  """The environment of a command a test starts: 8 simulated CPU devices and the suite's
  persistent compilation cache (set by conftest.py), so a subprocess reuses what others compiled."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  flags = env.get('XLA_FLAGS', '')
  if '--xla_force_host_platform_device_count' not in flags:
    env['XLA_FLAGS'] = (flags + ' --xla_force_host_platform_device_count=8').strip()
  env.update(extra)
  return env


def run_cli(module: str, *args, check: bool = False, timeout: float = 600, env=None, **popen):
  """`python -m module args...` from the repository root; stdout and stderr captured as text.
  With check=True a non-zero exit fails the test and shows the end of stderr."""
  result = subprocess.run(
    [sys.executable, '-m', module, *map(str, args)],
    cwd=popen.pop('cwd', REPO),
    env=env or cli_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
    **popen,
  )
  if check and result.returncode != 0:
    pytest.fail(f'python -m {module} exited {result.returncode}:\n{result.stderr[-4000:]}')
  return result


def require_oracle(module: str):
  """Imports the test oracle (torch, transformers, lm_eval). Locally a missing oracle skips; in
  CI (`CI` set) it fails, so an install step that lost it cannot pass as green."""
  if os.environ.get('CI'):
    try:
      return importlib.import_module(module)
    except ImportError as error:
      pytest.fail(f'CI needs the test oracle {module!r} (pip install -e .[dev]): {error}')
  return pytest.importorskip(module)


# --- models and checkpoints without training (test_model, test_generate, test_evaluate) ------


def _tiny():
  from k2jax.model.config import ModelConfig

  return ModelConfig(
    vocab_size=128,
    hidden_size=64,
    ffn_size=160,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    dtype='float32',
    remat='none',
  )


TINY = _tiny()  # a 2-layer GQA model in float32, small enough to compile in seconds


def random_params(cfg, seed=0, std=0.05):
  """Host parameters drawn with numpy: no init to compile. Norm scales get noise too."""
  import flax.linen as nn
  import jax
  import numpy as np

  from k2jax.model.transformer import Transformer
  from k2jax.training import train_step

  rng = np.random.default_rng(seed)
  abstract = nn.unbox(train_step.abstract_params(Transformer(cfg), 1))
  return jax.tree.map(lambda a: rng.normal(0.0, std, a.shape).astype(np.float32), abstract)


def hf_to_params(hf_model, cfg):
  """HF LlamaForCausalLM weights as k2jax's parameter tree through k2jax.hf.schema's map (the
  one conversion uses), inverted: param = hf.reshape(permuted shape).transpose(argsort(perm)),
  w - 1 for norms."""
  import numpy as np
  from flax import traverse_util

  from k2jax.hf import schema

  state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  shapes, _ = schema.param_shapes(cfg)

  def load(spec, inner, name):
    w = state[name].reshape([inner[p] for p in spec.perm]).transpose(np.argsort(spec.perm))
    return w - 1.0 if spec.norm else w

  flat = {}
  for path, spec in schema.TENSORS.items():
    inner = schema.layer_shape(path, shapes[path].shape)
    flat[path] = (
      np.stack([load(spec, inner, spec.hf.format(i)) for i in range(cfg.num_layers)])
      if path.startswith(schema.LAYER_PREFIX)
      else load(spec, inner, spec.hf)
    )
  return traverse_util.unflatten_dict(flat, sep='/')


class _NoData:
  def get_state(self):
    return {}


def make_checkpoint(workdir, edit_params=None, tokenizer=None):
  """A step-2 checkpoint of the debug pre-training stage (2 layers), without training; its run
  config names the demo SentencePiece tokenizer, or `tokenizer` ('' for none).
  `edit_params(params) -> params` changes the (host) parameters before they are saved.
  Returns the run config."""
  import jax
  import jax.numpy as jnp

  from k2jax import run_config
  from k2jax.training import checkpoint, train_step

  cfg = run_config.load(os.path.join(REPO, 'configs/pretrain.py:debug'))
  cfg.model.num_layers = 2
  cfg.data.seq_len = 64
  cfg.data.global_batch_size = 8
  cfg.total_steps = 2
  cfg.optim.warmup_steps = 1
  cfg.checkpoint.every = 2
  cfg.mesh.data = 1  # one device: Orbax then saves without compiling per-array copies
  if tokenizer is not None:
    cfg.data.tokenizer = tokenizer
  plan = train_step.plan(cfg, jax.devices()[:1])
  params = random_params(plan.model_cfg, std=0.02)
  if edit_params is not None:
    params = edit_params(params)
  params = jax.device_put(params, plan.state_sharding.params)
  state = train_step.TrainState(
    step=jnp.asarray(2, jnp.int32), params=params, opt_state=plan.tx.init(params)
  )
  checkpoints = checkpoint.Checkpoints(str(workdir), cfg)
  checkpoints.save(2, state, _NoData(), final=True)
  checkpoints.close()
  return cfg


# --- a small training run (tests of checkpoints, stability, multi-host training) ------------------

SMALL_STEPS = 10
# The numbers that must not change across a restart (throughput and ETA may).
EXACT = ('loss', 'grad_norm', 'update_norm', 'param_norm', 'learning_rate', 'loss_tokens')
# The small run's overrides of DEMO_CONFIG, as command-line flags (small_config's in-process twin).
SMALL_FLAGS = (
  '--config.model.num_layers=2',
  '--config.data.seq_len=64',
  '--config.data.global_batch_size=8',
  f'--config.total_steps={SMALL_STEPS}',
  '--config.log_every=1',
  '--config.eval_every=0',
  '--config.checkpoint.every=2',
  '--config.checkpoint.keep=2',
  '--config.checkpoint.keep_every=4',
)


def small_config(**overrides):
  """DEMO_CONFIG shrunk as SMALL_FLAGS: 2 layers, 8 x 64 tokens, 10 steps, a save every 2 steps;
  `overrides` by dotted key ('optim.warmup_steps': 1)."""
  from k2jax import run_config

  cfg = run_config.load(os.path.join(REPO, DEMO_CONFIG))
  for flag in SMALL_FLAGS:
    key, value = flag[len('--config.') :].split('=')
    overrides = {key: int(value), **overrides}
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  return cfg


def exact(records):
  """The EXACT numbers of each training record, by step."""
  return [(r['step'], *(r[k] for k in EXACT)) for r in records if 'loss' in r]


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def hf_llama(cfg, seed: int = 0, **config):
  """The oracle: HF's LlamaForCausalLM (fp32, eval mode) of a ModelConfig's shape, randomly
  initialised with `seed`; `config` adds or overrides LlamaConfig fields."""
  torch = require_oracle('torch')
  transformers = require_oracle('transformers')
  hf_config = transformers.LlamaConfig(
    **{
      'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.hidden_size,
      'intermediate_size': cfg.ffn_size,
      'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.head_dim,
      'rope_theta': cfg.rope_base,
      'rms_norm_eps': cfg.norm_eps,
      'tie_word_embeddings': False,
      'attention_bias': False,
      'mlp_bias': False,
      'max_position_embeddings': 256,
      **config,
    }
  )
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(hf_config).eval()


# --- launch/ (test_launch, test_docs_commands) ---------------------------------------------

FAKE_SRUN = r"""#!/bin/bash
# srun on one machine: every task of the step runs here, with SLURM's step variables.
out=/dev/stdout
while [[ "$1" == --* ]]; do
  case "$1" in --output=*) out="${1#--output=}" ;; esac
  shift
done
pids=()
for ((t = 0; t < SLURM_JOB_NUM_NODES; t++)); do
  K2JAX_DRY_RUN="${FAKE_TASKS_DRY_RUN:-${K2JAX_DRY_RUN:-0}}" \
    SLURM_STEP_NODELIST="$SLURM_JOB_NODELIST" SLURM_NTASKS="$SLURM_JOB_NUM_NODES" \
    SLURM_PROCID=$t SLURM_LOCALID=0 SLURM_STEP_TASKS_PER_NODE="1(x$SLURM_JOB_NUM_NODES)" \
    "$@" >"${out//%t/$t}" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def fake_slurm(tmp_path, args, nodes=2, **extra):
  """Runs `launch/slurm.sbatch ARGS` as SLURM would (bash, the job's variables, job 4242 on
  `nodes` nodes gpu001...) with srun and scontrol replaced: srun runs every task here, in
  dry-run mode (layout and command printed, nothing trained). Returns (result, scontrol calls)."""
  import stat

  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  calls = tmp_path / 'scontrol.calls'
  for name, text in (
    ('srun', FAKE_SRUN),
    ('scontrol', f'#!/bin/bash\necho "$@" >> {calls}\n'),
  ):
    path = bin_dir / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  env = cli_env(
    PATH=f'{bin_dir}:{os.environ["PATH"]}',
    SLURM_JOB_ID='4242',
    SLURM_JOB_NUM_NODES=str(nodes),
    SLURM_JOB_NODELIST=f'gpu[001-{nodes:03d}]',
    SLURM_SUBMIT_DIR=REPO,
    PYTHON=sys.executable,
    FAKE_TASKS_DRY_RUN='1',  # the tasks print their layout and command instead of training
    **extra,
  )
  result = subprocess.run(
    ['bash', 'launch/slurm.sbatch', *map(str, args)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  return result, (calls.read_text().splitlines() if calls.exists() else [])


def start_processes(argv_for, count: int = 2, devices: int = 4) -> list[subprocess.Popen]:
  """Starts `count` processes `argv_for(i)` from the repo root on `devices` simulated CPU
  devices each, their stdout and stderr merged into one text pipe."""
  env = cli_env(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return [
    subprocess.Popen(
      argv_for(i), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for i in range(count)
  ]


def join_local_cluster(port: str, process_id: str, num_processes: str) -> None:
  """For a worker process: jax.distributed on localhost with gloo collectives between CPUs."""
  import jax

  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{port}',
    num_processes=int(num_processes),
    process_id=int(process_id),
  )
