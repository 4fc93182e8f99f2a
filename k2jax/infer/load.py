"""A checkpoint on a mesh, and its tokenizer: what generation, evaluation and lm-eval read.

`load` takes a training workdir (its newest committed step), its checkpoints directory, one
step directory, or what `k2jax.convert from-hf` writes, reads the run config saved with it
(k2jax.training.checkpoint.read_run_config) and restores the parameters straight onto a mesh's
shardings. `tokenizer` finds the tokenizer that goes with it: `--tokenizer`, else the run
config's `data.tokenizer`, else the tokenizer/ folder from-hf copied beside the parameters;
a folder holds `tokenizer.json` or `tokenizer.model`.
"""

import dataclasses
import math
import os

DTYPES = ('bfloat16', 'float32')
# What a tokenizer path may be, for the messages that ask for one.
TOKENIZER_FORMS = 'a SentencePiece .model, an HF tokenizer.json, or a folder holding one'


def parse_mesh(spec: str) -> dict:
  """'data:1,tensor:2' -> {'data': 1, 'tensor': 2, 'sequence': 1}; -1 fills the devices."""
  from k2jax import run_config
  from k2jax.parallel import sharding

  return {**dict.fromkeys(sharding.AXES, 1), **run_config.parse_mesh(spec)}


def make_mesh(spec: str):
  """A mesh over as many devices as the spec names (all of them when an axis is -1)."""
  import jax
  import ml_collections

  from k2jax.parallel import sharding

  sizes = parse_mesh(spec)
  devices = jax.devices()
  if -1 not in sizes.values():
    wanted = math.prod(sizes.values())
    if wanted > len(devices):
      raise ValueError(f'--mesh={spec} needs {wanted} devices, {len(devices)} are available')
    devices = devices[:wanted]
  return sharding.make_mesh(ml_collections.ConfigDict(sizes), devices)


@dataclasses.dataclass
class Loaded:
  """A checkpoint on a mesh: what generation and evaluation need."""

  params: dict
  model_cfg: object  # ModelConfig
  run_cfg: object  # ml_collections.ConfigDict of the run that saved it
  step_dir: str
  mesh: object
  fsdp: bool | str = False


def load(
  checkpoint: str,
  *,
  mesh_spec: str = 'data:1,tensor:1',
  dtype: str | None = None,
  param_dtype: str | None = None,
  fsdp: bool | str = False,
) -> Loaded:
  """Restores a checkpoint's parameters straight onto `mesh_spec`'s shardings.

  `checkpoint` is a workdir (its newest step), a checkpoints directory or a step directory.
  `dtype` is the compute dtype (default: the run's), `param_dtype` the dtype the weights are
  restored in (default: as saved, float32); remat is off since nothing is differentiated.
  """
  import flax.linen as nn
  import jax
  import ml_collections
  import orbax.checkpoint as ocp

  from k2jax.model import config as model_config
  from k2jax.model.transformer import Transformer
  from k2jax.parallel import sharding
  from k2jax.training import checkpoint as ckpt
  from k2jax.training import train_step

  for name, value in (('dtype', dtype), ('param_dtype', param_dtype)):
    if value is not None and value not in DTYPES:
      raise ValueError(f'--{name}={value} is not one of {"|".join(DTYPES)}')
  try:
    step_dir = ckpt.resolve_step_dir(checkpoint)
  except FileNotFoundError:
    raise FileNotFoundError(
      f'checkpoint {checkpoint} is neither a step directory (with '
      'params/) nor a workdir or checkpoints directory with a committed '
      'step'
    ) from None
  run_cfg = ml_collections.ConfigDict(ckpt.read_run_config(step_dir))
  model_cfg = model_config.from_config(run_cfg.model)
  model_cfg = dataclasses.replace(
    model_cfg,
    remat='none',
    dtype=dtype or model_cfg.dtype,
    param_dtype=param_dtype or model_cfg.param_dtype,
  )
  mesh = make_mesh(mesh_spec)
  boxed = train_step.abstract_params(Transformer(model_cfg), 1)
  shardings = sharding.param_shardings(mesh, boxed, fsdp)  # checks the dims divide
  abstract = nn.unbox(boxed)
  try:
    ckpt.check_params_fit(step_dir, abstract)
  except ValueError as error:  # its messages speak of init_from
    raise ValueError(str(error).replace('init_from ', 'checkpoint ', 1)) from None
  # Orbax casts to the target dtype while reading, so nothing is materialized twice.
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(step_dir, 'params'), target)
  return Loaded(
    params=params, model_cfg=model_cfg, run_cfg=run_cfg, step_dir=step_dir, mesh=mesh, fsdp=fsdp
  )


# --- the tokenizer -------------------------------------------------------------------------


def tokenizer_path(loaded: Loaded, override: str | None = None) -> str | None:
  """The tokenizer file for `loaded`: `override` (--tokenizer), else the one its checkpoint
  names (k2jax.hf.tokenizer.checkpoint_tokenizer); a folder resolves to its tokenizer.json or
  tokenizer.model. None when nothing names one; FileNotFoundError when a named one is gone."""
  from data_pipeline.tokenizer import tokenizer_file
  from k2jax.hf.tokenizer import checkpoint_tokenizer

  if override:
    return tokenizer_file(override)
  named = checkpoint_tokenizer(loaded.step_dir, loaded.run_cfg.to_dict())
  if not named:
    return None
  try:
    return tokenizer_file(named)
  except FileNotFoundError as error:
    raise FileNotFoundError(
      f'{error}: the run config of {loaded.step_dir} names it as data.tokenizer; '
      f'pass --tokenizer=PATH ({TOKENIZER_FORMS})'
    ) from None


def require_tokenizer_path(
  loaded: Loaded, override: str | None, needed_by: str, hint: str = ''
) -> str:
  """`tokenizer_path`, or a ValueError saying that `needed_by` (an option, or what the
  command does) needs a tokenizer and how to give one; `hint` ends the message."""
  path = tokenizer_path(loaded, override)
  if path is None:
    raise ValueError(
      f'{needed_by} needs a tokenizer, and the run config of {loaded.step_dir} names none '
      f'(data.tokenizer is empty): pass --tokenizer=PATH ({TOKENIZER_FORMS}){hint}'
    )
  return path


def load_tokenizer(
  loaded: Loaded, override: str | None = None, *, needed_by: str | None = None, hint: str = ''
):
  """The tokenizer for `loaded` (see `tokenizer_path`), checked against the model's
  vocabulary. With `needed_by`, a missing one is an error naming it (require_tokenizer_path);
  without, None."""
  from data_pipeline import tokenizer as tokenizers

  if needed_by is None:
    path = tokenizer_path(loaded, override)
    if path is None:
      return None
  else:
    path = require_tokenizer_path(loaded, override, needed_by, hint)
  tokenizer = tokenizers.load_tokenizer(path)
  if tokenizer.vocab_size > loaded.model_cfg.vocab_size:
    raise ValueError(
      f'tokenizer {path} has {tokenizer.vocab_size} tokens, more than the model '
      f'(model.vocab_size={loaded.model_cfg.vocab_size})'
    )
  return tokenizer
