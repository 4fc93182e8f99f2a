"""Tests for k2jax.estimate: the 70B plan on 64 simulated devices, and its one-line errors."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import pytest

from k2jax import estimate, planner, roofline, run_config
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
    # ZeRO-3 over all 8 data shards: weights and optimizer state split 64 ways.
    '--config.mesh.fsdp=full',
    '--config.mesh.fsdp_group=0',
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
  assert plan_70b['num_devices'] == 64 and plan_70b['fsdp'] == 'full'


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
  assert 'mesh data 8 × tensor 8 × sequence 1 (fsdp full) on 64 cpu devices' in report
  assert 'collectives per device per step' in report and 'as XLA:GPU would send it' in report
  assert 'temporaries' in report and 'approximate' in report


# One layer's matrices on one tensor shard, in fp32 bytes: what FSDP gathers per layer.
LAYER_SHARD_BYTES = (ATTENTION + MLP) // TENSOR * 4
HEAD_SHARD_BYTES = V * E // TENSOR * 4  # the embedding table or the output head


@pytest.mark.slow
def test_70b_collective_bytes(plan_70b):
  rows = {(r['kind'], tuple(r['axes'])): r for r in plan_70b['collectives']['rows']}
  # FSDP gathers every layer's weights over `data` twice (forward; backward, with the
  # recompute sharing it), in fp32, and the embedding and head once each way.
  gather = rows[('all-gather', ('data',))]
  whole = 2 * L * LAYER_SHARD_BYTES + 2 * HEAD_SHARD_BYTES
  assert gather['whole_bytes'] == pytest.approx(whole, rel=0.01)
  assert gather['bytes'] == pytest.approx((DATA - 1) / DATA * gather['whole_bytes'])
  # Gradients: one reduction per layer (16-bit, as the compute dtype), and the head's once
  # (fp32), however many loss chunks; all compiled as all-reduce + dynamic-slice (a
  # reduce-scatter on a GPU).
  grads = rows[('all-reduce', ('data',))]
  assert SEQ_LEN // 4096 > 1  # several loss chunks
  assert grads['whole_bytes'] == pytest.approx(
    L * LAYER_SHARD_BYTES / 2 + HEAD_SHARD_BYTES, rel=0.01
  )
  assert grads['sliced_bytes'] == pytest.approx(grads['bytes'], rel=1e-3)
  assert grads['gpu_bytes'] == pytest.approx(grads['bytes'] / 2, rel=1e-3)
  # Sequence parallelism inside each layer runs over `tensor` only.
  assert rows[('all-gather', ('tensor',))]['runs'] >= 6 * L
  assert not plan_70b['collectives']['unknown_trip_loops'] or not any(
    loop['holds_collectives'] for loop in plan_70b['collectives']['unknown_trip_loops']
  )


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


# The planner (k2jax/planner.py, k2jax/roofline.py): closed forms, monotone roofline, stage table.
K2V2 = model_config.ModelConfig(**model_config.PRESETS['k2v2_70b'])


def test_planner_counts_equal_the_closed_forms(in_repo):
  cfg = run_config.load('configs/pretrain.py')
  model = model_config.from_config(cfg.model)
  assert model.param_count() == K2V2_PARAMS == 72_550_195_200
  # 6 x (non-embedding params + output head) + causal attention 6 L S H D, per token.
  matmul = K2V2_PARAMS - 2 * V * E + V * E
  assert model.flops_per_token(SEQ_LEN) == 6 * matmul + 6 * L * SEQ_LEN * H * D
  # Full recompute reruns each layer's forward: 2 x its matmul params + the attention core.
  assert roofline.recompute_flops_per_token(model, SEQ_LEN) == L * (
    2 * (ATTENTION + MLP) + 2 * SEQ_LEN * H * D
  )
  none = dataclasses.replace(model, remat='none')
  assert roofline.recompute_flops_per_token(none, SEQ_LEN) == 0
  attn = dataclasses.replace(model, remat='save_attn')
  assert roofline.recompute_flops_per_token(attn, SEQ_LEN) == L * 2 * (ATTENTION + MLP)


def test_planner_state_bytes_closed_form():
  norms = NORMS
  matrices = K2V2_PARAMS - norms
  mesh = {'data': 8, 'tensor': 8, 'sequence': 1}
  full = planner.state_bytes(K2V2, 'full', mesh)
  assert full['params'] == 4 * (matrices // 64 + norms) == full['grads']
  assert full['opt_state'] == 8 * (matrices // 64 + norms)
  zero1 = planner.state_bytes(K2V2, 'optimizer', mesh)
  assert zero1['params'] == 4 * (matrices // 8 + norms)  # weights whole on each tensor shard
  assert zero1['opt_state'] == full['opt_state']
  assert zero1['grads'] == full['grads']  # reduce-scattered layer by layer, as compiled
  assert planner.state_bytes(K2V2, 'none', mesh)['grads'] == zero1['params']


ROW = {'kind': 'all-gather', 'axes': ['data'], 'group_size': 8, 'runs': 1, 'bytes': 40e9}
TENSOR_ROW = dict(ROW, axes=['tensor'], bytes=200e9)
MESH = {'replica': 50, 'data': 8, 'tensor': 8, 'sequence': 1}


def roof(hw=None, rows=(ROW, TENSOR_ROW), overlap='cross_node'):
  flops = 455e9 * 9_830_400
  return roofline.step(
    model_flops=flops,
    hardware_flops=4 / 3 * flops,
    tokens=9_830_400,
    devices=3200,
    comm_rows=list(rows),
    mesh_shape=MESH,
    hw=hw or roofline.Hardware(),
    overlap=overlap,
  )


def test_roofline_is_monotone():
  base = roof()
  # Compute: hardware FLOPs per device at the sustained rate.
  assert base['compute_seconds'] == pytest.approx(4 / 3 * 455e9 * 9_830_400 / 3200 / 635e12)
  assert base['nvlink_seconds'] == pytest.approx(200e9 / 370e9)
  assert base['ib_seconds'] == pytest.approx(40e9 / 47e9)
  for field in ('sustained_tflops', 'nvlink_gbps', 'ib_gbps'):
    steps = [
      roof(roofline.Hardware(**{field: getattr(roofline.Hardware(), field) * k}))['step_seconds']
      for k in (0.05, 0.5, 1, 2, 20)
    ]
    assert steps == sorted(steps, reverse=True), field  # faster hardware: never slower
    assert steps[0] > steps[-1], field  # and each term matters somewhere
  mfus = [roof(roofline.Hardware(sustained_tflops=x))['mfu'] for x in (300, 600, 900)]
  assert mfus == sorted(mfus)
  # Overlap: hiding more never slows a step.
  seconds = [roof(overlap=o)['step_seconds'] for o in ('none', 'cross_node', 'all')]
  assert seconds == sorted(seconds, reverse=True)
  with pytest.raises(ValueError, match='ib_gbps must be positive'):
    roofline.Hardware(ib_gbps=0)


def test_roofline_links():
  hw = roofline.Hardware()
  assert roofline.link(['tensor'], MESH, hw) == ('nvlink', 370.0)
  assert roofline.link(['data'], MESH, hw) == ('ib', 47.0)  # one GPU of the group per node
  assert roofline.link(['replica', 'data'], MESH, hw) == ('ib', 47.0)
  # Tensor 4 x sequence 2 fill a node: a sequence group stays inside it.
  small = {'data': 4, 'tensor': 4, 'sequence': 2}
  assert roofline.link(['sequence'], small, hw)[0] == 'nvlink'
  # Tensor 4 x sequence 4: a sequence group has 2 members per node, sharing 2 NICs.
  wide = {'data': 4, 'tensor': 4, 'sequence': 4}
  assert roofline.link(['sequence'], wide, hw) == ('ib', 94.0)


def test_stage_table_dry_run(capsys, in_repo):
  result = estimate.main(['estimate', '--config=configs/pretrain.py', '--stages', '--dry_run'])
  out = capsys.readouterr().out
  assert set(result) == set(planner.K2V2_GPUS)
  for stage, gpus in planner.K2V2_GPUS.items():
    assert any(line.startswith(f'{stage} ') and f' {gpus} ' in line for line in out.splitlines())
  pretrain = result['pretrain']
  assert pretrain['param_count'] == K2V2_PARAMS and pretrain['gpus'] == 3200
  assert pretrain['tokens_per_step'] == 1200 * 8192
  roof_ = pretrain['roofline']
  assert 0 < roof_['mfu'] < 1 and roof_['tokens_per_second_per_device'] > 0
  assert roof_['tokens_per_second_per_device'] * 3200 * roof_['step_seconds'] == pytest.approx(
    1200 * 8192
  )


def test_one_stage_dry_run_report(capsys, in_repo):
  estimate.main(['estimate', '--config=configs/pretrain.py', '--dry_run'])
  out = capsys.readouterr().out
  assert 'plan for pretrain on 3,200 H200s' in out
  assert '72,550,195,200 parameters (72.55B)' in out
  assert 'tokens/s per GPU' in out and 'MFU' in out and ('fits' in out or 'NOT fit' in out)


def test_planner_compiles_a_reduced_mesh(in_repo):
  # The debug model planned on 64 "GPUs" (replica 16 x data 2 x tensor 2), compiled on this
  # process's 8 devices as replica 2 x data 2 x tensor 2: the same shapes per device.
  cfg = run_config.load('configs/pretrain.py:debug')
  cfg.mesh.tensor, cfg.mesh.fsdp, cfg.mesh.fsdp_group = 2, 'optimizer', 2
  cfg.model.num_layers = 2  # a smaller compile; the layer loop is still a loop
  cfg.data.global_batch_size = 64  # 2 rows per data shard
  hw = roofline.Hardware()
  result = planner.at_scale(
    cfg, 64, hw=hw, overlap='cross_node', dry_run=False, plan_fn=estimate.plan
  )
  compiled = result['compiled']
  assert result['mesh'] == {'replica': 16, 'data': 2, 'tensor': 2, 'sequence': 1}
  assert compiled['mesh'] == {'replica': 2, 'data': 2, 'tensor': 2, 'sequence': 1}
  assert compiled['global_batch_size'] == 8 and result['tokens_per_step'] == 64 * 128
  assert 'compiled on 8 simulated devices' in result['mode'] and not result['notes']
  # Same state per device at both sizes: the compiled memory is the plan's.
  assert result['memory_bytes_per_device'] == compiled['memory_per_device']['total']
  by_key = {(r['kind'], tuple(r['axes'])): r for r in compiled['collectives']['rows']}
  replica_rows = [r for r in result['comm_rows'] if 'replica' in r['axes']]
  assert replica_rows  # the gradient reduction across groups
  for row in result['comm_rows']:
    source = by_key[(row['kind'], tuple(row['axes']))]
    n = source['group_size']
    scale = 16 / 2 if 'replica' in row['axes'] else 1
    n_real = n * scale
    expected = source['gpu_bytes'] * ((n_real - 1) / n_real) / ((n - 1) / n)
    assert row['bytes'] == pytest.approx(expected)
  assert 0 < result['roofline']['mfu'] < 1


@pytest.mark.parametrize(
  'args, message',
  [
    (['--stages', '--gpus=64'], '--gpus plans one stage'),
    (['--gpus=3000', '--config.mesh.fsdp_group=0'], 'does not divide over 375 data shards'),
    (['--config.optim.grad_accum_steps=2'], 'optim.grad_accum_steps=2'),
    (['--gpus=3000', '--config.data.global_batch_size=1125'], 'mesh.fsdp_group=8 does not divide'),
    (['--ib_gbps=0'], 'ib_gbps must be positive'),
  ],
)
def test_planner_errors_are_one_line(capsys, in_repo, args, message):
  code, err = run_main(capsys, '--dry_run', *args)
  assert code == 2
  assert message in one_line_error(err)
