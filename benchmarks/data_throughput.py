"""Input-pipeline throughput on one CPU core: tokens/s of packed batches from `pipeline.build`.

`python benchmarks/data_throughput.py [--seconds=5 --seq_len=8192 --batch=<64K tokens>]
    [--copies=8 --join=1 --core=<first>] [--only=CASE,...] [--profile] [--output=table|json]`

The corpus is the bundled demo (data_pipeline/demo/train.jsonl) written `--copies` times as
separate JSONL files, and the demo SFT conversations (demo/sft/train.parquet). The parent
prepares both once with data_pipeline.prepare (not part of the timed cases; its own tokens/s
is printed as extra information), then runs each case in its own subprocess pinned to one
core with `data.worker_count=0`, so a figure is what one core delivers:

  (a) prepared ArrayRecord -> packed batches, 'concat' and 'best_fit'   goal: >= 10x host need
  (b) raw JSONL tokenized on the fly, 'concat', SentencePiece and HF tokenizer.json
  (c) SFT chat (format 'chat', 'best_fit'): rendered on the fly vs prepared

tokens/s = timed batches x batch x seq_len / seconds, after one untimed warm-up batch. Padding
('best_fit') counts as tokens, as it does on the accelerator; the pad column says how much.

`--streaming` prints the streaming and distributed-preparation rows instead (issue 14), on a
generated corpus of 1K-token documents (the demo's, 8 joined into one) in JSONL files, with the
HF tokenizer.json (the kind K2-V2 ships), unpinned since workers need cores of their own:

  (d) data.stream=True -> 'concat' batches, data.worker_count 0, 1 and 2: tokens/s per host
      against the 8.8K tokens/s a 70B host consumes
  (e) peak host memory (max RSS of the trainer process; (d) gives a worker's) when
      streaming a `--big_mb` corpus (1024) against a `--small_mb` one (20): goal, within 300 MB;
      the in-memory reader on both for contrast
  (f) data_pipeline.prepare tokens/s: local engine with 1 and 2 processes, Ray with 2 local
      workers (its start-up timed apart), and the core-hours that makes for TxT360's 8.6T tokens
"""

import argparse
import cProfile
import glob
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.join(REPO, 'data_pipeline', 'demo')
SP_TOKENIZER = os.path.join(DEMO_DIR, 'tokenizer.model')
HF_TOKENIZER = os.path.join(DEMO_DIR, 'tokenizer.json')
TEXT_FILE = os.path.join(DEMO_DIR, 'train.jsonl')
SFT_FILE = os.path.join(DEMO_DIR, 'sft', 'train.parquet')

# The reference: a 70B model trained at MaxText-class speed consumes ~1,100 tokens/s
# per GPU (6 x 70e9 x 1,100 = 4.6e14 FLOP/s, ~47% MFU of an H100's bf16 peak), so an 8-GPU
# host needs ~8.8K tokens/s. The goal for the prepared path is 10x that from a single core,
# which leaves the host's other cores (and headroom for longer-document corpora) to spare.
NEED_PER_GPU = 1_100
GPUS_PER_HOST = 8
NEED_PER_HOST = NEED_PER_GPU * GPUS_PER_HOST
GOAL_FACTOR = 10
GOAL = GOAL_FACTOR * NEED_PER_HOST
BATCH_TOKENS = 65_536  # default batch: this many tokens per batch at any seq_len

# key: (group, label, source, packing, tokenizer). Sources: see `corpus_paths`.
CASES = {
  'prepared-concat': ('a', 'prepared text, concat', 'prepared_text', 'concat', SP_TOKENIZER),
  'prepared-best_fit': ('a', 'prepared text, best_fit', 'prepared_text', 'best_fit', SP_TOKENIZER),
  'jsonl-sp-concat': ('b', 'JSONL + SentencePiece, concat', 'jsonl', 'concat', SP_TOKENIZER),
  'jsonl-hf-concat': ('b', 'JSONL + HF tokenizer.json, concat', 'jsonl', 'concat', HF_TOKENIZER),
  'chat-best_fit': (
    'c',
    'SFT parquet, chat on the fly, best_fit',
    'parquet_chat',
    'best_fit',
    SP_TOKENIZER,
  ),
  'prepared-chat-best_fit': (
    'c',
    'prepared chat, best_fit',
    'prepared_chat',
    'best_fit',
    SP_TOKENIZER,
  ),
}
SYSTEM_PROMPT_PROB = 0.1  # configs/base.py's, on both chat paths


def corpus_paths(workdir: str) -> dict[str, str]:
  return {
    'jsonl': os.path.join(workdir, 'text', 'part-*.jsonl'),
    'prepared_text': os.path.join(workdir, 'prepared_text'),
    'parquet_chat': SFT_FILE,
    'prepared_chat': os.path.join(workdir, 'prepared_chat'),
  }


def pin(core: int) -> None:
  """Pins this process (and the threads it starts later, e.g. Grain's reader) to one core."""
  os.sched_setaffinity(0, [core])


def busy_cpu_seconds() -> float:
  """CPU seconds every process on the machine has used (from /proc/stat)."""
  with open('/proc/stat') as f:
    fields = [int(x) for x in f.readline().split()[1:]]
  user, nice, system, _, _, irq, softirq, steal = fields[:8]
  return (user + nice + system + irq + softirq + steal) / os.sysconf('SC_CLK_TCK')


class Meter:
  """Wall time, this process's CPU share and other processes' cores over a stretch of work."""

  def __init__(self):
    self.wall, self.own, self.busy = time.perf_counter(), sum(os.times()[:2]), busy_cpu_seconds()

  def read(self) -> dict:
    wall = time.perf_counter() - self.wall
    own = sum(os.times()[:2]) - self.own
    others = max(0.0, busy_cpu_seconds() - self.busy - own) / wall
    return {'seconds': wall, 'own_cpu': own / wall, 'other_cores': others}


# --- corpus (parent) ---------------------------------------------------------------


def write_joined(source: str, target: str, join: int) -> None:
  """Rewrites a JSONL corpus with every `join` consecutive documents made one.

  The demo's documents are short (~130 tokens); web documents run to a thousand tokens or
  more, and much of the pipeline's cost is per document, so this shows the longer-document case.
  """
  with open(source) as f:
    texts = [json.loads(line)['text'] for line in f]
  with open(target, 'w') as f:
    f.writelines(
      json.dumps({'text': '\n\n'.join(texts[i : i + join])}) + '\n'
      for i in range(0, len(texts), join)
    )


def make_corpus(args, workdir: str) -> dict:
  """Writes the JSONL copies and prepares text and chat; returns what preparation measured."""
  from data_pipeline import prepare

  paths = corpus_paths(workdir)
  os.makedirs(os.path.join(workdir, 'text'))
  # Several files, as a real corpus has: one prepared shard each.
  for i in range(args.copies):
    target = os.path.join(workdir, 'text', f'part-{i:02d}.jsonl')
    if args.join == 1:
      shutil.copy(TEXT_FILE, target)
    else:
      write_joined(TEXT_FILE, target, args.join)
  requests = {
    'prepared_text': prepare.Request(
      inputs=tuple(sorted(glob.glob(paths['jsonl']))), tokenizer=SP_TOKENIZER
    ),
    # As the on-the-fly path renders them: cut to seq_len, same system-prompt chance.
    'prepared_chat': prepare.Request(
      inputs=(SFT_FILE,),
      tokenizer=SP_TOKENIZER,
      format='chat',
      field='conversations',
      max_len=args.seq_len,
      system_prompt_prob=SYSTEM_PROMPT_PROB,
    ),
  }
  measured = {}
  for name, request in requests.items():
    meter = Meter()
    manifest = prepare.prepare(request, paths[name], workers=1, progress=False)
    measured[name] = dict(
      tokens=manifest['tokens'],
      documents=manifest['documents'],
      shards=len(manifest['shards']),
      **meter.read(),
    )
  return measured


# --- one case (worker) --------------------------------------------------------------


def data_cfg(args, case: str, workdir: str):
  import ml_collections

  _, _, source, packing, tokenizer = CASES[case]
  return ml_collections.ConfigDict(
    {
      'seq_len': args.seq_len,
      'global_batch_size': args.batch,
      'train_files': corpus_paths(workdir)[source],
      'eval_files': '',
      'tokenizer': tokenizer,
      'format': 'chat' if source == 'parquet_chat' else 'text',
      'text_field': 'text',
      'chat_field': 'conversations',
      'chat': ml_collections.ConfigDict({'system_prompt_prob': SYSTEM_PROMPT_PROB}),
      'worker_count': 0,
      'packing': packing,
    }
  )


def run_case(args, case: str, workdir: str) -> dict:
  from data_pipeline import pipeline

  if args.profile:
    # cProfile sees one thread: read documents in the main thread instead of Grain's reader.
    import grain

    pipeline._READ_OPTIONS = grain.ReadOptions(num_threads=0)
  cfg = data_cfg(args, case, workdir)
  start = time.perf_counter()
  batches = pipeline.build(cfg, seed=0, split='train')
  next(batches)  # warm-up: opens the shards, starts the reader thread, fills a first window
  startup = time.perf_counter() - start
  stats = pipeline.packing_stats(batches)
  before = (stats.pad_tokens, stats.segments) if stats else (0, 0)
  # CPU time, not wall: on a shared core, waiting would be charged to whatever was running.
  profiler = cProfile.Profile(time.thread_time) if args.profile else None
  if profiler:
    profiler.enable()
  meter, targets = Meter(), []
  deadline = time.perf_counter() + args.seconds
  while time.perf_counter() < deadline:
    targets.append(next(batches)['targets'])  # kept to count documents after the clock stops
  timing = meter.read()
  if profiler:
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats('tottime').print_stats(args.profile_lines)
    sys.stderr.write(f'\n=== cProfile of {case}, by own time ===\n{text.getvalue()}')
  tokens = len(targets) * args.batch * args.seq_len
  if stats:  # packed rows: one segment per document (or per piece of one over seq_len)
    pad, documents = stats.pad_tokens - before[0], stats.segments - before[1]
  else:  # concat: every text document ends with EOD (to within one per row)
    eod = pipeline.tokenizer_for(cfg).eos_id
    pad, documents = 0, sum(int((t == eod).sum()) for t in targets)
  return dict(
    case=case,
    batches=len(targets),
    tokens=tokens,
    tokens_per_s=tokens / timing['seconds'],
    tokens_per_cpu_s=tokens / (timing['own_cpu'] * timing['seconds']),
    pad_fraction=pad / tokens,
    documents_per_s=documents / timing['seconds'],
    tokens_per_document=(tokens - pad) / max(documents, 1),
    startup_s=startup,
    **timing,
  )


# --- parent -------------------------------------------------------------------------


def run_worker(args, case: str, workdir: str) -> dict:
  argv = [
    sys.executable,
    os.path.abspath(__file__),
    f'--worker={case}',
    f'--workdir={workdir}',
    f'--seconds={args.seconds}',
    f'--seq_len={args.seq_len}',
    f'--batch={args.batch}',
    f'--core={args.core}',
    f'--profile_lines={args.profile_lines}',
    *(['--profile'] if args.profile else []),
  ]
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, check=False)
  if proc.returncode or args.profile:
    sys.stderr.write(proc.stderr)
  if proc.returncode:
    raise SystemExit(f'{case} failed with exit code {proc.returncode}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def versions() -> str:
  from importlib import metadata

  return ', '.join(
    f'{p} {metadata.version(p)}' for p in ('grain', 'array_record', 'sentencepiece', 'tokenizers')
  )


def report(args, prepared: dict, results: list[dict], load: tuple) -> None:
  text, chat = prepared['prepared_text'], prepared['prepared_chat']
  joined = f', {args.join} documents joined into one' if args.join > 1 else ''
  print(
    f'corpus: demo train.jsonl{joined} x {args.copies} files = {text["documents"]:,} docs, '
    f'{text["tokens"]:,} tokens (SentencePiece, {text["tokens"] / text["documents"]:.0f} '
    f'tokens/doc); SFT train.parquet = {chat["documents"]:,} chat samples, '
    f'{chat["tokens"]:,} tokens'
  )
  print(
    f'batches: {args.batch} x {args.seq_len} = {args.batch * args.seq_len:,} tokens; '
    f'data.worker_count=0, process pinned to core {args.core}; {args.seconds:g} s per case '
    f'after 1 warm-up batch; each case in its own process'
  )
  print(
    f'reference: 70B at MaxText-class speed needs ~{NEED_PER_GPU:,} tokens/s per GPU = '
    f'{NEED_PER_HOST:,} per {GPUS_PER_HOST}-GPU host; goal for (a): >= {GOAL_FACTOR}x = '
    f'{GOAL:,} tokens/s per core'
  )
  before, after = (' '.join(f'{x:.2f}' for x in avg) for avg in load)
  print(f'load average (1/5/15 min) before / after: {before} / {after}; {versions()}')
  print()
  print(
    f'{"":3}{"case":<42}{"tokens/s":>11}{"x host":>8}{"goal":>6}{"pad":>7}{"docs/s":>8}'
    f'{"tok/doc":>8}{"own cpu":>9}{"others":>8}{"per cpu-s":>11}{"startup":>9}'
  )
  for r in results:
    group, label = CASES[r['case']][:2]
    goal = ('yes' if r['tokens_per_s'] >= GOAL else 'NO') if group == 'a' else ''
    print(
      f'{f"({group})":<3}{label:<42}{r["tokens_per_s"]:>11,.0f}'
      f'{r["tokens_per_s"] / NEED_PER_HOST:>7.1f}x{goal:>6}{r["pad_fraction"]:>7.1%}'
      f'{r["documents_per_s"]:>8,.0f}{r["tokens_per_document"]:>8.0f}{r["own_cpu"]:>9.0%}'
      f'{r["other_cores"]:>8.2f}{r["tokens_per_cpu_s"]:>11,.0f}{r["startup_s"]:>8.1f}s'
    )
  for name, label in (
    ('prepared_text', 'prepare text (offline, 1 worker)'),
    ('prepared_chat', 'prepare chat (offline, 1 worker)'),
  ):
    p = prepared[name]
    rate = p['tokens'] / p['seconds']
    print(
      f'{"":3}{label:<42}{rate:>11,.0f}{rate / NEED_PER_HOST:>7.1f}x{"":>6}{"":>7}'
      f'{p["documents"] / p["seconds"]:>8,.0f}{p["tokens"] / p["documents"]:>8.0f}'
      f'{p["own_cpu"]:>9.0%}{p["other_cores"]:>8.2f}'
      f'{p["tokens"] / (p["own_cpu"] * p["seconds"]):>11,.0f}'
    )
  print(
    f'(x host: tokens/s / {NEED_PER_HOST:,}; pad: share of the batch slots that are padding; '
    f'docs/s, tok/doc: documents (chat: samples) per second and their mean length; own cpu: '
    f'CPU time / wall on the pinned core; others: cores that other processes kept busy '
    f'meanwhile; per cpu-s: tokens per second of own CPU time, what the core would give '
    f'undisturbed; startup: build + warm-up batch, not in tokens/s)'
  )
  if any(r['own_cpu'] < 0.9 for r in results):
    print(
      'WARNING: a case got less than 90% of its core (other processes shared it): its '
      'tokens/s is low; per cpu-s is the better estimate, or rerun on an idle machine'
    )
  if args.profile:
    print('NOTE: --profile was on; cProfile slows Python code, so these figures are low')


# --- streaming and preparation engines (--streaming) --------------------------------------

TXT360_TOKENS = 8.6e12
MEMORY_GOAL_MB = 300
STREAM_JOIN = 8  # demo documents per generated document: ~1K tokens, web-like


def write_stream_corpus(directory: str, megabytes: int) -> str:
  """JSONL files of 1K-token documents, `megabytes` in all (files of at most 32 MB, at least
  4); returns their glob."""
  os.makedirs(directory)
  with open(TEXT_FILE) as f:
    texts = [json.loads(line)['text'] for line in f]
  lines = [
    json.dumps({'text': '\n\n'.join(texts[i : i + STREAM_JOIN])}) + '\n'
    for i in range(0, len(texts), STREAM_JOIN)
  ]
  block = ''.join(lines).encode()
  total = megabytes * 2**20
  per_file = min(32 * 2**20, max(len(block), total // 4))
  written, index = 0, 0
  while written < total:
    with open(os.path.join(directory, f'part-{index:04d}.jsonl'), 'wb') as f:
      size = 0
      while size < per_file and written + size < total:
        f.write(block)
        size += len(block)
    written += size
    index += 1
  return os.path.join(directory, '*.jsonl')


def children_cpu_seconds() -> float:
  """CPU seconds of this process's finished (joined) child processes."""
  times = os.times()
  return times.children_user + times.children_system


def peak_kb(pid: int) -> int:
  """A process's peak resident memory (VmHWM), in KB; 0 if it is gone."""
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def run_stream_case(args, case: dict) -> dict:
  """One (d) / (e) case in this process: batches for `args.seconds`, then the peak memory."""
  import gc
  import multiprocessing
  import resource

  import ml_collections

  from data_pipeline import pipeline

  cfg = ml_collections.ConfigDict(
    {
      'seq_len': args.seq_len,
      'global_batch_size': args.batch,
      'train_files': case['files'],
      'eval_files': '',
      'tokenizer': HF_TOKENIZER,
      'text_field': 'text',
      'worker_count': case['workers'],
      'packing': 'concat',
      'stream': case['stream'],
    }
  )
  start = time.perf_counter()
  batches = pipeline.build(cfg, seed=0, split='train')
  next(batches)
  startup = time.perf_counter() - start
  meter, count, children = Meter(), 0, children_cpu_seconds()
  deadline = time.perf_counter() + args.seconds
  while time.perf_counter() < deadline:
    next(batches)
    count += 1
  timing = meter.read()
  # A worker's own peak (VmHWM): its ru_maxrss would count the parent's pages it was forked
  # with before its exec.
  worker_peak = max((peak_kb(p.pid) for p in multiprocessing.active_children()), default=0)
  del batches
  gc.collect()  # the streaming workers stop with the iterator (and their CPU time is known)
  tokens = count * args.batch * args.seq_len
  cpu = timing['own_cpu'] * timing['seconds'] + children_cpu_seconds() - children
  return dict(
    case,
    tokens_per_s=tokens / timing['seconds'],
    tokens_per_cpu_s=tokens / cpu,
    startup_s=startup,
    peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    worker_peak_mb=worker_peak / 1024,
    **timing,
  )


def stream_subprocess(args, case: dict) -> dict:
  argv = [
    sys.executable,
    os.path.abspath(__file__),
    f'--stream_worker={json.dumps(case)}',
    f'--seconds={args.seconds}',
    f'--seq_len={args.seq_len}',
    f'--batch={args.batch}',
  ]
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, check=False)
  if proc.returncode:
    sys.stderr.write(proc.stderr)
    raise SystemExit(f'{case} failed with exit code {proc.returncode}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def time_prepare(files: str, output: str, workers: int, engine: str) -> dict:
  from data_pipeline import prepare, sources

  request = prepare.Request(inputs=tuple(sources.match_files(files)), tokenizer=HF_TOKENIZER)
  ray_start = 0.0
  if engine == 'ray':
    import ray

    os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
    clock = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=100 * 2**20)
    ray_start = time.perf_counter() - clock
  meter, children = Meter(), children_cpu_seconds()
  try:
    manifest = prepare.prepare(request, output, workers=workers, progress=False, engine=engine)
  finally:
    if engine == 'ray':
      ray.shutdown()
  timing = meter.read()
  # Local: this process and its pool (joined); Ray's workers are not our children.
  cpu = timing['own_cpu'] * timing['seconds'] + children_cpu_seconds() - children
  return dict(
    engine=engine,
    workers=workers,
    tokens=manifest['tokens'],
    tokens_per_s=manifest['tokens'] / timing['seconds'],
    tokens_per_cpu_s=manifest['tokens'] / cpu if engine == 'local' else None,
    ray_start_s=ray_start,
    **timing,
  )


def streaming_main(args) -> None:
  sys.path.insert(0, REPO)
  load_before = os.getloadavg()
  workdir = tempfile.mkdtemp(prefix='stream_throughput_')
  try:
    small = write_stream_corpus(os.path.join(workdir, 'small'), args.small_mb)
    big = write_stream_corpus(os.path.join(workdir, 'big'), args.big_mb)
    throughput = [
      stream_subprocess(args, dict(files=small, workers=w, stream=True)) for w in (0, 1, 2)
    ]
    memory = [
      stream_subprocess(args, dict(files=files, workers=0, stream=stream, mb=mb))
      for stream in (True, False)
      for files, mb in ((small, args.small_mb), (big, args.big_mb))
    ]
    prepared = [
      time_prepare(small, os.path.join(workdir, f'prepared-{engine}-{w}'), w, engine)
      for engine, w in (('local', 1), ('local', 2), ('ray', 2))
    ]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  load = (load_before, os.getloadavg())
  if args.output == 'json':
    print(json.dumps({'throughput': throughput, 'memory': memory, 'prepare': prepared}, indent=2))
    return
  report_streaming(args, throughput, memory, prepared, load)


def report_streaming(args, throughput, memory, prepared, load) -> None:
  before, after = (' '.join(f'{x:.2f}' for x in avg) for avg in load)
  print(
    f'corpus: generated JSONL of ~1K-token documents (demo x {STREAM_JOIN} joined), '
    f'{args.small_mb} MB and {args.big_mb} MB; HF tokenizer.json; batches {args.batch} x '
    f'{args.seq_len}; {args.seconds:g} s per case after 1 warm-up batch; '
    f'{os.cpu_count()} cores, unpinned'
  )
  print(f'load average (1/5/15 min) before / after: {before} / {after}; {versions()}')
  print()
  print(
    f'{"":3}{"case":<46}{"tokens/s":>11}{"x host":>8}{"own cpu":>9}{"others":>8}'
    f'{"startup":>9}{"worker RSS":>12}{"per cpu-s":>11}'
  )
  for r in throughput:
    label = f'stream {args.small_mb} MB JSONL, concat, {r["workers"]} worker(s)'
    worker = f'{r["worker_peak_mb"]:,.0f} MB' if r['workers'] else ''
    print(
      f'(d){label:<46}{r["tokens_per_s"]:>11,.0f}{r["tokens_per_s"] / NEED_PER_HOST:>7.1f}x'
      f'{r["own_cpu"]:>9.0%}{r["other_cores"]:>8.2f}{r["startup_s"]:>8.1f}s{worker:>12}'
      f'{r["tokens_per_cpu_s"]:>11,.0f}'
    )
  print()
  print(f'{"":3}{"case":<46}{"peak RSS":>11}{"tokens/s":>11}{"startup":>9}')
  for r in memory:
    label = f'{"stream" if r["stream"] else "in-memory reader"}, {r["mb"]:,} MB corpus'
    print(
      f'(e){label:<46}{r["peak_mb"]:>8,.0f} MB{r["tokens_per_s"]:>11,.0f}{r["startup_s"]:>8.1f}s'
    )
  streamed = {r['mb']: r['peak_mb'] for r in memory if r['stream']}
  growth = streamed[args.big_mb] - streamed[args.small_mb]
  verdict = 'yes' if abs(growth) <= MEMORY_GOAL_MB else 'NO'
  print(
    f'   streaming peak, {args.big_mb:,} MB vs {args.small_mb} MB corpus: {growth:+,.0f} MB '
    f'(goal: within {MEMORY_GOAL_MB} MB: {verdict})'
  )
  print()
  print(f'{"":3}{"case":<46}{"tokens/s":>11}{"own cpu":>9}{"others":>8}{"per cpu-s":>11}')
  for r in prepared:
    label = f'prepare {args.small_mb} MB, {r["engine"]} engine, {r["workers"]} worker(s)'
    per_cpu = f'{r["tokens_per_cpu_s"]:,.0f}' if r['tokens_per_cpu_s'] else '-'
    extra = f'  (+ {r["ray_start_s"]:.1f} s to start Ray)' if r['engine'] == 'ray' else ''
    print(
      f'(f){label:<46}{r["tokens_per_s"]:>11,.0f}{r["own_cpu"]:>9.0%}{r["other_cores"]:>8.2f}'
      f'{per_cpu:>11}{extra}'
    )
  per_core = prepared[0]['tokens_per_cpu_s']  # one local process: all the work in-process
  print(
    f'   TxT360 ({TXT360_TOKENS / 1e12:.1f}T tokens) at {per_core:,.0f} tokens per core-second: '
    f'{TXT360_TOKENS / per_core / 3600:,.0f} core-hours'
  )
  print(
    f'(x host: tokens/s / {NEED_PER_HOST:,}, what an 8-GPU 70B host consumes; own cpu: the '
    f'trainer (or prepare driver) process; others: cores other processes, workers included, '
    f"kept busy; peak RSS: the trainer process's max resident memory; worker RSS: the "
    "largest tokenizing worker's; per cpu-s: tokens per CPU-second of the process and the "
    'worker processes it joined, what a core gives undisturbed; not known for Ray, whose '
    'workers are not its children)'
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seconds', type=float, default=5.0, help='timed seconds per case')
  parser.add_argument('--seq_len', type=int, default=8192)
  parser.add_argument(
    '--batch',
    type=int,
    default=None,
    help=f'rows per batch (default: {BATCH_TOKENS:,} tokens / seq_len)',
  )
  parser.add_argument(
    '--copies',
    type=int,
    default=8,
    help='copies of the demo train.jsonl, one file (and shard) each',
  )
  parser.add_argument(
    '--join',
    type=int,
    default=1,
    help='make every N consecutive demo documents one (longer documents)',
  )
  parser.add_argument(
    '--core',
    type=int,
    default=min(os.sched_getaffinity(0)),
    help='the core every case is pinned to',
  )
  parser.add_argument('--only', default='', help=f'comma-separated cases: {", ".join(CASES)}')
  parser.add_argument(
    '--profile',
    action='store_true',
    help="print each case's cProfile to stderr (documents are then read in "
    "the main thread, without Grain's reader thread)",
  )
  parser.add_argument('--profile_lines', type=int, default=15, help=argparse.SUPPRESS)
  parser.add_argument('--output', choices=('table', 'json'), default='table')
  parser.add_argument('--workdir', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--worker', choices=tuple(CASES), default=None, help=argparse.SUPPRESS)
  parser.add_argument(
    '--streaming', action='store_true', help='the streaming / prepare-engine rows (d)-(f) instead'
  )
  parser.add_argument('--big_mb', type=int, default=1024, help='(e): the large corpus, MB')
  parser.add_argument('--small_mb', type=int, default=20, help='(e): the small corpus, MB')
  parser.add_argument('--stream_worker', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.batch is None:
    args.batch = max(1, BATCH_TOKENS // args.seq_len)
  if args.stream_worker:
    print(json.dumps(run_stream_case(args, json.loads(args.stream_worker))))
    return
  if args.streaming:
    streaming_main(args)
    return
  pin(args.core)

  if args.worker:
    print(json.dumps(run_case(args, args.worker, args.workdir)))
    return

  cases = [c for c in args.only.split(',') if c] or list(CASES)
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    parser.error(f'unknown case(s) {", ".join(unknown)}; choose from {", ".join(CASES)}')
  load_before = os.getloadavg()
  workdir = tempfile.mkdtemp(prefix='data_throughput_')
  try:
    sys.path.insert(0, REPO)
    prepared = make_corpus(args, workdir)
    results = [run_worker(args, case, workdir) for case in cases]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  load = (load_before, os.getloadavg())
  if args.output == 'json':
    print(
      json.dumps(
        {
          'args': {k: v for k, v in vars(args).items() if k not in ('worker', 'workdir')},
          'need_per_gpu': NEED_PER_GPU,
          'need_per_host': NEED_PER_HOST,
          'goal_per_core': GOAL,
          'load_average': load,
          'versions': versions(),
          'prepare': prepared,
          'cases': [
            {
              **r,
              'group': CASES[r['case']][0],
              'label': CASES[r['case']][1],
              'goal_met': r['tokens_per_s'] >= GOAL if CASES[r['case']][0] == 'a' else None,
            }
            for r in results
          ],
        },
        indent=2,
      )
    )
  else:
    report(args, prepared, results, load)


if __name__ == '__main__':
  main()
