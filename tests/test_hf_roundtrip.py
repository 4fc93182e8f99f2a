"""The round trip from the command line, on the shared demo run: export it to HF, load that in
transformers and generate the same text as `k2jax.generate`; import the export back and
generate from it with the tokenizer the import recorded."""

import json
import os

import pytest

from k2jax import convert as convert_cli
from k2jax import generate as generate_cli
from tests.helpers import require_oracle

PROMPTS = ['Tomadun is a river town in the province of', 'What is 12 + 30?']


@pytest.fixture(scope='module')
def exported(demo_run, tmp_path_factory):
  """`convert to-hf` of the demo run in float32 (its SentencePiece tokenizer included)."""
  hf_dir = str(tmp_path_factory.mktemp('roundtrip') / 'hf')
  convert_cli.main(['to-hf', f'--checkpoint={demo_run}', f'--out={hf_dir}', '--dtype=float32'])
  return hf_dir


def generate(capsys, checkpoint, *flags):
  capsys.readouterr()  # drop what came before (conversion progress)
  generate_cli.main(
    [
      f'--checkpoint={checkpoint}',
      *[f'--prompt={p}' for p in PROMPTS],
      '--max_new_tokens=24',
      '--output=json',
      '--dtype=float32',
      *flags,
    ]
  )
  return json.loads(capsys.readouterr().out)


def test_demo_model_exports_to_hf_and_generates_the_same_text(demo_run, exported, capsys):
  torch = require_oracle('torch')
  transformers = require_oracle('transformers')
  ours = generate(capsys, demo_run)
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
  model.eval()
  for prompt, result in zip(PROMPTS, ours):
    ids = tokenizer(prompt, add_special_tokens=False)['input_ids']
    assert ids == result['prompt_ids']  # the exported tokenizer encodes as k2jax's
    with torch.no_grad():
      generated = model.generate(
        torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=1, pad_token_id=1
      )
    theirs = generated[0, len(ids) :].tolist()
    assert theirs == result['ids'], (prompt, theirs, result['ids'])
    text = tokenizer.decode([t for t in theirs if t != 1])
    assert text == result['text'] and len(text) > 10


def test_from_hf_records_the_tokenizer_and_generates_text(demo_run, exported, tmp_path, capsys):
  """from-hf of a folder holding tokenizer.model (no tokenizer.json) records it,
  so the converted checkpoint generates text with no --tokenizer, as the run it came from;
  `--tokenizer=<HF folder>` works too, and so does the checkpoint once moved elsewhere."""
  assert {'tokenizer.model', 'tokenizer_config.json'} <= set(os.listdir(exported))
  assert not os.path.exists(os.path.join(exported, 'tokenizer.json'))
  back = str(tmp_path / 'back')
  convert_cli.main(['from-hf', f'--hf={exported}', f'--out={back}'])
  assert 'tokenizer.model copied to' in capsys.readouterr().out

  ours = generate(capsys, demo_run)
  assert all(len(row['text']) > 10 for row in ours), ours
  assert generate(capsys, back) == ours
  assert generate(capsys, back, f'--tokenizer={exported}') == ours
  moved = str(tmp_path / 'moved')
  os.rename(back, moved)  # data.tokenizer names back/tokenizer/: the copy beside params/ is used
  assert generate(capsys, moved) == ours
