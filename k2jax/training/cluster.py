"""Who is who in a multi-process run: coordinator, process count, process id, local devices.

`detect(environ)` turns a scheduler's environment into a `Layout` for `jax.distributed`, in this
order (the first that is present wins):

1. plain variables, set by `launch/` or by hand for any scheduler: `K2JAX_COORDINATOR=host:port`,
   `K2JAX_NUM_PROCESSES`, `K2JAX_PROCESS_ID` (all three, or none);
2. SLURM (inside `srun`): id `SLURM_PROCID`, count `SLURM_NTASKS`, coordinator the first host of
   `SLURM_STEP_NODELIST` (or `SLURM_JOB_NODELIST`) on port `K2JAX_COORDINATOR_PORT`, else
   `SLURM_JOB_ID % 4096 + 61440` as JAX picks it;
3. a Kubernetes Indexed Job or JobSet: id `JOB_COMPLETION_INDEX`, count `K2JAX_NUM_PROCESSES`
   (Kubernetes does not tell a pod its job's parallelism), coordinator `K2JAX_COORDINATOR` or
   the job's first pod: this pod's `HOSTNAME` with its index replaced by 0, in
   `K2JAX_SUBDOMAIN` (the JobSet's name, or the Indexed Job's headless Service).

Why not JAX's own auto-detection: under SLURM it gives each process one GPU
(`local_device_ids=[SLURM_LOCALID]`) even when the process runs alone on an 8-GPU node, its
Kubernetes path needs the `kubernetes` package and API access, and its hostlist parser reads
`rack[1-2]-gpu[01-08]` as `rack1`. Here one process per node sees all its GPUs; with several
tasks per node (one per GPU) each takes `[SLURM_LOCALID]`, unless SLURM already narrowed the
task's visible GPUs to one (`--gpus-per-task=1`), where the ordinal would be wrong. The
`K2JAX_LOCAL_DEVICE_IDS=0,1,...` variable overrides the local devices in every case.

Pure functions of a mapping: tests pass fake environments, no scheduler needed.
"""

import dataclasses
import re
from collections.abc import Mapping

PREFIX = 'K2JAX_'
COORDINATOR = 'K2JAX_COORDINATOR'
NUM_PROCESSES = 'K2JAX_NUM_PROCESSES'
PROCESS_ID = 'K2JAX_PROCESS_ID'
LOCAL_DEVICE_IDS = 'K2JAX_LOCAL_DEVICE_IDS'
COORDINATOR_PORT = 'K2JAX_COORDINATOR_PORT'
SUBDOMAIN = 'K2JAX_SUBDOMAIN'
INIT_TIMEOUT = 'K2JAX_INIT_TIMEOUT'  # seconds all processes have to join (JAX's default: 300)

KUBERNETES_PORT = 1234  # the coordinator's port in the first pod unless K2JAX_COORDINATOR_PORT


@dataclasses.dataclass(frozen=True)
class Layout:
  coordinator: str  # host:port of process 0
  num_processes: int
  process_id: int
  local_device_ids: tuple[int, ...] | None  # None: every device the process sees
  source: str  # where it came from: 'flags', 'env', 'slurm', 'kubernetes'
  init_timeout: int = 300

  def describe(self) -> str:
    devices = (
      'all local devices'
      if self.local_device_ids is None
      else (f'local devices {",".join(map(str, self.local_device_ids))}')
    )
    return (
      f'process {self.process_id} of {self.num_processes} ({self.source}), '
      f'coordinator {self.coordinator}, {devices}'
    )


def detect(environ: Mapping[str, str]) -> Layout | None:
  """The layout the environment describes, or None if it names no multi-process run."""
  for source, read in (('env', _plain), ('slurm', _slurm), ('kubernetes', _kubernetes)):
    found = read(environ)
    if found is not None:
      coordinator, count, index, local = found
      return make(coordinator, count, index, local, source, environ)
  return None


def make(coordinator, num_processes, process_id, local_device_ids, source, environ) -> Layout:
  """A checked Layout; K2JAX_LOCAL_DEVICE_IDS and K2JAX_INIT_TIMEOUT in `environ` apply."""
  if LOCAL_DEVICE_IDS in environ:
    local_device_ids = parse_device_ids(environ[LOCAL_DEVICE_IDS], LOCAL_DEVICE_IDS)
  host, sep, port = str(coordinator).rpartition(':')
  if not sep or not host or not port.isdigit():
    raise ValueError(f'{source}: coordinator {coordinator!r} is not host:port')
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(
      f'{source}: process id {process_id} is not in 0..{num_processes - 1} '
      f'(process count {num_processes})'
    )
  return Layout(
    coordinator=coordinator,
    num_processes=num_processes,
    process_id=process_id,
    local_device_ids=None if local_device_ids is None else tuple(local_device_ids),
    source=source,
    init_timeout=_int(environ, INIT_TIMEOUT) if INIT_TIMEOUT in environ else 300,
  )


def parse_device_ids(text: str, name: str) -> tuple[int, ...]:
  """'0,1,2,3' -> (0, 1, 2, 3)."""
  parts = [p.strip() for p in text.split(',') if p.strip()]
  if not parts or not all(p.isdigit() for p in parts):
    raise ValueError(f'{name}={text!r} is not a comma-separated list of device ordinals')
  return tuple(int(p) for p in parts)


def _int(environ, name: str) -> int:
  value = environ[name].strip()
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} is not an integer') from None


def _plain(environ):
  names = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)
  given = [n for n in names if environ.get(n, '')]
  if not given:
    return None
  if len(given) != len(names):
    # Under Kubernetes the id comes from the job: K2JAX_PROCESS_ID may be left out.
    if PROCESS_ID not in given and 'JOB_COMPLETION_INDEX' in environ:
      return None
    missing = ', '.join(n for n in names if n not in given)
    raise ValueError(f'{", ".join(given)} set but not {missing}: set all three')
  return environ[COORDINATOR], _int(environ, NUM_PROCESSES), _int(environ, PROCESS_ID), None


def _slurm(environ):
  nodelist = environ.get('SLURM_STEP_NODELIST') or environ.get('SLURM_JOB_NODELIST')
  if not (nodelist and 'SLURM_PROCID' in environ and 'SLURM_NTASKS' in environ):
    return None
  port = (
    _int(environ, COORDINATOR_PORT)
    if COORDINATOR_PORT in environ
    else (_int(environ, 'SLURM_JOB_ID') % 4096 + 61440)
  )
  coordinator = f'{first_host(nodelist)}:{port}'
  count, index = _int(environ, 'SLURM_NTASKS'), _int(environ, 'SLURM_PROCID')
  local = None  # one process per node: every GPU of the node
  tasks_per_node = environ.get('SLURM_STEP_TASKS_PER_NODE') or environ.get(
    'SLURM_TASKS_PER_NODE', '1'
  )
  if max_tasks_per_node(tasks_per_node) > 1:
    visible = environ.get('CUDA_VISIBLE_DEVICES', '')
    if not visible or ',' in visible:  # several GPUs visible: pick this task's own
      local = (_int(environ, 'SLURM_LOCALID'),)
  return coordinator, count, index, local


def _kubernetes(environ):
  if 'JOB_COMPLETION_INDEX' not in environ:
    return None
  index = _int(environ, 'JOB_COMPLETION_INDEX')
  if not environ.get(NUM_PROCESSES):
    raise ValueError(
      f'JOB_COMPLETION_INDEX is set (Kubernetes Indexed Job) but {NUM_PROCESSES} is not: '
      "set it to the job's parallelism"
    )
  count = _int(environ, NUM_PROCESSES)
  coordinator = environ.get(COORDINATOR, '')
  if not coordinator:
    hostname, subdomain = environ.get('HOSTNAME', ''), environ.get(SUBDOMAIN, '')
    suffix = f'-{index}'
    if not hostname.endswith(suffix) or not subdomain:
      raise ValueError(
        f'Kubernetes: cannot name the first pod from HOSTNAME={hostname!r} and '
        f'{SUBDOMAIN}={subdomain!r}: set {SUBDOMAIN} to the JobSet name (or the headless '
        f'Service of the Indexed Job), or {COORDINATOR}=host:port'
      )
    port = _int(environ, COORDINATOR_PORT) if COORDINATOR_PORT in environ else KUBERNETES_PORT
    coordinator = f'{hostname[: -len(suffix)]}-0.{subdomain}:{port}'
  return coordinator, count, index, None


def first_host(nodelist: str) -> str:
  """The first host of a SLURM hostlist: 'gpu[017-020,031],cpu1' -> 'gpu017',
  'rack[2-3]-gpu[08-09]' -> 'rack2-gpu08' (SLURM lists ranges in order)."""
  depth, end = 0, len(nodelist)
  for i, ch in enumerate(nodelist):  # the first top-level comma ends the first entry
    depth += {'[': 1, ']': -1}.get(ch, 0)
    if ch == ',' and depth == 0:
      end = i
      break
  entry = nodelist[:end].strip()
  if not entry or entry.count('[') != entry.count(']'):
    raise ValueError(f'SLURM node list {nodelist!r} cannot be parsed')
  # Each [a-b,c] group becomes its first value (zero padding kept).
  return re.sub(r'\[([^\]]*)\]', lambda m: re.split(r'[-,]', m.group(1))[0], entry)


def max_tasks_per_node(spec: str) -> int:
  """SLURM's tasks-per-node list, '8(x4),2' -> 8."""
  counts = [int(m.group(1)) for m in re.finditer(r'(\d+)(?:\(x\d+\))?', spec)]
  return max(counts, default=1)
