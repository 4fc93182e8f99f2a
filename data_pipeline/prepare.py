"""Offline tokenization of a corpus to ArrayRecord shards, the fast path for big corpora.

    python -m data_pipeline.prepare --input='/data/txt360/data/common-crawl/**/*.jsonl.gz' \
        --tokenizer=/models/k2/tokenizer.json --output=/prepared/cc --workers=16

One input file becomes one output shard, so the work spreads over worker processes (or, with
`--engine=ray`, over Ray tasks on a local Ray or a cluster: data_pipeline/prepare_ray.py, the
same bytes) and a rerun can skip what is done. Progress (files, tokens, tokens/s, time left)
goes to stderr. The output directory:

    prepare.json               what was asked for (inputs, tokenizer, format) and the identity
                               of the tokenizer file; a rerun must match
    shards/00042.array_record  the documents of input file 42, one record each
    shards/00042.json          its counts; written last, so it marks the shard as finished
    manifest.json              totals per shard and overall, the longest record (`max_tokens`),
                               `max_len` and the tokenizer's identity (data_pipeline/tokenizer.py),
                               written when every shard is done

A shard is written to a temporary name and renamed when complete, and its counts file only
after that: a killed run leaves at worst a temporary file, which the rerun replaces. A run
that fails before any shard is finished (an input with no documents, say) removes what it
created, and a directory holding no finished shard accepts a rerun that asks something
else, so fixing the input and rerunning always works. A training run reads a prepared
directory wherever it takes a data path (`data.train_files`, `data.eval_files`, a data bank
entry) and needs the manifest, so it never reads a half-done preparation.

Records (little-endian): a document's int32 token ids, followed for `--format=chat` by one
uint8 per token, 1 where the token is a loss target (data_pipeline/chat.py). Text documents
end with the EOD (eos) token, as the pipeline's on-the-fly path appends it. A conversation
gives one record per assistant turn (K2-V2's SFT samples), cut to `--max_len` tokens; training
cuts longer ones to `data.seq_len` on the right, as it does raw chat (data_pipeline/documents.py).
"""

import argparse
import dataclasses
import json
import multiprocessing
import os
import random
import shutil
import sys
import time

import numpy as np

MANIFEST = 'manifest.json'
REQUEST = 'prepare.json'
RECORD_VERSION = 'k2jax-tokens-v1'
FORMATS = ('text', 'chat')
ENGINES = ('local', 'ray')


@dataclasses.dataclass(frozen=True)
class Request:
  """What a preparation is asked to do; a rerun into the same directory must ask the same."""

  inputs: tuple[str, ...]
  tokenizer: str
  format: str = 'text'  # text | chat
  field: str = 'text'  # record field holding the text or the conversation
  max_len: int = 0  # chat: right-truncate samples to this many tokens (0: no limit)
  system_prompt_prob: float = 0.0  # chat: chance a sample without a system turn gets one
  seed: int = 0  # chat: the system-prompt draws


def shard_path(output: str, index: int, suffix: str) -> str:
  return os.path.join(output, 'shards', f'{index:05d}{suffix}')


def encode_record(tokens: np.ndarray, target_mask: np.ndarray | None) -> bytes:
  record = np.asarray(tokens, '<i4').tobytes()
  if target_mask is not None:
    record += np.asarray(target_mask, np.uint8).tobytes()
  return record


def decode_record(record: bytes, has_mask: bool) -> tuple[np.ndarray, np.ndarray]:
  """(int32 tokens, bool target mask) of a record; the mask is all True for text."""
  if has_mask:
    n = len(record) // 5
    tokens = np.frombuffer(record, '<i4', count=n)
    return tokens.astype(np.int32), np.frombuffer(record, np.uint8, offset=4 * n).astype(bool)
  tokens = np.frombuffer(record, '<i4').astype(np.int32)
  return tokens, np.ones(len(tokens), bool)


def read_manifest(directory: str) -> dict:
  """The manifest of a finished preparation; clear errors for anything else."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    hint = (
      ' (its preparation has not finished: rerun data_pipeline.prepare)'
      if os.path.exists(os.path.join(directory, REQUEST))
      else ''
    )
    raise FileNotFoundError(f'{directory} is not a prepared data directory: no {MANIFEST}{hint}')
  with open(path) as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from None
  if manifest.get('version') != RECORD_VERSION:
    raise ValueError(f'{path}: version {manifest.get("version")!r}, expected {RECORD_VERSION!r}')
  return manifest


def is_prepared(path: str) -> bool:
  return os.path.isdir(path) and (
    os.path.exists(os.path.join(path, MANIFEST)) or os.path.exists(os.path.join(path, REQUEST))
  )


def shard_files(directory: str) -> list[str]:
  manifest = read_manifest(directory)
  return [os.path.join(directory, 'shards', s['file']) for s in manifest['shards']]


# --- one shard (runs in a worker process) ------------------------------------------


def _documents(request: Request, input_path: str, index: int, tokenizer):
  """Yields (tokens, target_mask or None) for each document or sample of one input file."""
  from data_pipeline import chat, sources

  if request.format == 'text':
    texts = sources.read_values(input_path, request.field, sources.check_text).values
    for text in texts:
      yield np.asarray(tokenizer.encode(text) + [tokenizer.eos_id], np.int32), None
    return
  conversations = sources.read_values(input_path, request.field, chat.check_conversation).values
  # Seeded by the shard, so a rerun or another worker count draws the same prompts.
  rng = random.Random(f'{request.seed}:{index}')
  for conversation in conversations:
    for turn in chat.assistant_turns(conversation):
      prompt = chat.DEFAULT_SYSTEM_PROMPT if rng.random() < request.system_prompt_prob else None
      sample = chat.render_sample(
        conversation, turn, tokenizer, max_len=request.max_len or None, system_prompt=prompt
      )
      yield sample['tokens'], sample['target_mask']


def prepare_shard(request: Request, output: str, index: int) -> dict:
  """Tokenizes input file `index` into its shard; returns (and writes) the shard's counts."""
  from array_record.python import array_record_module

  from data_pipeline.tokenizer import load_tokenizer

  tokenizer = load_tokenizer(request.tokenizer)
  final = shard_path(output, index, '.array_record')
  temporary = final + '.tmp'
  documents = tokens = max_tokens = 0
  writer = array_record_module.ArrayRecordWriter(temporary, 'group_size:1')
  try:
    for ids, mask in _documents(request, request.inputs[index], index, tokenizer):
      writer.write(encode_record(ids, mask))
      documents += 1
      tokens += len(ids)
      max_tokens = max(max_tokens, len(ids))
  finally:
    writer.close()
  os.replace(temporary, final)
  counts = {
    'file': os.path.basename(final),
    'input': request.inputs[index],
    'documents': documents,
    'tokens': tokens,
    'max_tokens': max_tokens,
  }
  _write_json(shard_path(output, index, '.json'), counts)
  return counts


def _write_json(path: str, value) -> None:
  temporary = path + '.tmp'
  with open(temporary, 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(temporary, path)


def _check_inputs(request: Request) -> None:
  """What can be told about the inputs without reading them, before the output is created."""
  from data_pipeline import sources

  if not request.inputs:
    raise ValueError('--input matches no files')
  for path in request.inputs:
    # An empty file holds no document, which would stop the run at that shard (below).
    if not sources.is_url(path) and os.path.getsize(path) == 0:
      raise ValueError(f'{path}: the file is empty (no documents); remove it from --input')


def _check_request(output: str, request: Request, identity: dict | None) -> bool:
  """A rerun into a directory holding finished shards must have been asked the same thing,
  with the same tokenizer file. Returns whether prepare.json was written by this call."""
  path = os.path.join(output, REQUEST)
  asked = dataclasses.asdict(request)
  asked['inputs'] = list(asked['inputs'])
  if os.path.exists(path):
    with open(path) as f:
      try:
        before = json.load(f)
      except json.JSONDecodeError:
        before = {}  # cut off by a kill while written: checked below like any other change
    changed = sorted(k for k in asked if before.get(k) != asked[k])
    recorded = before.get('tokenizer_identity')  # absent: written before identities were kept
    if not changed and recorded is not None and identity is not None and recorded != identity:
      changed = [f'tokenizer file contents (the file at {request.tokenizer} has changed)']
    if not changed:
      return False
    if _finished(output, len(before.get('inputs', []))):
      raise ValueError(
        f'{output} was prepared with different {", ".join(changed)} '
        f'(see {path}); use a new --output directory'
      )
    # No shard was finished under the old request: nothing is lost by taking the new one.
  os.makedirs(os.path.join(output, 'shards'), exist_ok=True)
  _write_json(path, {**asked, 'tokenizer_identity': identity})
  return True


def _remove_unfinished(output: str, created_output: bool) -> None:
  """After a failed run that finished no shard: remove what it created, so that the rerun
  with fixed input starts from a clean slate."""
  if created_output:
    shutil.rmtree(output, ignore_errors=True)
    return
  shards = os.path.join(output, 'shards')
  for name in os.listdir(shards) if os.path.isdir(shards) else []:
    if name.endswith('.tmp'):
      os.remove(os.path.join(shards, name))
  if os.path.isdir(shards) and not os.listdir(shards):
    os.rmdir(shards)
  if os.path.exists(os.path.join(output, REQUEST)):
    os.remove(os.path.join(output, REQUEST))


def _finished(output: str, n: int) -> dict[int, dict]:
  done = {}
  for index in range(n):
    counts_path = shard_path(output, index, '.json')
    if os.path.exists(counts_path) and os.path.exists(shard_path(output, index, '.array_record')):
      with open(counts_path) as f:
        done[index] = json.load(f)
  return done


def _run_shard(args):
  request, output, index = args
  return index, prepare_shard(request, output, index)


def prepare(
  request: Request,
  output: str,
  workers: int = 1,
  progress: bool = True,
  *,
  engine: str = 'local',
  ray_address: str = '',
  retries: int = 3,
) -> dict:
  """Prepares every input file not already done; writes and returns the manifest.

  `engine` 'local' uses `workers` processes here; 'ray' runs the same per-file work as Ray
  tasks (data_pipeline/prepare_ray.py), on a local Ray of `workers` CPUs or the cluster at
  `ray_address`, retrying a failed task up to `retries` times.
  """
  from data_pipeline.tokenizer import load_tokenizer

  if engine not in ENGINES:
    raise ValueError(f'--engine must be one of {"|".join(ENGINES)}, got {engine!r}')
  if retries < 0:
    raise ValueError(f'--retries must be >= 0, got {retries}')
  if engine == 'ray':
    from data_pipeline import prepare_ray

    prepare_ray.check_installed()  # before the output is created
  if request.format not in FORMATS:
    raise ValueError(f'--format must be one of {"|".join(FORMATS)}, got {request.format!r}')
  if request.max_len < 0:
    raise ValueError(f'--max_len must be >= 0 (0: no limit), got {request.max_len}')
  # Everything that can be checked without reading the inputs, before the output exists.
  tokenizer = load_tokenizer(request.tokenizer)
  identity = tokenizer.identity()
  _check_inputs(request)
  created_output = not os.path.exists(output)
  created_request = _check_request(output, request, identity)
  done = _finished(output, len(request.inputs))
  try:
    _prepare_shards(request, output, workers, progress, done, engine, ray_address, retries)
  except BaseException as error:
    finished = len(_finished(output, len(request.inputs)))
    if not finished:
      if created_request:
        _remove_unfinished(output, created_output)
      raise
    if isinstance(error, (ValueError, FileNotFoundError)):
      raise type(error)(
        f'{error} ({finished} finished shard(s) kept in {output}: rerun the same command once '
        'the file is fixed in place to resume, or use a new --output for other inputs)'
      ) from None
    raise
  shards = [done[i] for i in range(len(request.inputs))]
  manifest = {
    'version': RECORD_VERSION,
    'format': request.format,
    'target_mask': request.format == 'chat',
    'eod_appended': request.format == 'text',
    'tokenizer': request.tokenizer,
    'tokenizer_identity': identity,
    'vocab_size': tokenizer.vocab_size,
    'max_len': request.max_len,  # the cut asked for (0: none)
    'max_tokens': max((s.get('max_tokens', 0) for s in shards), default=0),  # the longest record
    'documents': sum(s['documents'] for s in shards),
    'tokens': sum(s['tokens'] for s in shards),
    'shards': shards,
  }
  _write_json(os.path.join(output, MANIFEST), manifest)
  return manifest


def _prepare_shards(
  request: Request,
  output: str,
  workers: int,
  progress: bool,
  done: dict,
  engine: str = 'local',
  ray_address: str = '',
  retries: int = 3,
):
  """Prepares the shards not in `done`, adding each one's counts to `done` as it finishes."""
  todo = [i for i in range(len(request.inputs)) if i not in done]
  bar = _progress_bar(len(request.inputs), len(done), progress)
  start = time.perf_counter()
  new_tokens = 0

  def finished(index: int, counts: dict) -> None:
    nonlocal new_tokens
    done[index] = counts
    new_tokens += counts['tokens']
    _advance(bar, new_tokens, start)

  tasks = [(request, output, i) for i in todo]
  try:
    if engine == 'ray' and todo:
      from data_pipeline import prepare_ray

      prepare_ray.prepare_shards(request, output, todo, workers, ray_address, retries, finished)
    elif workers > 1 and len(todo) > 1:
      # spawn: a fork would copy whatever threads the parent holds (JAX, tokenizers).
      with multiprocessing.get_context('spawn').Pool(min(workers, len(todo))) as pool:
        for index, counts in pool.imap_unordered(_run_shard, tasks):
          finished(index, counts)
    else:
      for task in tasks:
        finished(*_run_shard(task))
  finally:
    bar.close()


def _progress_bar(total: int, initial: int, enabled: bool):
  from tqdm import tqdm

  return tqdm(
    total=total, initial=initial, unit='file', disable=not enabled, desc='prepare', file=sys.stderr
  )


def _advance(bar, new_tokens: int, start: float) -> None:
  rate = new_tokens / max(time.perf_counter() - start, 1e-9)
  bar.set_postfix_str(f'{new_tokens:,} tokens, {rate:,.0f} tokens/s')
  bar.update(1)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--input', required=True, help='glob(s) or folder of .jsonl[.gz|.zst] / .parquet files, or URLs'
  )
  parser.add_argument('--tokenizer', required=True, help='SentencePiece .model or tokenizer.json')
  parser.add_argument('--output', required=True, help='directory to write (created)')
  parser.add_argument(
    '--format',
    default='text',
    choices=FORMATS,
    help='text documents, or chat conversations rendered per assistant turn',
  )
  parser.add_argument(
    '--field', default=None, help="record field (default: 'text', or 'conversations' for chat)"
  )
  parser.add_argument('--max_len', type=int, default=0, help='chat: truncate samples (0: off)')
  parser.add_argument(
    '--system_prompt_prob',
    type=float,
    default=0.1,
    help="chat: chance of adding K2's system prompt to a sample without one",
  )
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument(
    '--workers',
    type=int,
    default=None,
    help="processes (local), or Ray tasks in flight (default: the CPUs here, or the cluster's)",
  )
  parser.add_argument(
    '--engine',
    default='local',
    choices=ENGINES,
    help='local processes, or Ray tasks (pip install k2jax[ray]; see data_pipeline/prepare_ray.py)',
  )
  parser.add_argument(
    '--ray_address',
    default='',
    help="--engine=ray: an existing cluster ('auto', ray://head:10001); empty starts a local Ray",
  )
  parser.add_argument(
    '--retries', type=int, default=3, help='--engine=ray: tries again a task lost to a failure'
  )
  args = parser.parse_args(argv)
  from data_pipeline import sources

  try:
    inputs = tuple(sources.match_files(args.input))
    if not args.tokenizer.strip():
      # Left as is, abspath('') would name the current folder.
      raise ValueError('--tokenizer is empty: give the tokenizer to prepare with')
    request = Request(
      inputs=inputs,
      tokenizer=os.path.abspath(args.tokenizer),
      format=args.format,
      field=args.field or ('conversations' if args.format == 'chat' else 'text'),
      max_len=args.max_len,
      system_prompt_prob=args.system_prompt_prob if args.format == 'chat' else 0.0,
      seed=args.seed,
    )
    if args.workers is not None and args.workers < 1:
      raise ValueError(f'--workers must be >= 1, got {args.workers}')
    # A cluster's size is its own: 0 lets the Ray engine fill every CPU it has.
    default_workers = 0 if (args.engine == 'ray' and args.ray_address) else os.cpu_count() or 1
    manifest = prepare(
      request,
      args.output,
      workers=args.workers or default_workers,
      engine=args.engine,
      ray_address=args.ray_address,
      retries=args.retries,
    )
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(
    f'{args.output}: {manifest["documents"]:,} documents, {manifest["tokens"]:,} tokens '
    f'in {len(manifest["shards"])} shard(s)'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
