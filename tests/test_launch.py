"""launch/: process layouts from SLURM-, Kubernetes- and plain environments (fake ones, no
scheduler), the GPU flag presets against the pinned jaxlib, the SLURM script with a fake `srun`
and `scontrol`, the JobSet manifest, a 2-process rehearsal through the plain launcher, and the
persistent compilation cache written on a first run and hit on a second."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from k2jax.training import cluster, compile_cache
from launch import gpu_flags
from tests.helpers import REPO, cli_env, fake_slurm, make_checkpoint, read_metrics

SLURM = {
  'SLURM_JOB_ID': '123456',
  'SLURM_STEP_NODELIST': 'gpu[017-020,031]',
  'SLURM_NTASKS': '5',
  'SLURM_PROCID': '3',
  'SLURM_LOCALID': '0',
  'SLURM_STEP_TASKS_PER_NODE': '1(x5)',
}


# --- layouts from fake environments --------------------------------------------------------


def test_slurm_one_process_per_node_sees_every_gpu():
  layout = cluster.detect(SLURM)
  # JAX's own port rule: job id % 4096 + 61440; the first host of the node list.
  assert layout == cluster.Layout('gpu017:62016', 5, 3, None, 'slurm')
  assert cluster.detect({**SLURM, 'K2JAX_COORDINATOR_PORT': '7777'}).coordinator == 'gpu017:7777'
  # Only the batch script's variables (no step): the job's node list.
  job = {k: v for k, v in SLURM.items() if k != 'SLURM_STEP_NODELIST'}
  assert cluster.detect({**job, 'SLURM_JOB_NODELIST': 'a7,b1'}).coordinator == 'a7:62016'


def test_slurm_one_process_per_gpu_takes_its_own():
  per_gpu = {**SLURM, 'SLURM_NTASKS': '16', 'SLURM_LOCALID': '5', 'SLURM_PROCID': '13'}
  per_gpu['SLURM_STEP_TASKS_PER_NODE'] = '8(x2)'
  assert cluster.detect(per_gpu).local_device_ids == (5,)
  # SLURM already narrowed the task to one GPU (--gpus-per-task=1): that one is ordinal 0.
  assert cluster.detect({**per_gpu, 'CUDA_VISIBLE_DEVICES': '5'}).local_device_ids is None
  # The explicit variable wins in every case.
  explicit = {**per_gpu, 'K2JAX_LOCAL_DEVICE_IDS': '0,1, 2,3'}
  assert cluster.detect(explicit).local_device_ids == (0, 1, 2, 3)


@pytest.mark.parametrize(
  'nodelist, first',
  [
    ('node001', 'node001'),
    ('node001,host2', 'node001'),
    ('gpu[017-020,031],cpu1', 'gpu017'),
    ('gpu[031,007-015]', 'gpu031'),
    ('rack[2-3]-gpu[08-09]', 'rack2-gpu08'),  # JAX 0.10.2 reads this as 'rack2'
  ],
)
def test_first_host_of_a_slurm_node_list(nodelist, first):
  assert cluster.first_host(nodelist) == first


def test_tasks_per_node_lists():
  assert cluster.max_tasks_per_node('8(x4),2') == 8
  assert cluster.max_tasks_per_node('1(x400)') == 1
  assert cluster.max_tasks_per_node('2,1') == 2


def test_plain_variables_win_and_go_together():
  plain = {'K2JAX_COORDINATOR': '10.0.0.1:1234', 'K2JAX_NUM_PROCESSES': '4'}
  layout = cluster.detect({**SLURM, **plain, 'K2JAX_PROCESS_ID': '2', 'K2JAX_INIT_TIMEOUT': '900'})
  assert layout == cluster.Layout('10.0.0.1:1234', 4, 2, None, 'env', init_timeout=900)
  with pytest.raises(ValueError, match='K2JAX_PROCESS_ID'):
    cluster.detect(plain)
  with pytest.raises(ValueError, match='process id 4 is not in 0..3'):
    cluster.detect({**plain, 'K2JAX_PROCESS_ID': '4'})
  with pytest.raises(ValueError, match='not host:port'):
    cluster.detect({**plain, 'K2JAX_COORDINATOR': '10.0.0.1', 'K2JAX_PROCESS_ID': '0'})
  with pytest.raises(ValueError, match='K2JAX_NUM_PROCESSES=.x. is not an integer'):
    cluster.detect({**plain, 'K2JAX_NUM_PROCESSES': 'x', 'K2JAX_PROCESS_ID': '0'})
  assert cluster.detect({'HOME': '/root', 'PATH': '/bin'}) is None


def test_kubernetes_coordinator_is_the_first_pod():
  pod = {
    'JOB_COMPLETION_INDEX': '3',
    'HOSTNAME': 'k2jax-workers-0-3',
    'K2JAX_SUBDOMAIN': 'k2jax',
    'K2JAX_NUM_PROCESSES': '400',
  }
  layout = cluster.detect(pod)
  assert layout == cluster.Layout('k2jax-workers-0-0.k2jax:1234', 400, 3, None, 'kubernetes')
  # A coordinator given outright (a plain Indexed Job with a Service of another name).
  named = {**pod, 'K2JAX_COORDINATOR': 'trainer-0.trainer-svc:6000'}
  assert cluster.detect(named).coordinator == 'trainer-0.trainer-svc:6000'
  with pytest.raises(ValueError, match='K2JAX_NUM_PROCESSES is not'):
    cluster.detect({k: v for k, v in pod.items() if k != 'K2JAX_NUM_PROCESSES'})
  with pytest.raises(ValueError, match='K2JAX_SUBDOMAIN'):
    cluster.detect({**pod, 'HOSTNAME': 'some-pod-xyz'})


def test_the_jobset_manifest_gives_each_pod_its_layout():
  yaml = pytest.importorskip('yaml')  # PyYAML is pinned in constraints.txt
  with open(os.path.join(REPO, 'launch/k8s/jobset.yaml')) as f:
    jobset = yaml.safe_load(f)
  assert jobset['kind'] == 'JobSet' and jobset['spec']['network']['enableDNSHostnames']
  (workers,) = jobset['spec']['replicatedJobs']
  assert workers['replicas'] == 1
  job = workers['template']['spec']
  assert job['completionMode'] == 'Indexed' and job['parallelism'] == job['completions']
  (container,) = job['template']['spec']['containers']
  assert container['command'] == ['launch/run.sh']
  assert container['resources']['limits']['nvidia.com/gpu'] == 8
  assert {a.split('=')[0] for a in container['args']} >= {'--config', '--workdir'}
  env = {}
  for var in container['env']:
    if 'value' in var:
      env[var['name']] = var['value']
    else:  # the downward API: the JobSet's name label
      assert 'jobset.sigs.k8s.io/jobset-name' in var['valueFrom']['fieldRef']['fieldPath']
      env[var['name']] = jobset['metadata']['name']
  assert int(env['K2JAX_NUM_PROCESSES']) == job['parallelism']
  assert env['K2JAX_GPU_PRESET'] in gpu_flags.PRESETS
  name, count = jobset['metadata']['name'], job['parallelism']
  for index in range(count):  # the pod hostnames JobSet gives: <jobset>-<rjob>-<job>-<pod>
    pod = {**env, 'JOB_COMPLETION_INDEX': str(index), 'HOSTNAME': f'{name}-workers-0-{index}'}
    layout = cluster.detect(pod)
    assert (layout.process_id, layout.num_processes) == (index, count)
    assert layout.coordinator == f'{name}-workers-0-0.{name}:1234'
  assert container['ports'][0]['containerPort'] == 1234


# --- GPU flags against the pinned jaxlib ---------------------------------------------------


def start_jax(xla_flags: str):
  code = 'import jax; print(float(jax.numpy.ones(2).sum()))'
  env = cli_env(XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu')
  return subprocess.run(
    [sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120
  )


@pytest.mark.parametrize('preset', gpu_flags.PRESETS)
def test_every_shipped_xla_flag_is_accepted(preset):
  """XLA parses every flag (GPU ones too) when its first backend starts, and aborts on one it
  does not know: the CPU jaxlib of the same version checks the GPU presets."""
  flags = gpu_flags.environment(preset, fabric='ndv5')['XLA_FLAGS']
  assert flags.count('--xla_') == len(gpu_flags.XLA_FLAGS)
  result = start_jax(flags)
  assert result.returncode == 0 and result.stdout.strip() == '2.0', result.stderr[-2000:]


def test_a_removed_xla_flag_is_rejected():
  """The check above can fail: a flag of older recipes that this jaxlib no longer knows."""
  result = start_jax('--xla_gpu_graph_level=0')
  assert result.returncode != 0 and 'Unknown flag in XLA_FLAGS' in result.stderr


def test_gpu_flags_command_prints_shell_exports():
  out = subprocess.run(
    [sys.executable, '-m', 'launch.gpu_flags', 'h100', '--fabric=ndv5'],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert "export XLA_FLAGS='--xla_gpu_enable_latency_hiding_scheduler=true" in out
  assert '--xla_gpu_all_gather_combine_threshold_bytes=1073741824' in out  # the H100 value
  assert 'export NCCL_TOPO_FILE=/opt/microsoft/ndv5-topo.xml' in out
  with pytest.raises(ValueError, match='unknown GPU preset'):
    gpu_flags.xla_flags('a100')


# --- the SLURM script with a fake srun / scontrol --------------------------------------------


def sbatch_args(workdir):
  return ['configs/pretrain.py', str(workdir), '--config.seed=3']


def test_slurm_script_starts_one_process_per_node_and_requeues_an_unfinished_run(tmp_path):
  workdir = tmp_path / 'run'
  result, calls = fake_slurm(tmp_path, sbatch_args(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  logs = workdir / 'logs' / '4242-0'
  for node in range(2):
    text = (logs / f'node-{node}.log').read_text()
    assert f'layout: process {node} of 2 (slurm), coordinator gpu001:' in text, text
    assert 'all local devices' in text  # not the one GPU JAX's SLURM detection gives
    assert '--xla_gpu_enable_latency_hiding_scheduler=true' in text  # the h200 preset
    assert (
      f'command: {sys.executable} -m k2jax.train --distributed --config=configs/pretrain.py '
      f'--workdir={workdir} --config.seed=3'
    ) in text
  # Nothing was trained (dry run): steps are left, so the job goes back in the queue.
  assert calls == ['requeue 4242'] and 'requeueing' in result.stdout
  # The whole job as a dry run (docs/multihost.md) requeues nothing.
  result, calls = fake_slurm(tmp_path, sbatch_args(workdir), K2JAX_DRY_RUN='1')
  assert result.returncode == 0 and 'dry run' in result.stdout and calls == ['requeue 4242']


def test_slurm_script_leaves_a_finished_run_alone(tmp_path):
  workdir = tmp_path / 'run'
  cfg = make_checkpoint(workdir)  # step 2 of total_steps 2
  assert cfg.total_steps == 2
  finished = subprocess.run(
    [sys.executable, '-m', 'launch.finished', str(workdir)],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert finished.returncode == 0 and 'finished, step 2 of 2' in finished.stdout
  result, calls = fake_slurm(tmp_path, sbatch_args(workdir), K2JAX_GPU_PRESET='none')
  assert result.returncode == 0, result.stderr[-3000:]
  assert calls == []


def test_run_sh_reports_a_bad_layout_before_starting(tmp_path):
  env = cli_env(
    K2JAX_DRY_RUN='1', PYTHON=sys.executable, K2JAX_COORDINATOR='h:1', K2JAX_NUM_PROCESSES='2'
  )
  result = subprocess.run(
    ['launch/run.sh', '--config=configs/pretrain.py:debug', f'--workdir={tmp_path}'],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2 and 'set all three' in result.stderr


# --- a 2-process rehearsal on this machine, and the compilation cache ---------------------------

TINY_RUN = (
  '--config=configs/pretrain.py:debug',
  '--config.model.num_layers=1',
  '--config.data.seq_len=32',
  '--config.data.global_batch_size=8',
  '--config.total_steps=2',
  '--config.optim.warmup_steps=1',
  '--config.log_every=1',
  '--config.eval_every=0',
  '--config.checkpoint.every=2',
)


@pytest.mark.slow  # two processes compile on two CPU cores: ~25 s of CPU
def test_two_process_rehearsal_through_the_plain_launcher_stops_together_on_sigterm(tmp_path):
  """launch.local starts 2 processes (4 CPU devices each) through launch/run.sh; SIGTERM to the
  launcher reaches both, which stop at one agreed step, save it and exit 0 (JAX's preemption
  service, as under SLURM's --signal); launch.finished then says steps are left."""
  workdir = tmp_path / 'rehearsal'
  command = [
    sys.executable,
    '-m',
    'launch.local',
    '--processes=2',
    '--cpu_devices=4',
    f'--log_dir={tmp_path / "logs"}',
    '--',
    *TINY_RUN,
    '--config.total_steps=1000',
    '--config.checkpoint.every=1000',
    f'--workdir={workdir}',
  ]
  process = subprocess.Popen(
    command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  lines = []
  for line in process.stdout:  # train until process 0 has logged step 3
    lines.append(line)
    if re.match(r'\[0\] step +3/1000', line):
      process.send_signal(signal.SIGTERM)
      break
  lines += process.stdout.readlines()
  out = ''.join(lines)
  assert process.wait(timeout=300) == 0, out[-4000:]
  stops = set(re.findall(r'^\[\d\] stopped at step (\d+) of 1000, checkpoint saved', out, re.M))
  assert len(stops) == 1, out[-4000:]  # both processes, the same step
  (stop,) = map(int, stops)
  for index in range(2):
    log = (tmp_path / 'logs' / f'process-{index}.log').read_text()
    assert f'process {index} of 2 (env), coordinator 127.0.0.1:' in log, log[-2000:]
    assert f'stopped at step {stop} of 1000' in log
  assert '8 cpu device(s) over 2 process(es)' in out
  assert [r['step'] for r in read_metrics(workdir) if 'loss' in r] == list(range(1, stop + 1))
  data = workdir / 'checkpoints' / str(stop) / 'data'
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(os.listdir(data))
  finished = subprocess.run(
    [sys.executable, '-m', 'launch.finished', str(workdir)], cwd=REPO, capture_output=True
  )
  assert finished.returncode == 1  # what makes the SLURM script requeue


def test_launch_local_checks_its_arguments():
  result = subprocess.run(
    [sys.executable, '-m', 'launch.local', '--processes=3', '--gpus=8', '--', '--config=x'],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2 and 'does not split evenly over 3' in result.stderr


def test_compile_cache_settings(tmp_path):
  env = {'JAX_COMPILATION_CACHE_DIR': '/suite'}
  assert compile_cache.resolve('auto', 'w', {}) == os.path.abspath('w/compile_cache')
  assert compile_cache.resolve('auto', 'w', env) == '/suite'
  assert compile_cache.resolve('auto', 'w', {**env, 'K2JAX_COMPILE_CACHE_DIR': '/l'}) == '/l'
  assert compile_cache.resolve('off', 'w', env) is None
  assert compile_cache.resolve(str(tmp_path), 'w', env) == str(tmp_path)
  with pytest.raises(ValueError, match='compile_cache_dir'):
    compile_cache.resolve(3, 'w', env)


NO_SAVES = ('--config.checkpoint.every=0',)  # Orbax's save compiles ~70 small programs


def test_compile_cache_is_written_then_hit(tmp_path):
  """The first run writes the compiled train step under its workdir; a second run (a restart
  of the same stage elsewhere) reads it back instead of compiling."""
  env = cli_env()
  for name in ('JAX_COMPILATION_CACHE_DIR', 'K2JAX_COMPILE_CACHE_DIR'):
    env.pop(name, None)  # not the test suite's cache: the run's own default
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'  # every program: the same set hits

  def train(workdir, *extra):
    result = subprocess.run(
      [sys.executable, '-m', 'k2jax.train', *TINY_RUN, *NO_SAVES, f'--workdir={workdir}', *extra],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [x for x in result.stdout.splitlines() if 'compilation cache' in x]
    return line

  cache = tmp_path / 'first' / 'compile_cache'
  first = train(tmp_path / 'first')
  assert first.startswith(f'k2jax: compilation cache {cache}: 0 hits,'), first
  written = int(re.search(r'(\d+) written', first).group(1))
  entries = os.listdir(cache)
  assert written == len(entries) and any(e.startswith('jit_train_step-') for e in entries)
  second = train(tmp_path / 'second', f'--config.compile_cache_dir={cache}')
  hits = int(re.search(r'(\d+) hits?', second).group(1))
  assert hits == written and ', 0 written' in second and 's of compiling saved' in second
  assert os.listdir(cache) == entries
  assert json.loads((tmp_path / 'second' / 'config.json').read_text())['compile_cache_dir'] == (
    str(cache)
  )


@pytest.mark.slow  # the attention script, the planner and a short training: ~20 s of CPU
def test_gpu_check_dry_run():
  """launch/gpu_check.py's code path on a CPU: every phase runs and the comparison is printed."""
  result = subprocess.run(
    [sys.executable, '-m', 'launch.gpu_check', '--dry_run'],
    cwd=REPO,
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  out = result.stdout
  assert result.returncode == 0, (out + result.stderr)[-4000:]
  assert re.search(r'128 +causal +pallas', out) and 'attention: ' in out
  assert '1b: ' in out and 'too large' in out and 'debug: ' in out  # chosen by the planner
  measured = re.search(r'measured  \(cpu\): ([\d,]+) tokens/s, MFU [\d.]+%', out)
  assert measured and int(measured.group(1).replace(',', '')) > 0, out[-2000:]
  assert re.search(r'planned   \(H200 roofline\): [\d,]+ tokens/s, MFU [\d.]+%, memory', out)


def test_run_sh_passes_sigterm_on_and_reports_an_unfinished_stage(tmp_path):
  """Kubernetes mode (K2JAX_EXIT_UNFINISHED): run.sh stays the container's first process, hands
  SIGTERM to the trainer, and exits 75 when the trainer stopped with steps left, so the JobSet
  restarts the pods. The trainer here is a stand-in that exits 0 on SIGTERM, as k2jax.train
  does after saving."""
  python = tmp_path / 'python'
  python.write_text(
    '#!/bin/bash\n'
    'if [[ "$2" == k2jax.train ]]; then\n'
    "  trap 'echo trainer: SIGTERM; exit 0' TERM\n"
    '  echo trainer: started\n'
    '  while true; do sleep 0.1; done\n'
    'fi\n'
    f'exec {sys.executable} "$@"\n'
  )
  python.chmod(0o755)
  env = cli_env(
    PYTHON=str(python),
    K2JAX_EXIT_UNFINISHED='75',
    K2JAX_COORDINATOR='127.0.0.1:1',
    K2JAX_NUM_PROCESSES='1',
    K2JAX_PROCESS_ID='0',
  )
  process = subprocess.Popen(
    ['launch/run.sh', '--config=configs/pretrain.py:debug', f'--workdir={tmp_path / "run"}'],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  assert process.stdout.readline().strip() == 'trainer: started'
  process.send_signal(signal.SIGTERM)
  out = process.stdout.read()
  assert process.wait(timeout=60) == 75, out
  assert 'trainer: SIGTERM' in out and 'not finished' in out
