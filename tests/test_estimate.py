"""Tests for k2jax.estimate: the 70B plan on 64 simulated devices, and its one-line errors."""

import json
import os
import subprocess
import sys

import jax
import pytest

from k2jax import estimate, run_config
from k2jax.model import config as model_config
from tests.helpers import REPO

DATA, TENSOR = 8, 8
GLOBAL_BATCH = 8  # one sequence per data shard (the 8 tensor devices of a shard share it)
SEQ_LEN = 8192

# docs/recipe.md: 80 layers, hidden 8192, FFN 28672, 64 heads, 8 KV heads, head dim 128, vocab 250112.
L, E, F, H, K, D, V = 80, 8192, 28672, 64, 8, 128, 250112
ATTENTION = E * D * (2 * H + 2 * K)  # q, o: E x H x D; k, v: E x K x D
MLP = 3 * E * F  # gate, up, down
NORMS = L * 2 * E + E  # two per layer + the final norm
K2V2_PARAMS = L * (ATTENTION + MLP) + NORMS + 2 * V * E  # untied embedding and output head


@pytest.fixture(scope='module')
def plan_70b():
  """One AOT plan of the full 70B train step, in a subprocess that simulates 64 devices."""
  env = dict(os.environ)
  # Drop this process's 8-device flag (conftest): the tool must set 64 itself via --devices.
  env['XLA_FLAGS'] = ' '.join(
    f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(estimate.DEVICE_COUNT_FLAG)
  )
  command = [
    sys.executable,
    '-m',
    'k2jax.estimate',
    '--config=configs/pretrain.py',
    '--devices=64',
    f'--mesh=data:{DATA},tensor:{TENSOR},sequence:1',
    f'--config.data.global_batch_size={GLOBAL_BATCH}',
    '--output=json',
  ]
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout)


@pytest.mark.slow
def test_70b_counts(plan_70b):
  preset = model_config.ModelConfig(**model_config.PRESETS['k2v2_70b'])
  assert K2V2_PARAMS == 72_550_195_200
  assert plan_70b['param_count'] == K2V2_PARAMS == preset.param_count()
  assert plan_70b['param_count_non_embedding'] == K2V2_PARAMS - 2 * V * E
  # docs/recipe.md: 455 GFLOP per token at 8K
  assert plan_70b['flops_per_token'] == pytest.approx(455e9, rel=0.005)
  assert plan_70b['tokens_per_step'] == GLOBAL_BATCH * SEQ_LEN
  assert plan_70b['mesh'] == {'data': DATA, 'tensor': TENSOR, 'sequence': 1}
  assert plan_70b['num_devices'] == 64 and plan_70b['fsdp']


@pytest.mark.slow
def test_70b_compiled_memory(plan_70b):
  # Figures of a real compile: XLA's memory analysis of the executable, and its time.
  assert plan_70b['compile_seconds'] > 0 and plan_70b['lower_seconds'] > 0
  memory = plan_70b['memory_per_device']
  for key in ('argument', 'output', 'temp', 'total'):
    assert memory[key] > 0, key
  # The donated state is written in place: outputs alias (almost) all of the arguments.
  assert memory['alias'] >= 0.99 * memory['output']
  # The compiler's argument bytes are the analytic state plus this device's batch slice.
  state = plan_70b['state_bytes_per_device']
  assert memory['argument'] == pytest.approx(
    state['total'] + plan_70b['batch_bytes_per_device'], rel=1e-3
  )


@pytest.mark.slow
def test_70b_state_bytes_follow_the_shardings(plan_70b):
  # With fsdp, every matrix is split 64 ways: `embed` over data and heads / kv_heads / mlp /
  # vocab over tensor (each matrix has one of each). Norm scales (`layers`, `norm`) replicate.
  sharded = K2V2_PARAMS - NORMS
  assert sharded % (DATA * TENSOR) == 0
  params = 4 * (sharded // (DATA * TENSOR) + NORMS)  # fp32 master weights
  state = plan_70b['state_bytes_per_device']
  assert state['params'] == params
  # Adam's mu and nu mirror the params; the two int32 update counters (adam, lr schedule)
  # are replicated.
  assert state['opt_state'] == 2 * params + 2 * 4
  assert state['step'] == 4
  # The rough figure (fp32 params + 2 moments) * N / devices is off only by the norms.
  assert state['total'] == pytest.approx(3 * 4 * K2V2_PARAMS / 64, rel=2e-3)


@pytest.mark.slow
def test_70b_text_report(plan_70b):
  report = estimate.format_report('configs/pretrain.py', plan_70b)
  assert '72,550,195,200 parameters' in report
  assert 'mesh data 8 × tensor 8 × sequence 1 (fsdp) on 64 cpu devices' in report
  assert 'temporaries' in report and 'approximate' in report


def run_main(capsys, *args):
  """Runs the tool in this process; returns (exit code, stderr)."""
  with pytest.raises(SystemExit) as exit_info:
    estimate.main(['estimate', '--config=configs/pretrain.py', *args])
  return exit_info.value.code, capsys.readouterr().err


@pytest.fixture
def in_repo(monkeypatch):
  monkeypatch.chdir(REPO)


def one_line_error(err: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  return lines[0]


def test_mesh_that_does_not_match_the_devices(capsys, in_repo):
  code, err = run_main(capsys, '--mesh=data:3,tensor:8')
  assert code == 2
  line = one_line_error(err)
  assert (
    f'mesh data 3 × tensor 8 × sequence 1 needs 24 devices, but {jax.device_count()} are' in line
  )


def test_dimension_not_divisible_by_its_axis(capsys, in_repo):
  if jax.device_count() % 2:
    pytest.skip('needs an even number of devices for a tensor axis of 2')
  code, err = run_main(
    capsys,
    '--mesh=data:-1,tensor:2',
    '--config.model.vocab_size=250001',
    f'--config.data.global_batch_size={jax.device_count() // 2}',
  )
  assert code == 2
  line = one_line_error(err)
  assert 'vocab=250001' in line and "mesh axis 'tensor' of size 2" in line


def test_misspelt_override(capsys, in_repo):
  code, err = run_main(capsys, '--config.optim.peak_l=3e-4')
  assert code == 2
  assert 'did you mean: optim.peak_lr' in one_line_error(err)


@pytest.mark.parametrize(
  'spec, message',
  [
    ('configs/nope.py', "config file 'configs/nope.py' does not exist"),
    ('configs/pretrain.py:bogus', 'unknown config argument(s) bogus'),
  ],
)
def test_config_that_does_not_load(capsys, in_repo, spec, message):
  with pytest.raises(SystemExit) as exit_info:
    estimate.main(['estimate', f'--config={spec}'])
  assert exit_info.value.code == 2
  assert message in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
  'mesh, message',
  [
    ('data:8,tensr:8', "'tensr:8' is not AXIS:SIZE"),
    ('data:8,tensor:x', "size of 'tensor' must be an integer"),
    ('data:8,data:4', "axis 'data' is given twice"),
  ],
)
def test_bad_mesh_flag(capsys, in_repo, mesh, message):
  code, err = run_main(capsys, f'--mesh={mesh}')
  assert code == 2
  assert message in one_line_error(err)


def test_devices_after_jax_started(capsys, in_repo):
  # In this process JAX already runs with conftest's devices: a different count cannot apply.
  code, err = run_main(capsys, f'--devices={jax.device_count() + 1}')
  assert code == 2
  assert 'already started' in one_line_error(err)


def test_parse_mesh():
  assert run_config.parse_mesh('data:8, tensor:8,sequence:1') == {
    'data': 8,
    'tensor': 8,
    'sequence': 1,
  }
  assert run_config.parse_mesh('tensor:-1') == {'tensor': -1}
