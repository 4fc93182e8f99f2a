"""Multi-host on one machine: two processes with 4 simulated devices each train, checkpoint,
are killed (or preempted) and resume to the same losses as an uninterrupted two-process run,
falling back together when the newest step is damaged on one host; a two-process checkpoint
continues on one process only when asked to, with a fresh data order."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from k2jax.training import checkpoint
from k2jax.training.run import prepare, train
from tests.helpers import (
  REPO,
  SMALL_FLAGS,
  SMALL_STEPS,
  cli_env,
  exact,
  free_port,
  read_metrics,
  small_config,
)


def start(workdir, port):
  env = cli_env(XLA_FLAGS='--xla_force_host_platform_device_count=4')
  return [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'k2jax.train',
        '--config=configs/pretrain.py:debug',
        f'--workdir={workdir}',
        *SMALL_FLAGS,
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]


def finish(processes) -> list[str]:
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def wait_for_checkpoints(workdir, processes, count: int) -> None:
  """Returns once `count` steps are committed; fails showing the output of a process that
  ended before."""
  deadline = time.time() + 300
  while len(checkpoint.committed_steps(checkpoint.directory(str(workdir)))) < count:
    for p in processes:
      if p.poll() is not None:
        for q in processes:
          q.kill()
        pytest.fail(f'a process exited ({p.returncode}) early:\n{p.communicate()[0][-3000:]}')
    assert time.time() < deadline, 'no checkpoint in 300 s'
    time.sleep(0.05)


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  """The uninterrupted reference: SMALL_STEPS steps on 2 processes × 4 devices (data 8)."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  out = finish(start(workdir, free_port()))
  assert 'mesh data 8' in out[0] or 'data 8' in out[0], out[0][-2000:]
  reference = read_metrics(str(workdir))
  assert [r['step'] for r in reference if 'loss' in r] == list(range(1, SMALL_STEPS + 1))
  # Each process saved its own data position beside the shared arrays.
  step_dir = os.path.join(checkpoint.directory(str(workdir)), '10', 'data')
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(os.listdir(step_dir))
  return workdir, reference


@pytest.mark.slow
def test_two_processes_train_are_killed_and_resume(two_process_run, tmp_path):
  _, reference = two_process_run
  workdir = tmp_path / 'killed'
  processes = start(workdir, free_port())
  wait_for_checkpoints(workdir, processes, 2)
  for p in processes:
    p.send_signal(signal.SIGKILL)
    p.wait()
  committed = checkpoint.committed_steps(checkpoint.directory(str(workdir)))
  assert committed[-1] < 10, committed
  # Also damage the newest step on one host only: both hosts must fall back together.
  os.remove(
    os.path.join(
      checkpoint.directory(str(workdir)), str(committed[-1]), 'data', 'process_1-of-2.json'
    )
  )
  out = finish(start(workdir, free_port()))
  assert f'step {committed[-1]}' in out[0] and 'failed to restore' in out[0], out[0][-3000:]
  assert f'resumed from {checkpoint.directory(str(workdir))}/{committed[-2]}' in out[0]
  assert exact(read_metrics(str(workdir))) == exact(reference)


@pytest.mark.slow
def test_sigterm_to_one_host_stops_both_at_one_saved_step(two_process_run, tmp_path):
  """Preemption across hosts: SIGTERM to process 1 only; JAX's preemption sync makes both
  processes stop after the same step, save it and exit 0, and the restart loses nothing."""
  _, reference = two_process_run
  workdir = tmp_path / 'preempted'
  processes = start(workdir, free_port())
  # As soon as the run is under way (process 0 writes config.json once jax.distributed and
  # the mesh are up, before the first step compiles), so that however fast the machine the
  # stop comes before the last step; the processes reach their steps at different times
  # (process 1 finds nothing in the compilation cache, which only process 0 writes).
  deadline = time.time() + 300
  while not os.path.exists(workdir / 'config.json'):
    assert all(p.poll() is None for p in processes) and time.time() < deadline
    time.sleep(0.02)
  processes[1].send_signal(signal.SIGTERM)
  out = finish(processes)
  stopped = [
    [line for line in text.splitlines() if line.startswith('stopped at step')] for text in out
  ]
  assert all(stopped), out[1][-3000:]
  steps = [int(lines[0].split()[3].rstrip(',')) for lines in stopped]
  assert steps[0] == steps[1] < SMALL_STEPS, steps
  ckpt_dir = checkpoint.directory(str(workdir))
  assert checkpoint.committed_steps(ckpt_dir)[-1] == steps[0]  # saved at the stop itself
  data = os.listdir(os.path.join(ckpt_dir, str(steps[0]), 'data'))
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(data)
  out = finish(start(workdir, free_port()))
  assert f'resumed from {ckpt_dir}/{steps[0]}' in out[0], out[0][-3000:]
  assert exact(read_metrics(str(workdir))) == exact(reference)


@pytest.mark.slow
def test_two_process_checkpoint_continues_on_one_process_only_when_asked(
  two_process_run, tmp_path, capsys
):
  """2 -> 1 processes: the arrays restore onto the new mesh, but the data position (one per
  process) does not, so the restart is refused naming both counts; with
  checkpoint.restore_data=False it goes on from the step with a fresh data order, the same on
  every such restart, which itself resumes exactly."""
  source, reference = two_process_run
  copies = []
  for name in ('a', 'b'):
    workdir = str(tmp_path / name)
    shutil.copytree(source, workdir)
    shutil.rmtree(os.path.join(checkpoint.directory(workdir), '10'))  # resume from step 8
    copies.append(workdir)
  with pytest.raises(ValueError) as raised:
    prepare(small_config(), copies[0])
  text = str(raised.value)
  assert 'step 8 was saved with 2 process(es), now 1' in text, text
  assert 'checkpoint.restore_data=False' in text and '\n' not in text, text

  fresh = small_config(**{'checkpoint.restore_data': False})
  capsys.readouterr()
  records = train(fresh, copies[0])
  out = capsys.readouterr().out
  assert f'resumed from {checkpoint.directory(copies[0])}/8' in out, out
  assert 'data: position not restored; a fresh data order from step 8' in out, out
  assert [r['step'] for r in records] == [9, 10]
  assert all(r['data_order_since'] == 8 for r in records)
  # The parameters are the 2-process run's: the loss goes on from where it was, far below a
  # fresh model's ~7.6, on other batches than the reference's.
  losses = {r['step']: r['loss'] for r in reference if 'loss' in r}
  assert abs(records[0]['loss'] - losses[9]) < 0.5 and records[0]['loss'] != losses[9]
  assert all(r['data_order_since'] == 0 for r in reference if 'loss' in r)

  # The same restart again, stopped after step 9 and resumed on the same (one) process: its
  # data position restores, in the order started at step 8, and the records are the same.
  first = train(fresh, copies[1], stop_after=9)
  second = train(small_config(), copies[1])
  assert 'data: position restored, in the order started at step 8' in capsys.readouterr().out
  assert exact(first + second) == exact(records)
  assert exact(read_metrics(copies[1])) == exact(read_metrics(copies[0]))
