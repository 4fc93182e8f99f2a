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
  args = parser.parse_args()
  if args.batch is None:
    args.batch = max(1, BATCH_TOKENS // args.seq_len)
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
