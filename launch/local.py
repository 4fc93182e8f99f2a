"""Several processes of one run on this machine: a multi-host rehearsal without a scheduler.

  python -m launch.local --processes=2 --cpu_devices=4 -- \\
      --config=configs/pretrain.py:debug --workdir=/tmp/rehearsal
  python -m launch.local --processes=2 --gpus=8 -- --config=... --workdir=...

Each process is started through launch/run.sh (the plain launcher) with K2JAX_COORDINATOR
(127.0.0.1 on a free port), K2JAX_NUM_PROCESSES and K2JAX_PROCESS_ID, exactly as a scheduler
would set them on N hosts. `--cpu_devices=D` gives each process D simulated CPU devices;
`--gpus=G` splits this machine's G GPUs evenly between the processes (K2JAX_LOCAL_DEVICE_IDS),
so one 8-GPU node rehearses a 2-node job. Output lines are prefixed `[i]`; `--log_dir` also
writes `process-<i>.log`.

SIGTERM or Ctrl-C is passed on to every process (they stop at one agreed step and save). When
one process fails the others are stopped, instead of waiting in a collective for JAX's
heartbeat timeout. The exit status is the first failure's, else 0.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH = os.path.join(REPO, 'launch', 'run.sh')
DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(index: int, args, port: int, base: dict) -> dict:
  """The environment of process `index`: the plain launcher's variables, and its devices."""
  env = dict(base)
  env.update(
    K2JAX_COORDINATOR=f'127.0.0.1:{port}',
    K2JAX_NUM_PROCESSES=str(args.processes),
    K2JAX_PROCESS_ID=str(index),
    PYTHON=env.get('PYTHON', sys.executable),
  )
  if args.cpu_devices:
    flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env['XLA_FLAGS'] = ' '.join([*flags, f'{DEVICE_COUNT_FLAG}={args.cpu_devices}'])
    env['JAX_PLATFORMS'] = 'cpu'
  if args.gpus:
    per = args.gpus // args.processes
    env['K2JAX_LOCAL_DEVICE_IDS'] = ','.join(str(index * per + i) for i in range(per))
  return env


def check(args) -> None:
  if args.processes < 1:
    raise ValueError(f'--processes must be >= 1, got {args.processes}')
  if args.cpu_devices and args.gpus:
    raise ValueError('--cpu_devices and --gpus exclude each other')
  if args.gpus and args.gpus % args.processes:
    raise ValueError(f'--gpus={args.gpus} does not split evenly over {args.processes} processes')
  if not args.command:
    raise ValueError('nothing to run: give the trainer arguments after --')


def _exit_status(returncode: int) -> int:
  return returncode if returncode > 0 else 128 - returncode  # killed by signal N: 128 + N


def _relay(index: int, stream, log) -> None:
  for line in stream:
    sys.stdout.write(f'[{index}] {line}')
    sys.stdout.flush()
    if log is not None:
      log.write(line)
      log.flush()


def parse(argv=None) -> argparse.Namespace:
  """The launcher's arguments, checked (exit 2 with a usage line when they cannot work)."""
  parser = argparse.ArgumentParser(
    description=__doc__.split('\n')[0], usage='%(prog)s [options] -- TRAINER ARGUMENTS'
  )
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--cpu_devices', type=int, default=0, help='simulated CPU devices each')
  parser.add_argument('--gpus', type=int, default=0, help="this machine's GPUs, split evenly")
  parser.add_argument('--log_dir', default='', help='also write process-<i>.log here')
  parser.add_argument('--grace_s', type=float, default=60, help='SIGTERM to SIGKILL on failure')
  parser.add_argument('command', nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  if args.command[:1] == ['--']:
    args.command = args.command[1:]
  try:
    check(args)
  except ValueError as error:
    parser.error(str(error))
  return args


def main(argv=None) -> int:
  args = parse(argv)
  port = free_port()
  if args.log_dir:
    os.makedirs(args.log_dir, exist_ok=True)
  processes, relays, logs = [], [], []
  for index in range(args.processes):
    log = None
    if args.log_dir:
      log = open(os.path.join(args.log_dir, f'process-{index}.log'), 'a')
    logs.append(log)
    process = subprocess.Popen(
      [RUN_SH, *args.command],
      env=process_env(index, args, port, os.environ),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    processes.append(process)
    relay = threading.Thread(target=_relay, args=(index, process.stdout, log), daemon=True)
    relay.start()
    relays.append(relay)

  def forward(signum, frame):
    for process in processes:
      if process.poll() is None:
        process.send_signal(signal.SIGTERM)

  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
  status, failed_at = 0, None
  try:
    while any(p.poll() is None for p in processes):
      for index, process in enumerate(processes):
        code = process.poll()
        if code not in (None, 0) and not status:
          status, failed_at = _exit_status(code), time.monotonic()
          print(f'launch.local: process {index} exited {code}; stopping the others', flush=True)
          forward(signal.SIGTERM, None)
      if failed_at is not None and time.monotonic() - failed_at > args.grace_s:
        for process in processes:
          if process.poll() is None:
            process.kill()
      time.sleep(0.1)
    for process in processes:
      if process.returncode and not status:
        status = _exit_status(process.returncode)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    for relay in relays:
      relay.join(timeout=5)
    for log in logs:
      if log is not None:
        log.close()
  return status


if __name__ == '__main__':
  sys.exit(main())
