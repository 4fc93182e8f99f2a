"""Trains a SentencePiece or HF byte-level BPE tokenizer on a JSONL corpus.

    python -m data_pipeline.train_tokenizer --input=data_pipeline/demo/train.jsonl \
        --vocab_size=2048 --out=data_pipeline/demo/tokenizer.model
    python -m data_pipeline.train_tokenizer --kind=hf --input=data_pipeline/demo/train.jsonl \
        --vocab_size=2048 --out=data_pipeline/demo/tokenizer.json

Ids follow K2-V2 (bos 0, eos 1) with unk 2 and pad 3, then the chat and
reasoning tags at 4..11, each always one token (SentencePiece user-defined
symbols, HF special tokens). Any text round-trips even with a tiny vocabulary:
SentencePiece through byte fallback, HF because it is byte-level.

`--kind=hf` writes the format K2-V2 ships: a byte-level BPE `tokenizer.json`
plus a `tokenizer_config.json` next to it naming bos/eos/pad, so HFTokenizer
and AutoTokenizer both read it.
"""

import argparse
import io
import json
import os

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from data_pipeline import sources
from data_pipeline.tokenizer import BOS_ID, EOS_ID, HF_CONFIG_FILE, SPECIAL_TOKENS

UNK_ID = 2
PAD_ID = 3

# The HF tokenizer's first ids; the trainer numbers special tokens in order.
HF_BOS, HF_EOS, HF_UNK, HF_PAD = '<s>', '</s>', '<unk>', '<pad>'
HF_SPECIAL_TOKENS = (HF_BOS, HF_EOS, HF_UNK, HF_PAD) + SPECIAL_TOKENS


def _documents(pattern: str, text_field: str):
  # Whole documents, newlines included, so pieces are learned in the same
  # context the pipeline encodes them (a word after "\n" has no "▁").
  yield from sources.read_values(pattern, text_field, sources.check_text).values


def train(input_glob: str, vocab_size: int, out_path: str, text_field: str = 'text') -> None:
  sources.match_files(input_glob)  # FileNotFoundError naming the glob
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
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    pad_id=PAD_ID,
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


def train_hf(input_glob: str, vocab_size: int, out_path: str, text_field: str = 'text') -> None:
  """Writes a byte-level BPE `out_path` and a tokenizer_config.json beside it.

  Reproducible without pinning threads: the BPE trainer sums pair counts
  exactly and breaks ties by pair ids, so the file is byte-identical for any
  RAYON_NUM_THREADS or TOKENIZERS_PARALLELISM (checked with 1 to 16 threads).
  """
  sources.match_files(input_glob)  # FileNotFoundError naming the glob
  if not out_path.endswith('.json'):
    raise ValueError(
      f'--out={out_path}: an HF tokenizer must be a .json file '
      '(load_tokenizer picks the implementation by suffix)'
    )
  documents = list(_documents(input_glob, text_field))
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      # Digits one per token, as in the SentencePiece tokenizer.
      pre_tokenizers.Digits(individual_digits=True),
      # No space prepended: a document start encodes like any other position
      # and decode(encode(text)) == text.
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
  )
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    # special=True and normalized=False: matched in raw text before
    # pre-tokenization, so each is always exactly one token.
    special_tokens=[
      tokenizers.AddedToken(t, special=True, normalized=False) for t in HF_SPECIAL_TOKENS
    ],
    # All 256 bytes, so any text encodes (no unk) even with a tiny vocabulary.
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(documents, trainer, length=len(documents))
  if tokenizer.get_vocab_size() != vocab_size:
    raise ValueError(
      f'--input={input_glob} is too small for --vocab_size={vocab_size}: '
      f'BPE stopped at {tokenizer.get_vocab_size()} tokens'
    )
  for token_id, token in enumerate(HF_SPECIAL_TOKENS):
    if tokenizer.token_to_id(token) != token_id:
      raise RuntimeError(f'{token!r} got id {tokenizer.token_to_id(token)}, expected {token_id}')
  os.makedirs(os.path.dirname(out_path) or '.', exist_ok=True)
  tokenizer.save(out_path)
  config = {
    # What AutoTokenizer needs to load the folder as this exact tokenizer.
    'tokenizer_class': 'PreTrainedTokenizerFast',
    'bos_token': HF_BOS,
    'eos_token': HF_EOS,
    'unk_token': HF_UNK,
    'pad_token': HF_PAD,
    'clean_up_tokenization_spaces': False,
  }
  config_path = os.path.join(os.path.dirname(out_path), HF_CONFIG_FILE)
  with open(config_path, 'w', encoding='utf-8') as f:
    f.write(json.dumps(config, indent=2) + '\n')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--kind',
    choices=('sentencepiece', 'hf'),
    default='sentencepiece',
    help='sentencepiece: a .model; hf: a byte-level BPE tokenizer.json plus tokenizer_config.json',
  )
  parser.add_argument('--input', required=True, help='glob of JSONL files')
  parser.add_argument('--vocab_size', type=int, default=2048)
  parser.add_argument(
    '--out', required=True, help='path of the .model (sentencepiece) or .json (hf) to write'
  )
  parser.add_argument('--text_field', default='text')
  args = parser.parse_args()
  train_fn = train_hf if args.kind == 'hf' else train
  train_fn(args.input, args.vocab_size, args.out, args.text_field)
  print(f'wrote {args.out} (vocab {args.vocab_size})')


if __name__ == '__main__':
  main()
