"""One source -> a random-access Grain dataset of token documents.

A document is what packing works on:

  tokens       int32 [n]  token ids
  target_mask  bool [n]   token i is a loss target (predicted from tokens before it)
  source       int32 [n]  the source's index in the run's mixture (for the share metrics)

Three kinds of source, told apart by the path:

  prepared   a directory written by data_pipeline.prepare: ArrayRecord shards, read lazily
  raw text   JSONL / parquet files (data_pipeline/sources.py) with a text field
             (`data.text_field`); each document is tokenized on access and ends with EOD
  raw chat   the same files with conversations (`data.format = 'chat'`,
             `data.chat_field`); each assistant turn is one sample (data_pipeline/chat.py),
             cut to seq_len tokens, with an optional random system prompt

Raw sources hold their records in memory: fine for SFT sets and evaluation files; the
pre-training corpora go through data_pipeline.prepare first.
"""

import dataclasses

import grain
import numpy as np

from data_pipeline import chat, prepare, sources
from data_pipeline.tokenizer import Tokenizer

FORMATS = ('text', 'chat')
# Raw sources: documents tokenized to estimate the mean length (for the mixture weights).
_LENGTH_SAMPLE = 512


@dataclasses.dataclass
class OpenedSource:
  documents: grain.MapDataset
  skipped: int = 0  # bad records left out (raw sources)
  exact_mean_tokens: float | None = None  # from a prepared manifest

  def mean_tokens(self) -> float:
    """Tokens per document: exact for prepared data, else estimated from a sample."""
    if self.exact_mean_tokens is not None:
      return self.exact_mean_tokens
    n = len(self.documents)
    picks = np.unique(np.linspace(0, n - 1, min(n, _LENGTH_SAMPLE)).astype(int))
    return float(np.mean([len(self.documents[int(i)]['tokens']) for i in picks]))


class _DecodeRecord(grain.transforms.Map):
  def __init__(self, has_mask: bool, source: int):
    self._has_mask = has_mask
    self._source = source

  def map(self, record: bytes) -> dict[str, np.ndarray]:
    tokens, target_mask = prepare.decode_record(record, self._has_mask)
    return _document(tokens, target_mask, self._source)


class _TokenizeText(grain.transforms.Map):
  def __init__(self, tokenizer: Tokenizer, source: int):
    self._tokenizer = tokenizer
    self._source = source

  def map(self, text: str) -> dict[str, np.ndarray]:
    tokens = np.asarray(self._tokenizer.encode(text) + [self._tokenizer.eos_id], np.int32)
    return _document(tokens, np.ones(len(tokens), bool), self._source)


class _RenderChat(grain.transforms.RandomMap):
  """(conversation, target turn) -> the rendered sample; the system prompt is a seeded draw."""

  def __init__(
    self,
    tokenizer: Tokenizer,
    source: int,
    max_len: int,
    system_prompt: str,
    system_prompt_prob: float,
  ):
    self._tokenizer = tokenizer
    self._source = source
    self._max_len = max_len
    self._system_prompt = system_prompt
    self._prob = system_prompt_prob

  def random_map(self, sample, rng: np.random.Generator) -> dict[str, np.ndarray]:
    conversation, turn = sample
    prompt = self._system_prompt if rng.random() < self._prob else None
    rendered = chat.render_sample(
      conversation, turn, self._tokenizer, max_len=self._max_len, system_prompt=prompt
    )
    return _document(rendered['tokens'], rendered['target_mask'], self._source)


def _document(tokens, target_mask, source: int) -> dict[str, np.ndarray]:
  return {
    'tokens': tokens,
    'target_mask': target_mask,
    'source': np.full(len(tokens), source, np.int32),
  }


def open_source(
  path: str,
  index: int,
  data_cfg,
  tokenizer: Tokenizer,
  *,
  seed: int,
  system_prompt_prob: float | None = None,
  strict: bool = False,
) -> OpenedSource:
  """The documents of the source at `path`, which is source number `index` of the run."""
  if prepare.is_prepared(path):
    manifest = prepare.read_manifest(path)
    if manifest['vocab_size'] > tokenizer.vocab_size:
      raise ValueError(
        f'{path} was prepared with a {manifest["vocab_size"]}-token tokenizer '
        f'({manifest["tokenizer"]}), larger than data.tokenizer '
        f'({tokenizer.vocab_size} tokens)'
      )
    if not manifest['documents']:
      raise ValueError(f'{path}: the prepared data holds no documents')
    records = grain.sources.ArrayRecordDataSource(prepare.shard_files(path))
    documents = grain.MapDataset.source(records).map(_DecodeRecord(manifest['target_mask'], index))
    return OpenedSource(documents, exact_mean_tokens=manifest['tokens'] / manifest['documents'])

  data_format = data_cfg.get('format', 'text')
  if data_format not in FORMATS:
    raise ValueError(f'data.format must be one of {"|".join(FORMATS)}, got {data_format!r}')
  if data_format == 'text':
    read = sources.read_values(
      path, data_cfg.get('text_field', 'text'), sources.check_text, strict=strict
    )
    documents = grain.MapDataset.source(read.values).map(_TokenizeText(tokenizer, index))
  else:
    read = sources.read_values(
      path, data_cfg.get('chat_field', 'conversations'), chat.check_conversation, strict=strict
    )
    # One sample per assistant turn, listed up front so the samples are random-access.
    samples = [
      (conversation, turn)
      for conversation in read.values
      for turn in chat.assistant_turns(conversation)
    ]
    chat_cfg = data_cfg.get('chat', {})
    prob = (
      system_prompt_prob
      if system_prompt_prob is not None
      else chat_cfg.get('system_prompt_prob', 0.0)
    )
    render = _RenderChat(
      tokenizer,
      index,
      data_cfg.seq_len,
      chat_cfg.get('system_prompt', chat.DEFAULT_SYSTEM_PROMPT),
      prob,
    )
    # Seeded per source, before any shuffling or sharding: a sample's draw is the same on
    # every host count and every epoch.
    documents = grain.MapDataset.source(samples).random_map(render, seed=seed + 7919 * index)
  return OpenedSource(documents, read.skipped)
