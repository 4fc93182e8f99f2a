"""Zigzag row order for context parallelism: equal causal work on every `sequence` shard.

With causal attention, a row split into CP contiguous shards gives shard r about (2r + 1)x
the work of shard 0 (its queries see r + 1/2 shards of keys), 7x at CP 4. The dual-chunk
("zigzag") order cuts the row into 2·CP chunks and gives shard r chunks r and 2·CP−1−r, a
short and a long one, so every shard sees the same number of (query, key) pairs.

The reorder is applied once, when batches leave the pipeline, to every [rows, seq_len] array
of the batch (inputs, targets, positions, segment ids, loss mask, ...). Positions travel with
their tokens, so RoPE and the attention masks use true positions, and the loss (a sum over
tokens) needs nothing un-permuted.
"""

import numpy as np


def check(seq_len: int, shards: int):
  """Refuses a row length that the zigzag order cannot cut (nothing to do for one shard)."""
  if shards > 1 and seq_len % (2 * shards):
    raise ValueError(
      f'data.seq_len={seq_len} is not divisible by 2 x mesh.sequence = {2 * shards}: context '
      'parallelism cuts each row into 2 chunks per sequence shard (zigzag load balance)'
    )


def zigzag_order(seq_len: int, shards: int) -> np.ndarray:
  """Token indices in zigzag order: laid out contiguously, shard r holds chunks r, 2·CP−1−r."""
  check(seq_len, shards)
  chunks = np.arange(seq_len).reshape(2 * shards, seq_len // (2 * shards))
  order = [np.concatenate([chunks[r], chunks[2 * shards - 1 - r]]) for r in range(shards)]
  return np.concatenate(order)


def reorder(batch: dict, shards: int) -> dict:
  """The batch with every [rows, seq_len] array in zigzag order (shards=1: unchanged)."""
  if shards == 1:
    return batch
  return _permute(batch, zigzag_order(batch['inputs'].shape[1], shards))


def restore(batch: dict, shards: int) -> dict:
  """The inverse of `reorder`: rows back in token order."""
  if shards == 1:
    return batch
  return _permute(batch, np.argsort(zigzag_order(batch['inputs'].shape[1], shards)))


def _permute(batch: dict, order: np.ndarray) -> dict:
  return {
    key: value[:, order] if value.ndim == 2 and value.shape[1] == len(order) else value
    for key, value in batch.items()
  }
