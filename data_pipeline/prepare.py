"""Offline tokenization of a corpus to ArrayRecord shards, the fast path for big corpora.

    python -m data_pipeline.prepare --input='/data/txt360/data/common-crawl/**/*.jsonl.gz' \
        --tokenizer=/models/k2/tokenizer.json --output=/prepared/cc --workers=16

One input file becomes one output shard, so the work spreads over worker processes and a
rerun can skip what is done. The output directory:

    prepare.json               what was asked for (inputs, tokenizer, format); a rerun must match
    shards/00042.array_record  the documents of input file 42, one record each
    shards/00042.json          its counts; written last, so it marks the shard as finished
    manifest.json              totals per shard and overall, written when every shard is done

A shard is written to a temporary name and renamed when complete, and its counts file only
after that: a killed run leaves at worst a temporary file, which the rerun replaces. A
training run reads a prepared directory wherever it takes a data path (`data.train_files`,
`data.eval_files`, a data bank entry) and needs the manifest, so it never reads a half-done
preparation.

Records (little-endian): a document's int32 token ids, followed for `--format=chat` by one
uint8 per token, 1 where the token is a loss target (data_pipeline/chat.py). Text documents
end with the EOD (eos) token, as the pipeline's on-the-fly path appends it. A conversation
gives one record per assistant turn (K2-V2's SFT samples), cut to `--max_len` tokens.
"""

import argparse
import dataclasses
import json
import multiprocessing
import os
import random
import sys
import time

import numpy as np

MANIFEST = 'manifest.json'
REQUEST = 'prepare.json'
RECORD_VERSION = 'k2jax-tokens-v1'
FORMATS = ('text', 'chat')


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


def _check_request(output: str, request: Request) -> None:
  """A rerun into an existing directory must have been asked the same thing."""
  path = os.path.join(output, REQUEST)
  asked = dataclasses.asdict(request)
  asked['inputs'] = list(asked['inputs'])
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    changed = sorted(k for k in asked if before.get(k) != asked[k])
    if changed:
      raise ValueError(
        f'{output} was prepared with different {", ".join(changed)} '
        f'(see {path}); use a new --output directory'
      )
  else:
    os.makedirs(os.path.join(output, 'shards'), exist_ok=True)
    _write_json(path, asked)


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


def prepare(request: Request, output: str, workers: int = 1, progress: bool = True) -> dict:
  """Prepares every input file not already done; writes and returns the manifest."""
  from data_pipeline.tokenizer import load_tokenizer

  if request.format not in FORMATS:
    raise ValueError(f'--format must be one of {"|".join(FORMATS)}, got {request.format!r}')
  tokenizer = load_tokenizer(request.tokenizer)  # fail on a bad tokenizer before any work
  _check_request(output, request)
  done = _finished(output, len(request.inputs))
  todo = [i for i in range(len(request.inputs)) if i not in done]
  bar = _progress_bar(len(request.inputs), len(done), progress)
  start = time.perf_counter()
  new_tokens = 0
  if todo:
    tasks = [(request, output, i) for i in todo]
    if workers > 1:
      # spawn: a fork would copy whatever threads the parent holds (JAX, tokenizers).
      with multiprocessing.get_context('spawn').Pool(min(workers, len(todo))) as pool:
        for index, counts in pool.imap_unordered(_run_shard, tasks):
          done[index] = counts
          new_tokens += counts['tokens']
          _advance(bar, new_tokens, start)
    else:
      for task in tasks:
        index, counts = _run_shard(task)
        done[index] = counts
        new_tokens += counts['tokens']
        _advance(bar, new_tokens, start)
  bar.close()
  shards = [done[i] for i in range(len(request.inputs))]
  manifest = {
    'version': RECORD_VERSION,
    'format': request.format,
    'target_mask': request.format == 'chat',
    'eod_appended': request.format == 'text',
    'tokenizer': request.tokenizer,
    'vocab_size': tokenizer.vocab_size,
    'documents': sum(s['documents'] for s in shards),
    'tokens': sum(s['tokens'] for s in shards),
    'shards': shards,
  }
  _write_json(os.path.join(output, MANIFEST), manifest)
  return manifest


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
  parser.add_argument('--workers', type=int, default=os.cpu_count() or 1)
  args = parser.parse_args(argv)
  from data_pipeline import sources

  try:
    inputs = tuple(sources.match_files(args.input))
    request = Request(
      inputs=inputs,
      tokenizer=os.path.abspath(args.tokenizer),
      format=args.format,
      field=args.field or ('conversations' if args.format == 'chat' else 'text'),
      max_len=args.max_len,
      system_prompt_prob=args.system_prompt_prob if args.format == 'chat' else 0.0,
      seed=args.seed,
    )
    manifest = prepare(request, args.output, workers=max(1, args.workers))
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
