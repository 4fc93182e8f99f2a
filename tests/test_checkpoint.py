"""Checkpoints: resume is bit-identical, damaged steps fall back, init_from hands a stage over."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from k2jax.training import checkpoint, optim, train_step
from k2jax.training.run import prepare, run, train
from tests.helpers import (
  REPO,
  SMALL_FLAGS,
  SMALL_STEPS,
  cli_env,
  exact,
  read_metrics,
  small_config,
)

TOTAL_STEPS = SMALL_STEPS


def saved_params(workdir, step, cfg):
  plan = train_step.plan(cfg)
  return jax.device_get(
    checkpoint.load_params(os.path.join(checkpoint.directory(workdir), str(step)), plan)
  )


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """Run A: TOTAL_STEPS steps in one go."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  return workdir, train(small_config(), workdir)


def test_layout_and_keep_policy(uninterrupted):
  workdir, records = uninterrupted
  ckpt_dir = checkpoint.directory(workdir)
  # Saves at 2, 4, ..., 10; keep the newest 2 and every multiple of 4.
  assert checkpoint.committed_steps(ckpt_dir) == [4, 8, 10]
  step_dir = os.path.join(ckpt_dir, '10')
  for item in checkpoint.ITEMS:
    assert os.path.isdir(os.path.join(step_dir, item)), item
  assert json.load(open(os.path.join(step_dir, 'data', 'process_0-of-1.json')))
  assert not glob.glob(os.path.join(ckpt_dir, '*tmp*'))
  assert [r['step'] for r in records] == list(range(1, TOTAL_STEPS + 1))


def test_resume_is_bit_identical(uninterrupted, tmp_path, capsys):
  reference_dir, reference = uninterrupted
  cfg = small_config()
  workdir = str(tmp_path)
  first = train(cfg, workdir, stop_after=7)  # as if killed after step 7
  assert checkpoint.committed_steps(checkpoint.directory(workdir))[-1] == 7
  second = train(small_config(), workdir)
  assert [r['step'] for r in second] == list(range(8, TOTAL_STEPS + 1))
  assert exact(first + second) == exact(reference)
  assert exact(read_metrics(workdir)) == exact(reference)
  assert checkpoint.committed_steps(checkpoint.directory(workdir)) == [4, 8, 10]
  ours, theirs = saved_params(workdir, 10, cfg), saved_params(reference_dir, 10, cfg)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)

  capsys.readouterr()
  assert train(small_config(), workdir) == []
  assert f'already at step {TOTAL_STEPS} of {TOTAL_STEPS}' in capsys.readouterr().out


def _truncate_arrays(step_dir):
  for path in glob.glob(os.path.join(step_dir, 'params', 'ocdbt.process_0', 'd', '*')):
    with open(path, 'r+b') as f:
      f.truncate(16)


def _delete_data_state(step_dir):
  os.remove(os.path.join(step_dir, 'data', 'process_0-of-1.json'))


@pytest.mark.parametrize('damage', [_truncate_arrays, _delete_data_state])
def test_damaged_newest_checkpoint_falls_back(damage, uninterrupted, tmp_path, capsys):
  reference_dir, reference = uninterrupted
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference_dir, workdir)
  damage(os.path.join(checkpoint.directory(workdir), '10'))

  capsys.readouterr()
  records = train(small_config(), workdir)
  out = capsys.readouterr().out
  assert 'warning: checkpoint step 10' in out and 'falling back to step 8' in out, out
  # One readable line: the error and its cause, no raw library object (a pybind11 repr).
  [warning] = [line for line in out.splitlines() if 'warning: checkpoint step 10' in line]
  assert 'pybind11' not in warning and '<bound method' not in warning, warning
  if damage is _truncate_arrays:
    assert 'OUT_OF_RANGE' in warning, warning  # the cause, as TensorStore said it
  assert exact(records) == exact(reference)[8:]
  assert exact(read_metrics(workdir)) == exact(reference)
  # The damaged step is set aside, and the run saved step 10 again.
  assert glob.glob(os.path.join(checkpoint.directory(workdir), 'damaged', '10-*'))
  assert checkpoint.committed_steps(checkpoint.directory(workdir)) == [4, 8, 10]


def test_uncommitted_save_is_not_a_step(uninterrupted, tmp_path):
  """A save killed before its rename leaves `<step>.orbax-checkpoint-tmp`: never listed."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(uninterrupted[0], workdir)
  ckpt_dir = checkpoint.directory(workdir)
  partial = os.path.join(ckpt_dir, '12.orbax-checkpoint-tmp')
  shutil.copytree(os.path.join(ckpt_dir, '10'), partial)
  assert checkpoint.committed_steps(ckpt_dir) == [4, 8, 10]
  os.remove(os.path.join(partial, 'commit_success.txt'))
  # A run's manager removes the leftover, in the background (awaited by its first save).
  checkpoints = checkpoint.Checkpoints(workdir, small_config())
  deadline = time.time() + 30
  while os.path.exists(partial) and time.time() < deadline:
    time.sleep(0.1)
  checkpoints.close()
  assert not os.path.exists(partial)
  assert checkpoint.committed_steps(ckpt_dir) == [4, 8, 10]


def test_init_from_hands_over_with_a_new_rope_and_length(uninterrupted, tmp_path, capsys):
  source_dir, _ = uninterrupted
  cfg = small_config(total_steps=3, init_from=source_dir, **{'optim.warmup_steps': 2})
  cfg.model.rope_base = 1e6  # not a parameter: the new stage's value just applies
  cfg.data.seq_len = 128
  prepared = prepare(cfg, str(tmp_path))
  assert prepared['init_from'] == os.path.join(checkpoint.directory(source_dir), '10')
  params = checkpoint.load_params(prepared['init_from'], prepared['plan'])
  for array, sharding in zip(
    jax.tree.leaves(params), jax.tree.leaves(prepared['plan'].state_sharding.params)
  ):
    assert array.sharding == sharding
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(params),
    saved_params(source_dir, 10, small_config()),
  )

  capsys.readouterr()
  records = run(prepared)
  assert 'parameters from' in capsys.readouterr().out
  assert [r['step'] for r in records] == [1, 2, 3]
  assert records[0]['learning_rate'] == 0.0  # the new stage's warmup, from its step 0
  # Trained parameters: far below a fresh model's ~ln(2048) = 7.6.
  assert records[0]['loss'] < 7.0, records[0]


def test_init_from_shape_mismatch_names_the_parameter(uninterrupted, tmp_path):
  step_dir = os.path.join(checkpoint.directory(uninterrupted[0]), '8')
  cfg = small_config(init_from=step_dir)
  cfg.model.num_layers = 3
  with pytest.raises(
    ValueError,
    match=r'parameter layers/\S+ has shape \(2, .*\) in the '
    r'checkpoint but \(3, .*\) in this model',
  ):
    prepare(cfg, str(tmp_path))


# --- resuming a workdir with another setup: refused before any step is tried ---------------------


def _workdir_copy(uninterrupted, tmp_path) -> str:
  workdir = str(tmp_path / 'run')
  shutil.copytree(uninterrupted[0], workdir)
  return workdir


def _untouched(workdir):
  """The checkpoints are as they were: no step set aside as damaged, none deleted."""
  ckpt_dir = checkpoint.directory(workdir)
  assert checkpoint.committed_steps(ckpt_dir) == [4, 8, 10]
  assert not os.path.exists(os.path.join(ckpt_dir, checkpoint.DAMAGED))


def test_resume_with_another_process_count_says_so(uninterrupted, tmp_path):
  """Saved by 2 processes (as their data files say), resumed by 1: one line naming both counts,
  not every step called damaged and the advice to move the directory away."""
  workdir = _workdir_copy(uninterrupted, tmp_path)
  ckpt_dir = checkpoint.directory(workdir)
  for step in checkpoint.committed_steps(ckpt_dir):
    data = os.path.join(ckpt_dir, str(step), 'data')
    os.rename(os.path.join(data, 'process_0-of-1.json'), os.path.join(data, 'process_0-of-2.json'))
    shutil.copy(
      os.path.join(data, 'process_0-of-2.json'), os.path.join(data, 'process_1-of-2.json')
    )
  with pytest.raises(ValueError) as raised:
    prepare(small_config(), workdir)
  text = str(raised.value)
  assert 'step 10 was saved with 2 process(es), now 1' in text, text
  assert 'checkpoint.restore_data=False' in text, text
  assert '\n' not in text and 'intact' in text and 'move' not in text, text
  _untouched(workdir)


def test_resume_where_the_mesh_moved_the_rows_says_so(uninterrupted, tmp_path):
  """Same process count, but the data position was saved for another input shard (a mesh that
  changed which rows each process loads): refused unless checkpoint.restore_data=False; a
  position saved before input shards were recorded is taken as it is."""
  workdir = _workdir_copy(uninterrupted, tmp_path)
  path = os.path.join(checkpoint.directory(workdir), '10', 'data', 'process_0-of-1.json')
  state = json.load(open(path))
  assert state['input_shard'] == [0, 1] and state['data_order_since'] == 0
  json.dump({**state, 'input_shard': [1, 2]}, open(path, 'w'))
  with pytest.raises(ValueError) as raised:
    prepare(small_config(), workdir)
  text = str(raised.value)
  assert 'loading input shard 1 of 2, now shard 0 of 1' in text and '\n' not in text, text
  notes = prepare(small_config(**{'checkpoint.restore_data': False}), workdir)['notes']
  assert any('restore_data=False' in note for note in notes), notes
  json.dump({k: v for k, v in state.items() if k != 'input_shard'}, open(path, 'w'))
  prepare(small_config(), workdir)
  _untouched(workdir)


def test_resume_with_another_model_shape_names_the_fields(uninterrupted, tmp_path):
  workdir = _workdir_copy(uninterrupted, tmp_path)
  cfg = small_config(**{'model.num_layers': 3, 'model.vocab_size': 4096})
  with pytest.raises(ValueError) as raised:
    prepare(cfg, workdir)
  text = str(raised.value)
  assert 'model.vocab_size 2048 -> 4096, model.num_layers 2 -> 3' in text, text
  assert '\n' not in text and 'damaged' not in text, text
  _untouched(workdir)


def test_resume_with_a_changed_schedule_is_refused_unless_asked(uninterrupted, tmp_path, capsys):
  """total_steps 10 -> 12 re-stretches the cosine decay: refused, naming the field, its old and
  new values and the rate that would jump; resume_schedule_change=True goes on under it."""
  workdir = _workdir_copy(uninterrupted, tmp_path)
  with pytest.raises(ValueError) as raised:
    prepare(small_config(total_steps=12), workdir)
  text = str(raised.value)
  assert 'total_steps 10 -> 12' in text and 'resume_schedule_change=True' in text, text
  assert 'the learning rate at step 10 goes from' in text and '\n' not in text, text
  # A field the schedule does not read (this cosine has no wsd phase) is not a change.
  prepare(small_config(**{'optim.wsd_decay_fraction': 0.5}), workdir)
  _untouched(workdir)

  cfg = small_config(total_steps=12, resume_schedule_change=True)
  capsys.readouterr()
  records = train(cfg, workdir)
  assert 'learning-rate schedule changed on resume' in capsys.readouterr().out
  assert [r['step'] for r in records] == [11, 12]
  want = optim.learning_rate_at(cfg.optim, 12, 10)  # the new schedule, from the restored count
  np.testing.assert_allclose(records[0]['learning_rate'], want, rtol=1e-6)


def cli_run_past_first_checkpoint(workdir, **popen_args):
  """Starts the CLI on the small config; returns once its first checkpoint is committed."""
  env = cli_env()
  command = [
    sys.executable,
    '-m',
    'k2jax.train',
    '--config=configs/pretrain.py:debug',
    f'--workdir={workdir}',
    *SMALL_FLAGS,
  ]
  process = subprocess.Popen(command, cwd=REPO, env=env, **popen_args)
  deadline = time.time() + 300
  while not checkpoint.committed_steps(checkpoint.directory(workdir)):
    if process.poll() is not None or time.time() > deadline:
      process.kill()
      raise AssertionError('the run ended (or hung) before its first checkpoint')
    time.sleep(0.05)
  return process, command, env


def restart_matches(command, env, workdir, reference) -> str:
  """Runs the same command again; its metrics.jsonl must be the uninterrupted run's."""
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert exact(read_metrics(str(workdir))) == exact(reference)
  return result.stdout


@pytest.mark.slow
def test_sigterm_stops_after_the_step_with_a_checkpoint(uninterrupted, tmp_path):
  """Preemption: SIGTERM -> finish the step, save it, exit 0; the restart loses nothing."""
  _, reference = uninterrupted
  process, command, env = cli_run_past_first_checkpoint(
    tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr
  assert 'SIGTERM received' in stdout, stdout
  stopped = [line for line in stdout.splitlines() if line.startswith('stopped at step')]
  assert stopped, stdout
  stopped_at = int(stopped[0].split()[3])
  assert stopped_at < TOTAL_STEPS
  ckpt_dir = checkpoint.directory(str(tmp_path))
  assert checkpoint.committed_steps(ckpt_dir)[-1] == stopped_at  # saved at the stop itself
  assert f'resumed from {ckpt_dir}/{stopped_at}' in restart_matches(
    command, env, tmp_path, reference
  )


@pytest.mark.parametrize(
  'mesh, devices', [(dict(data=2, tensor=4), 8), (dict(data=4, tensor=1), 4)]
)
def test_restore_onto_another_mesh(uninterrupted, tmp_path, mesh, devices):
  """Saved on data 8; restored onto data 2 x tensor 4, or onto 4 devices: the same numbers."""
  from data_pipeline import pipeline
  from k2jax.parallel import input as batch_input
  from k2jax.parallel import sharding

  workdir, reference = uninterrupted
  saved = saved_params(workdir, 8, small_config())
  cfg = small_config(**{f'mesh.{axis}': size for axis, size in mesh.items()})
  plan = train_step.plan(cfg, devices=jax.devices()[:devices])
  assert dict(zip(sharding.AXES, plan.mesh.devices.shape)) == {**mesh, 'sequence': 1}
  shutil.copytree(checkpoint.directory(workdir), checkpoint.directory(str(tmp_path)))
  checkpoints = checkpoint.Checkpoints(str(tmp_path), cfg)
  batches = pipeline.build(cfg.data, seed=cfg.seed, split='train')
  with sharding.activate(plan.mesh, cfg.mesh.fsdp):
    state = checkpoints.restore(8, plan, batches)
    for array, wanted in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(plan.state_sharding.params)
    ):
      assert array.sharding == wanted
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), saved)
    step_fn = plan.jit_train_step()
    losses = []
    shard = batch_input.shard_for(plan.batch_sharding, 8, 64)
    for _ in range(2):  # steps 9 and 10, on the new mesh
      batch = batch_input.global_batch(
        plan.batch_sharding, shard, next(batches), train_step.BATCH_KEYS
      )
      state, metrics = step_fn(state, batch)
      losses.append(float(metrics['loss']))
  checkpoints.close()
  want = [r['loss'] for r in reference if r['step'] in (9, 10)]
  np.testing.assert_allclose(losses, want, rtol=1e-5)  # sums in another order: not bit-equal


@pytest.mark.slow
def test_killed_during_an_async_save_resumes_to_the_same_losses(uninterrupted, tmp_path):
  """SIGKILL after the first checkpoint, while the next save is being written: the
  half-written step is ignored and the restart's metrics.jsonl is as if never interrupted."""
  _, reference = uninterrupted
  process, command, env = cli_run_past_first_checkpoint(
    tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  ckpt_dir = checkpoint.directory(str(tmp_path))
  deadline = time.time() + 120
  while not glob.glob(os.path.join(ckpt_dir, '*tmp*')):  # the next save in progress
    assert process.poll() is None and time.time() < deadline, 'no save in progress was seen'
    time.sleep(0.002)
  process.send_signal(signal.SIGKILL)
  process.wait()
  committed = checkpoint.committed_steps(ckpt_dir)
  assert committed and committed[-1] < TOTAL_STEPS
  assert 'resumed from' in restart_matches(command, env, tmp_path, reference)


def test_init_from_optimizer_carries_the_moments_and_restarts_the_schedule(uninterrupted, tmp_path):
  import optax

  source_dir, _ = uninterrupted
  cfg = small_config(
    total_steps=2, init_from=source_dir, init_from_optimizer=True, **{'optim.warmup_steps': 1}
  )
  prepared = prepare(cfg, str(tmp_path))
  opt_state = checkpoint.load_opt_state(prepared['init_from'], prepared['plan'])
  adam = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
    if isinstance(s, optax.ScaleByAdamState)
  ]
  schedule = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
    if isinstance(s, optax.ScaleByScheduleState)
  ]
  assert int(adam[0].count) == 10  # Adam's bias correction goes on from the source's step 10
  assert int(schedule[0].count) == 0  # the new stage's schedule starts at its step 0
  assert float(jax.tree.leaves(adam[0].mu)[0].std()) > 0  # moments carried over
  records = run(prepared)
  assert [r['step'] for r in records] == [1, 2] and records[0]['learning_rate'] == 0.0
  # A step directory without an optimizer (a converted HF checkpoint) is refused up front.
  bare = tmp_path / 'bare'
  shutil.copytree(os.path.join(checkpoint.directory(source_dir), '10', 'params'), bare / 'params')
  cfg = small_config(init_from=str(bare), init_from_optimizer=True)
  with pytest.raises(ValueError, match='has no opt_state'):
    prepare(cfg, str(tmp_path / 'other'))
