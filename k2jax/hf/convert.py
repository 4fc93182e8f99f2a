"""k2jax checkpoints <-> Hugging Face `LlamaForCausalLM` folders (safetensors only): the
library behind `python -m k2jax.convert` (k2jax/convert.py, the command line).

`to_hf` streams: each Orbax array is read one storage chunk at a time with TensorStore and
scattered straight into preallocated, memory-mapped safetensors shards, so host memory is a
few times the largest chunk (Orbax keeps those <= 2 GiB) at any model size, and every chunk is
read once. `from_hf` reads each device's shard of each parameter from safetensors slices onto
a device mesh and writes `CKPT/params/` (Orbax, the training tree), `CKPT/config/` (a run
config naming the model and its tokenizer) and `CKPT/tokenizer/` (the HF folder's tokenizer
files, when it has some), which `--config.init_from=CKPT`, to-hf, generate and evaluate read.
docs/hf.md has the HF form and the memory each direction needs for 70B.

This module is the Orbax side. The rest lives beside it:
  k2jax.hf.schema          the HF tensor map (`TENSORS`) and config.json, both directions
  k2jax.hf.tokenizer       the tokenizer files (exported with their chat template, imported)
  k2jax.hf.safetensors_io  sharded safetensors writing (`SafetensorsShards`) and reading (`HFReader`)
"""

import contextlib
import itertools
import json
import os
import shutil
import time

import numpy as np

from data_pipeline.tokenizer import tokenizer_file
from k2jax import run_config
from k2jax.hf.safetensors_io import HFReader, SafetensorsShards, hf_weights
from k2jax.hf.schema import (
  LAYER_PREFIX,
  TENSORS,
  hf_config,
  hf_entries,
  hf_index,
  hf_shape,
  layer_shape,
  model_config_from_hf,
  param_shapes,
  preset_of,
  read_json,
  write_json,
)
from k2jax.hf.tokenizer import (
  CHECKPOINT_TOKENIZER_DIR,
  checkpoint_tokenizer,
  export_tokenizer,
  import_tokenizer,
)
from k2jax.model import config as model_config

GB = 1e9
DTYPES = ('bfloat16', 'float32')


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


def _copy_array(store, path: str, shards: SafetensorsShards):
  """Reads one Orbax array chunk by chunk into its HF tensors; yields bytes written."""
  spec, layered = TENSORS[path], path.startswith(LAYER_PREFIX)
  inner_shape = layer_shape(path, store.shape)
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

  if dtype not in DTYPES:
    raise ValueError(f'--dtype={dtype} is not one of bfloat16|float32')
  try:
    step_dir = checkpoints.resolve_step_dir(checkpoint)
  except FileNotFoundError:
    raise FileNotFoundError(
      f'--checkpoint={checkpoint} is neither a step directory (with '
      'params/) nor a workdir with a committed checkpoint'
    ) from None
  run = checkpoints.read_run_config(step_dir)
  if not isinstance(run.get('model'), dict) or 'seq_len' not in run.get('data', {}):
    raise ValueError(f'{step_dir}/config names no model or data.seq_len')
  model = model_config.from_config(ml_collections.ConfigDict(run['model']))
  seq_len = int(run['data']['seq_len'])
  shapes, _ = param_shapes(model)
  checkpoints.check_params_fit(step_dir, shapes)
  tokenizer = tokenizer or checkpoint_tokenizer(step_dir, run)
  if tokenizer:
    try:
      tokenizer = tokenizer_file(tokenizer)  # a folder holds tokenizer.json or tokenizer.model
    except FileNotFoundError as error:
      raise FileNotFoundError(f'{error} (pass --tokenizer=PATH)') from None
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
      (name, hf_shape(TENSORS[path], layer_shape(path, shapes[path].shape)))
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
  write_json(os.path.join(partial, 'model.safetensors.index.json'), shards.close())
  write_json(os.path.join(partial, 'config.json'), hf_config(model, seq_len, dtype, ids))
  write_json(os.path.join(partial, 'generation_config.json'), ids)
  if os.path.isdir(out):
    os.rmdir(out)  # empty, checked above
  os.rename(partial, out)
  log(f'to-hf: wrote {out}')
  return step_dir


# --- from-hf ------------------------------------------------------------------------------


def parse_mesh(spec: str):
  """'data:8,tensor:2' -> the `mesh` config section (missing axes 1, parameters sharded as
  `mesh.fsdp=full`, so each device reads and holds only its slice)."""
  import ml_collections

  from k2jax.parallel import sharding

  sizes = {**dict.fromkeys(sharding.AXES, 1), **run_config.parse_mesh(spec)}
  return ml_collections.ConfigDict(dict(sizes, fsdp='full'))


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


def _check_hf_tokenizer(hf_dir: str, vocab_size: int) -> None:
  """Loads the HF folder's tokenizer, if it has one, and checks it fits the model, so that
  a tokenizer that cannot serve the checkpoint fails before the weights are read."""
  from data_pipeline.tokenizer import load_tokenizer

  try:
    path = tokenizer_file(hf_dir)
  except FileNotFoundError:
    return
  try:
    tok = load_tokenizer(path)
  except Exception as error:  # the tokenizers library raises plain Exceptions
    lines = str(error).strip().splitlines() or ['']
    raise ValueError(f'{path}: not a tokenizer k2jax can load ({lines[0][:200]})') from None
  if tok.vocab_size > vocab_size:
    raise ValueError(
      f"{path} has {tok.vocab_size} tokens, more than the model's vocab_size={vocab_size}"
    )


def _stage_run_config(model, max_positions: int, hf_dir: str, config: str | None, log):
  """(ModelConfig, run config JSON) for the output's config/ item; --config must match."""
  run = {
    'model': {
      'preset': preset_of(model),
      'param_dtype': 'float32',
      **{f: getattr(model, f) for f in model_config.SHAPE_FIELDS + ('rope_base', 'norm_eps')},
    },
    'data': {'seq_len': max_positions, 'tokenizer': ''},  # set by from_hf when there is one
  }
  if config:
    stage = run_config.load(config)
    wanted = model_config.from_config(stage.model)
    for field in model_config.SHAPE_FIELDS + ('norm_eps',):
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
  """Writes `out/params` (Orbax, the training tree and dtypes), `out/tokenizer/` (the HF
  folder's tokenizer files, when it has some) and `out/config` (a run config JSON naming the
  model and, as `data.tokenizer`, the copied tokenizer); returns the model's config."""
  import flax.linen as nn
  import jax
  import orbax.checkpoint as ocp

  from k2jax.parallel import sharding

  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f'--hf={hf_dir} is not a directory')
  if os.path.exists(out):
    raise ValueError(f'--out={out} already exists')
  config_path = os.path.join(hf_dir, 'config.json')
  model, max_positions = model_config_from_hf(read_json(config_path), config_path)
  weights = hf_weights(hf_dir)
  _check_hf_tokenizer(hf_dir, model.vocab_size)
  model, run = _stage_run_config(model, max_positions, hf_dir, config, log)
  shapes, boxed = param_shapes(model)
  device_mesh = sharding.make_mesh(parse_mesh(mesh))
  shardings = sharding.param_shardings(device_mesh, boxed, fsdp='full')
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
  copied = import_tokenizer(hf_dir, os.path.join(out, CHECKPOINT_TOKENIZER_DIR))
  if copied:  # the HF model's own tokenizer, found by generate / evaluate / to-hf by default
    run['data']['tokenizer'] = copied
    log(f'from-hf: tokenizer {os.path.basename(copied)} copied to {os.path.dirname(copied)}')
  else:
    log(f'from-hf: {hf_dir} has no tokenizer files: pass --tokenizer=PATH to generate text')
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckpt:
    ckpt.save(os.path.join(out, 'config'), args=ocp.args.JsonSave(run))
  log(f'from-hf: wrote {out} (use it as --config.init_from={out})')
  return model
