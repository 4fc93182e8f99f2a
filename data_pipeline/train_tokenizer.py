"""Trains a SentencePiece tokenizer on a JSONL corpus.

    python -m data_pipeline.train_tokenizer --input=data_pipeline/demo/train.jsonl \
        --vocab_size=2048 --out=data_pipeline/demo/tokenizer.model

Ids follow K2-V2 (bos 0, eos 1) with unk 2 and pad 3; the chat and reasoning
tags are user-defined symbols so they always encode as one token. Byte
fallback means any text round-trips even with a tiny vocabulary.
"""

import argparse
import glob
import io
import os

import sentencepiece as spm

from data_pipeline import jsonl
from data_pipeline.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS

UNK_ID = 2
PAD_ID = 3


def _documents(pattern: str, text_field: str):
  # Whole documents, newlines included, so pieces are learned in the same
  # context the pipeline encodes them (a word after "\n" has no "▁").
  yield from jsonl.read_texts(pattern, text_field)


def train(input_glob: str, vocab_size: int, out_path: str, text_field: str = 'text') -> None:
  if not glob.glob(input_glob):
    raise FileNotFoundError(f'no files match --input={input_glob}')
  model = io.BytesIO()
  spm.SentencePieceTrainer.Train(
      sentence_iterator=_documents(input_glob, text_field),
      model_writer=model,
      model_type='bpe',
      vocab_size=vocab_size,
      character_coverage=1.0,
      byte_fallback=True,
      # Digits one per token, as in Llama-style tokenizers: easier arithmetic.
      split_digits=True,
      # Keep text exactly as written so decode(encode(text)) == text.
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      # No "▁" prepended to each text: a document start then encodes like any
      # other position, and a lone "▁" token does not precede "<|im_start|>".
      add_dummy_prefix=False,
      max_sentence_length=1 << 20,
      bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, pad_id=PAD_ID,
      user_defined_symbols=list(SPECIAL_TOKENS),
      # Use every document, in order, so training is reproducible.
      input_sentence_size=0,
      shuffle_input_sentence=False,
      num_threads=1,
      minloglevel=2,
  )
  os.makedirs(os.path.dirname(out_path) or '.', exist_ok=True)
  with open(out_path, 'wb') as f:
    f.write(model.getvalue())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--input', required=True, help='glob of JSONL files')
  parser.add_argument('--vocab_size', type=int, default=2048)
  parser.add_argument('--out', required=True, help='path of the .model to write')
  parser.add_argument('--text_field', default='text')
  args = parser.parse_args()
  train(args.input, args.vocab_size, args.out, args.text_field)
  print(f'wrote {args.out} (vocab {args.vocab_size})')


if __name__ == '__main__':
  main()
