"""Stopping cleanly on SIGTERM / SIGINT: finish the step, save, exit 0.

Schedulers (SLURM, Kubernetes, spot VMs) send SIGTERM some time before killing a job. One process
catches it here and the loop stops after the step in flight, saving a checkpoint at that step.
With several processes every host must stop at the same step, so JAX's preemption sync point
(which owns SIGTERM once `jax.distributed` is initialised) decides instead.
"""

import signal

import jax


class StopRequests:
  """Context manager; `should_stop(step)` is True once a stop was asked for (all hosts agree)."""

  def __init__(self, announce=print):
    self._announce = announce
    self._requested = None  # the signal's name, once received
    self._previous = {}

  def __enter__(self):
    # With several processes a signal seen by one host alone must not stop it alone: JAX's
    # preemption service (SIGTERM) makes every host agree on the step instead.
    if jax.process_count() == 1:
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def _handle(self, signum, frame):
    if self._requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the final save
    self._requested = signal.Signals(signum).name
    self._announce(
      f'{self._requested} received: stopping after this step (Ctrl-C again to stop at once)'
    )

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step)
    return bool(self._requested)
