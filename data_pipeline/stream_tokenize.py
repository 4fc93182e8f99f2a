"""Raw records -> token documents, in the streaming reader's worker processes (or inline).

A chunk of items (data_pipeline/stream_files.py) becomes its documents, in item order, and
the messages of its bad items (`file:line: what`, as data_pipeline/sources.py words them).
A text record gives one document (its tokens and EOD); a chat record gives one sample per
assistant turn (data_pipeline/chat.py), cut to seq_len, whose system prompt is drawn from an
RNG seeded by (seed, source, file, record, turn), so the draw does not depend on the shard
layout, the worker count or where a run resumed.

Workers are spawned processes (a fork would copy the trainer's JAX threads), each loading the
tokenizer once; results come back in submission order, so the documents never depend on the
number of workers.
"""

import contextlib
import dataclasses
import multiprocessing
import queue
import sys
import traceback
import types

import numpy as np

from data_pipeline import chat, sources
from data_pipeline.tokenizer import Tokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class RenderSpec:
  """How a source's records become documents (picklable: it travels to the workers)."""

  source: int  # the source's index in the run's mixture
  format: str = 'text'  # text | chat
  field: str = 'text'
  seq_len: int = 0  # chat: samples are cut to this many tokens
  seed: int = 0  # chat: system-prompt draws
  system_prompt: str = chat.DEFAULT_SYSTEM_PROMPT
  system_prompt_prob: float = 0.0


def _value(item, spec: RenderSpec):
  """The checked field value of an item; ValueError says what is wrong, naming the record."""
  if item.kind == 'error':
    raise ValueError(item.payload)
  where = f'{item.path}:{item.number}' if item.kind == 'line' else f'{item.path}: row {item.number}'
  try:
    value = sources.json_field(item.payload, spec.field) if item.kind == 'line' else item.payload
    if value is None:
      raise ValueError(f'field {spec.field!r} is null')
    check = sources.check_text if spec.format == 'text' else chat.check_conversation
    return check(value)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None


def tokenize_items(items, spec: RenderSpec, tokenizer: Tokenizer):
  """(documents, bad-item messages) of a chunk; a document is (int32 tokens, bool mask or None
  for all-ones)."""
  documents, errors = [], []
  for item in items:
    try:
      value = _value(item, spec)
    except ValueError as e:
      errors.append(str(e))
      continue
    if spec.format == 'text':
      tokens = np.asarray(tokenizer.encode(value) + [tokenizer.eos_id], np.int32)
      documents.append((tokens, None))
      continue
    turns = chat.assistant_turns(value)
    rng = np.random.default_rng([spec.seed, spec.source, item.file_id, item.number])
    for turn in turns:
      prompt = spec.system_prompt if rng.random() < spec.system_prompt_prob else None
      sample = chat.render_sample(
        value, turn, tokenizer, max_len=spec.seq_len or None, system_prompt=prompt
      )
      documents.append((np.asarray(sample['tokens'], np.int32), sample['target_mask']))
  return documents, errors


def _worker_main(tokenizer_path: str, tasks, results) -> None:
  """A worker: loads the tokenizer once, then tokenizes (task id, items, spec) until None."""
  tokenizer = load_tokenizer(tokenizer_path)
  while True:
    task = tasks.get()
    if task is None:
      return
    task_id, items, spec = task
    try:
      results.put((task_id, True, tokenize_items(items, spec, tokenizer)))
    except Exception:  # noqa: BLE001 - reported in the trainer, which raises it
      results.put((task_id, False, traceback.format_exc()))


@contextlib.contextmanager
def _without_main_module():
  """Spawned children re-import the parent's __main__ (a training script, pytest, ...): slow,
  and fatal for a script without an `if __name__ == '__main__'` guard. The workers need
  nothing from it, so it is hidden while they start."""
  main = sys.modules['__main__']
  sys.modules['__main__'] = types.ModuleType('__main__')
  try:
    yield
  finally:
    sys.modules['__main__'] = main


class _Ticket:
  """A submitted chunk's result, waited for when asked (results come back in any order)."""

  def __init__(self, pool: 'TokenizerPool', task_id: int):
    self._pool, self._id = pool, task_id

  def result(self):
    return self._pool.result(self._id)

  def cancel(self):
    self._pool.discard(self._id)


class TokenizerPool:
  """`workers` tokenizing processes, started on first use; 0 tokenizes inline, when asked."""

  def __init__(self, tokenizer: Tokenizer, tokenizer_path: str, workers: int):
    self._tokenizer = tokenizer
    self._path = tokenizer_path
    self.workers = workers
    self._processes = []
    self._next_id = 0
    self._arrived = {}  # task id -> (ok, value)
    self._discarded = set()

  def _start(self) -> None:
    context = multiprocessing.get_context('spawn')  # a fork would copy JAX's threads
    self._tasks, self._results = context.Queue(), context.Queue()
    with _without_main_module():
      for _ in range(self.workers):
        process = context.Process(
          target=_worker_main, args=(self._path, self._tasks, self._results), daemon=True
        )
        process.start()
        self._processes.append(process)

  def submit(self, items, spec: RenderSpec):
    if not self.workers:
      return _Lazy(items, spec, self._tokenizer)
    if not self._processes:
      self._start()
    task_id, self._next_id = self._next_id, self._next_id + 1
    self._tasks.put((task_id, items, spec))
    return _Ticket(self, task_id)

  def discard(self, task_id: int) -> None:
    if self._arrived.pop(task_id, None) is None:
      self._discarded.add(task_id)

  def result(self, task_id: int):
    while task_id not in self._arrived:
      try:
        got_id, ok, value = self._results.get(timeout=5)
      except queue.Empty:
        dead = [p.exitcode for p in self._processes if not p.is_alive()]
        if dead:
          raise RuntimeError(
            f'a data tokenizing worker died (exit code {dead[0]}); see its output above'
          ) from None
        continue
      if got_id in self._discarded:
        self._discarded.discard(got_id)
      else:
        self._arrived[got_id] = (ok, value)
    ok, value = self._arrived.pop(task_id)
    if not ok:
      raise RuntimeError(f'a data tokenizing worker failed:\n{value}')
    return value

  def close(self) -> None:
    for _ in self._processes:
      self._tasks.put(None)
    for process in self._processes:
      process.join(timeout=1)
      if process.is_alive():  # still tokenizing chunks nobody will read
        process.terminate()
        process.join(timeout=5)
    self._processes = []


class _Lazy:
  """Inline tokenization, done when the result is first asked for."""

  def __init__(self, items, spec: RenderSpec, tokenizer: Tokenizer):
    self._args = (items, spec, tokenizer)
    self._value = None

  def result(self):
    if self._value is None:
      self._value = tokenize_items(*self._args)
    return self._value

  def cancel(self):
    return False
