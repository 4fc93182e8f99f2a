"""Multi-host on one machine: two processes with 4 simulated devices each train, checkpoint,
are killed, and resume to the same losses as an uninterrupted two-process run, falling back
together when the newest step is damaged on one host."""

import os
import signal
import subprocess
import sys
import time

import pytest

from k2jax.training import checkpoint
from tests.helpers import REPO, SMALL_FLAGS, cli_env, exact, free_port, read_metrics


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


@pytest.mark.slow
def test_two_processes_train_are_killed_and_resume(tmp_path):
  reference_dir = tmp_path / 'uninterrupted'
  out = finish(start(reference_dir, free_port()))
  assert 'mesh data 8' in out[0] or 'data 8' in out[0], out[0][-2000:]
  reference = read_metrics(str(reference_dir))
  assert [r['step'] for r in reference if 'loss' in r] == list(range(1, 11))
  # Each process saved its own data position beside the shared arrays.
  step_dir = os.path.join(checkpoint.directory(str(reference_dir)), '10', 'data')
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(os.listdir(step_dir))

  workdir = tmp_path / 'killed'
  processes = start(workdir, free_port())
  deadline = time.time() + 300
  while len(checkpoint.committed_steps(checkpoint.directory(str(workdir)))) < 2:
    assert all(p.poll() is None for p in processes) and time.time() < deadline
    time.sleep(0.05)
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
