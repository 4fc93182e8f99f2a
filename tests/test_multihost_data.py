"""Two processes on localhost (4 simulated devices each): each reads its own part of the data
and the global batch is one jax.Array over the 8 devices."""

import os
import sys

import numpy as np
import pytest

from tests.helpers import REPO, free_port, start_processes


@pytest.mark.slow
def test_two_processes_assemble_one_global_batch(tmp_path):
  port = str(free_port())
  worker = os.path.join(REPO, 'tests', 'multihost_data_worker.py')
  procs = start_processes(lambda i: [sys.executable, worker, port, str(i), '2', str(tmp_path)])
  for proc in procs:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
  results = [np.load(tmp_path / f'process{i}.npz') for i in range(2)]
  for r in results:
    assert int(r['devices']) == 8 and int(r['local_devices']) == 4
    assert tuple(r['shape']) == (8, 64)
  # The global batch is process 0's rows then process 1's, the same on both processes.
  expected = np.concatenate([results[0]['local'], results[1]['local']])
  for r in results:
    np.testing.assert_array_equal(r['gathered'], expected)
  # Each process read its own documents.
  rows = [{tuple(row) for row in r['local']} for r in results]
  assert not rows[0] & rows[1]
