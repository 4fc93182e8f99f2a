"""k2jax checkpoints <-> Hugging Face `LlamaForCausalLM` folders (safetensors only).

    python -m k2jax.convert to-hf --checkpoint=WORKDIR_OR_STEP --out=DIR \
        [--dtype=bfloat16|float32] [--tokenizer=PATH] [--shard_size=5GB]
    python -m k2jax.convert from-hf --hf=DIR --out=CKPT [--config=configs/sft.py] [--mesh=data:8]

to-hf streams: each Orbax array is read one storage chunk at a time with TensorStore and
scattered straight into preallocated, memory-mapped safetensors shards, so host memory is a
few times the largest chunk (Orbax keeps those <= 2 GiB) at any model size, and every chunk is
read once. from-hf reads each device's shard of each parameter from safetensors slices onto
a device mesh and writes `CKPT/params/` (Orbax, the training tree) and `CKPT/config/` (a run
config naming the model), which `--config.init_from=CKPT` and to-hf read. docs/hf.md has the
HF form and the memory each direction needs for 70B.

This module is the Orbax side and the CLI. The rest lives in:
  k2jax.hf_format       the HF tensor map (`TENSORS`) and config.json, both directions
  k2jax.hf_tokenizer    the exported tokenizer files and their chat template
  k2jax.safetensors_io  sharded safetensors writing (`SafetensorsShards`) and reading (`HFReader`)
"""

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import sys
import time

import numpy as np
from absl import logging

from k2jax import run_config
from k2jax.hf.safetensors_io import HFReader, SafetensorsShards, hf_weights
from k2jax.hf.schema import (
  LAYER_PREFIX,
  SHAPE_FIELDS,
  TENSORS,
  _inner,
  _param_shapes,
  _preset_of,
  _read_json,
  _write_json,
  hf_config,
  hf_entries,
  hf_index,
  hf_shape,
  model_config_from_hf,
)
from k2jax.hf.tokenizer import export_tokenizer
from k2jax.model import config as model_config

# Errors that mean "the input is wrong": reported in one line, no traceback (as k2jax.train).
USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError)
GB = 1e9


# --- to-hf --------------------------------------------------------------------------------


def _chunks(shape, chunk):
  """The storage chunks of an array, as boxes: each is read (and decompressed) exactly once.
  Reading less than a chunk would save no memory, as TensorStore decodes whole chunks."""
  for start in itertools.product(*(range(0, s, c) for s, c in zip(shape, chunk))):
    yield tuple(slice(a, min(a + c, s)) for a, c, s in zip(start, chunk, shape))


def _open_params(params_dir: str) -> dict:
  """{path: TensorStore} of an Orbax params/ item, opened as Orbax itself reads it."""
  import jax
  import orbax.checkpoint as ocp
  import tensorstore as ts
  from etils import epath

  from k2jax.parallel import sharding

  metadata = ocp.StandardCheckpointer().metadata(params_dir).item_metadata
  parent = epath.Path(params_dir)
  use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(parent)
  context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)  # caches no array data
  stores = {}
  for path, meta in jax.tree_util.tree_flatten_with_path(metadata.tree)[0]:
    info = ocp.type_handlers.ParamInfo(
      name=meta.name, parent_dir=parent, ts_context=context, use_zarr3=metadata.use_zarr3
    )
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
    stores[sharding.path_name(path)] = ts.open(spec, context=context, read=True).result()
  return stores


def _run_config(step_dir: str) -> dict:
  path = os.path.join(step_dir, 'config')
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f'{step_dir} has no config/ item (the run config that names the '
      'model, its RoPE base and sequence length)'
    )
  import orbax.checkpoint as ocp

  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)


def _copy_array(store, path: str, shards: SafetensorsShards):
  """Reads one Orbax array chunk by chunk into its HF tensors; yields bytes written."""
  spec, layered = TENSORS[path], path.startswith(LAYER_PREFIX)
  inner_shape = _inner(path, store.shape)
  for box in _chunks(store.shape, store.chunk_layout.read_chunk.shape):
    block = store[box].read().result()
    for j, layer in enumerate(range(box[0].start, box[0].stop) if layered else [None]):
      name, values, inner = (
        (spec.hf.format(layer), block[j], box[1:]) if layered else (spec.hf, block, box)
      )
      if spec.norm:
        values = values.astype(np.float32) + 1.0
      index = hf_index(spec, inner, inner_shape)
      shape = [i.stop - i.start if isinstance(i, slice) else i.size for i in index]
      shards.write(name, index, values.transpose(spec.perm).reshape(shape))
    yield block.size * shards.itemsize


def _check_out(out: str):
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ValueError(f'--out={out} exists and is not an empty directory')


def to_hf(
  checkpoint: str,
  out: str,
  *,
  dtype: str = 'bfloat16',
  tokenizer: str | None = None,
  shard_size: float = 5 * GB,
  log=print,
) -> str:
  """Writes `out`: config.json, generation_config.json, sharded safetensors with their
  index, and the tokenizer. Returns the step directory converted."""
  import ml_collections

  from k2jax.training import checkpoint as checkpoints

  if dtype not in ('bfloat16', 'float32'):
    raise ValueError(f'--dtype={dtype} is not one of bfloat16|float32')
  try:
    step_dir = checkpoints.resolve_step_dir(checkpoint)
  except FileNotFoundError:
    raise FileNotFoundError(
      f'--checkpoint={checkpoint} is neither a step directory (with '
      'params/) nor a workdir with a committed checkpoint'
    ) from None
  run = _run_config(step_dir)
  if not isinstance(run.get('model'), dict) or 'seq_len' not in run.get('data', {}):
    raise ValueError(f'{step_dir}/config names no model or data.seq_len')
  model = model_config.from_config(ml_collections.ConfigDict(run['model']))
  seq_len = int(run['data']['seq_len'])
  shapes, _ = _param_shapes(model)
  checkpoints.check_params_fit(step_dir, shapes)
  tokenizer = tokenizer or run['data'].get('tokenizer') or None
  if tokenizer and not os.path.exists(tokenizer):
    raise FileNotFoundError(f'tokenizer {tokenizer} does not exist (pass --tokenizer=PATH)')
  _check_out(out)

  partial = out.rstrip('/') + '.partial'  # renamed to `out` once complete
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  ids = {'bos_token_id': 0, 'eos_token_id': 1}  # K2-V2's ids when no tokenizer says otherwise
  if tokenizer:  # first: a tokenizer that does not fit fails before the long part
    ids = export_tokenizer(tokenizer, partial, seq_len, model.vocab_size)
  else:
    log('to-hf: no tokenizer (pass --tokenizer=PATH): weights and configs only')
  shards = SafetensorsShards(
    partial,
    [
      (name, hf_shape(TENSORS[path], _inner(path, shapes[path].shape)))
      for name, path in hf_entries(model, shapes)
    ],
    dtype,
    shard_size,
  )
  total = shards.total_bytes / GB
  log(
    f'to-hf: {step_dir} -> {out}: {total:.2f} GB {dtype} in '
    f'{len(set(shards.files.values()))} file(s)'
  )
  stores = _open_params(os.path.join(step_dir, 'params'))
  written = unreleased = 0
  last_log = time.time()
  for n, path in enumerate(TENSORS):
    for nbytes in _copy_array(stores[path], path, shards):
      written, unreleased = written + nbytes, unreleased + nbytes
      if unreleased > GB:  # keeps the written pages out of this process's memory
        shards.release()
        unreleased = 0
      if time.time() - last_log > 10:
        log(f'to-hf: [{n + 1}/{len(TENSORS)}] {path}: {written / GB:.2f} of {total:.2f} GB')
        last_log = time.time()
    shards.release()
    log(f'to-hf: [{n + 1}/{len(TENSORS)}] {path} done, {written / GB:.2f} of {total:.2f} GB')
  _write_json(os.path.join(partial, 'model.safetensors.index.json'), shards.close())
  _write_json(os.path.join(partial, 'config.json'), hf_config(model, seq_len, dtype, ids))
  _write_json(os.path.join(partial, 'generation_config.json'), ids)
  if os.path.isdir(out):
    os.rmdir(out)  # empty, checked above
  os.rename(partial, out)
  log(f'to-hf: wrote {out}')
  return step_dir


# --- from-hf ------------------------------------------------------------------------------


def parse_mesh(spec: str):
  """'data:8,tensor:2' -> the `mesh` config section (missing axes 1, FSDP on)."""
  import ml_collections

  from k2jax.parallel import sharding

  sizes = {**dict.fromkeys(sharding.AXES, 1), **run_config.parse_mesh(spec)}
  return ml_collections.ConfigDict(dict(sizes, fsdp=True))


def _sharded_array(shape, sharding, read):
  """jax.make_array_from_callback, but each shard goes to its device as soon as it is read,
  so the host holds one shard at a time instead of every local shard of the array."""
  import jax

  arrays, placed = [], {}
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
    key = tuple((s.start, s.stop) for s in box)
    source = placed.get(key)  # a replica: copy the device array, do not read again
    arrays.append(jax.device_put(read(box) if source is None else source, device))
    placed.setdefault(key, arrays[-1])
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _stage_run_config(model, max_positions: int, hf_dir: str, config: str | None, log):
  """(ModelConfig, run config JSON) for the output's config/ item; --config must match."""
  tokenizer = hf_dir if os.path.isfile(os.path.join(hf_dir, 'tokenizer.json')) else ''
  run = {
    'model': {
      'preset': _preset_of(model),
      'param_dtype': 'float32',
      **{f: getattr(model, f) for f in SHAPE_FIELDS + ('rope_base', 'norm_eps')},
    },
    'data': {'seq_len': max_positions, 'tokenizer': tokenizer},
  }
  if config:
    stage = run_config.load(config)
    wanted = model_config.from_config(stage.model)
    for field in SHAPE_FIELDS + ('norm_eps',):
      if getattr(wanted, field) != getattr(model, field):
        raise ValueError(
          f'{hf_dir}/config.json: model.{field} is {getattr(model, field)} but '
          f'--config={config} has {getattr(wanted, field)}'
        )
    if wanted.rope_base != model.rope_base:
      log(
        f'from-hf: note: the HF model uses RoPE base {model.rope_base:g}; --config={config} '
        f'trains with {wanted.rope_base:g}'
      )
    model, run = wanted, json.loads(stage.to_json_best_effort())
  return model, dict(run, converted_from=os.path.abspath(hf_dir))


def from_hf(
  hf_dir: str, out: str, *, config: str | None = None, mesh: str = 'data:-1', log=print
) -> model_config.ModelConfig:
  """Writes `out/params` (Orbax, the training tree and dtypes) and `out/config` (a run
  config JSON naming the model); returns the model's config."""
  import flax.linen as nn
  import jax
  import orbax.checkpoint as ocp

  from k2jax.parallel import sharding

  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f'--hf={hf_dir} is not a directory')
  if os.path.exists(out):
    raise ValueError(f'--out={out} already exists')
  config_path = os.path.join(hf_dir, 'config.json')
  model, max_positions = model_config_from_hf(_read_json(config_path), config_path)
  weights = hf_weights(hf_dir)
  model, run = _stage_run_config(model, max_positions, hf_dir, config, log)
  shapes, boxed = _param_shapes(model)
  device_mesh = sharding.make_mesh(parse_mesh(mesh))
  shardings = sharding.param_shardings(device_mesh, boxed, fsdp=True)
  with contextlib.ExitStack() as stack:
    reader = HFReader(hf_dir, weights, stack)
    reader.check(shapes, hf_entries(model, shapes))
    done = []

    def build(key_path, abstract, array_sharding):
      path = sharding.path_name(key_path)
      array = _sharded_array(
        abstract.shape,
        array_sharding,
        lambda box: reader.read(path, box, abstract.shape, abstract.dtype),
      )
      done.append(array.nbytes)
      log(
        f'from-hf: [{len(done)}/{len(shapes)}] {path} {abstract.shape}, '
        f'{sum(done) / GB:.2f} GB read'
      )
      return array

    params = jax.tree_util.tree_map_with_path(build, nn.unbox(boxed), shardings)
  out = os.path.abspath(out)
  log(f'from-hf: saving {out}/params (mesh {sharding.describe(device_mesh)})')
  # The training tree in StandardCheckpointer's format; the device-to-host copies Orbax makes
  # to write are capped, else it would stage every local shard on the host at once.
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(save_device_host_concurrent_gb=1)) as ckpt:
    ckpt.save(os.path.join(out, 'params'), args=ocp.args.PyTreeSave(params))
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckpt:
    ckpt.save(os.path.join(out, 'config'), args=ocp.args.JsonSave(run))
  log(f'from-hf: wrote {out} (use it as --config.init_from={out})')
  return model


# --- CLI ----------------------------------------------------------------------------------


def parse_size(text: str) -> float:
  """'5GB', '500MB', '2e9' -> bytes."""
  match = re.fullmatch(r'\s*(\d+(?:\.\d*)?(?:e\d+)?)\s*([kmg]i?b)?\s*', text, re.IGNORECASE)
  units = {None: 1, 'kb': 1e3, 'mb': 1e6, 'gb': 1e9, 'kib': 2**10, 'mib': 2**20, 'gib': 2**30}
  try:
    value = float(match.group(1)) * units[(match.group(2) or '').lower() or None]
  except (AttributeError, ValueError):
    value = 0
  if value <= 0:
    raise ValueError(f'--shard_size={text}: expected a positive size such as 5GB or 500MB')
  return value


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit 2, like every k2jax CLI
    run_config.fail(message)


def main(argv=None):
  parser = _Parser(prog='python -m k2jax.convert', description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True)
  to = commands.add_parser('to-hf', help='a k2jax checkpoint -> an HF LlamaForCausalLM folder')
  to.add_argument('--checkpoint', required=True, help='workdir, checkpoints dir or step dir')
  to.add_argument('--out', required=True, help='HF folder to write (new or empty)')
  to.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  to.add_argument(
    '--tokenizer',
    help='SentencePiece .model, tokenizer.json or a folder with '
    "one (default: the run config's data.tokenizer)",
  )
  to.add_argument('--shard_size', default='5GB', help='largest safetensors file')
  back = commands.add_parser('from-hf', help='an HF LlamaForCausalLM folder -> params/ + config/')
  back.add_argument('--hf', required=True, help='HF folder: config.json + *.safetensors')
  back.add_argument('--out', required=True, help='directory to create (use as init_from)')
  back.add_argument('--config', help='stage config file[:args] the model must match')
  back.add_argument(
    '--mesh',
    default='data:-1',
    help='device mesh to shard the parameters '
    'over while converting, e.g. data:8 or data:4,tensor:2',
  )
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.ERROR)  # Orbax's notes would drown the progress lines
  log = lambda message: print(message, flush=True)  # noqa: E731
  try:
    if args.command == 'to-hf':
      to_hf(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        shard_size=parse_size(args.shard_size),
        log=log,
      )
    else:
      from_hf(args.hf, args.out, config=args.config, mesh=args.mesh, log=log)
  except USER_ERRORS as error:
    run_config.fail(str(error))


if __name__ == '__main__':
  main(sys.argv[1:])
