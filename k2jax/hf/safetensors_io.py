"""safetensors files, written and read a piece at a time, never whole tensors.

Owns `SafetensorsShards` (preallocated, memory-mapped shards that to-hf fills chunk by chunk),
`hf_weights` (which file holds each tensor of an HF folder; refuses pickles) and `HFReader`
(boxes of k2jax parameters read from slices, for from-hf). This is what bounds host memory at
any model size; where each tensor goes is k2jax.hf.schema's.
"""

import contextlib
import json
import math
import mmap
import os

import numpy as np

from k2jax.hf.schema import (
  IGNORED_HF,
  LAYER_PREFIX,
  TENSORS,
  hf_index,
  hf_shape,
  layer_shape,
  numpy_index,
  read_json,
)

# --- writing: to-hf -----------------------------------------------------------------------

ST_DTYPES = {'float32': 'F32', 'bfloat16': 'BF16', 'float16': 'F16'}


def _np_dtype(name: str):
  import ml_dtypes  # registers bfloat16 with numpy

  return np.dtype(ml_dtypes.bfloat16) if name == 'bfloat16' else np.dtype(name)


class SafetensorsShards:
  """Preallocated safetensors files filled in any order through memory maps: a tensor can be
  written piece by piece as the chunks that hold it are read."""

  def __init__(
    self, out_dir: str, tensors: list[tuple[str, tuple]], dtype: str, shard_bytes: float
  ):
    self._dtype = _np_dtype(dtype)
    self.itemsize = self._dtype.itemsize
    groups, size = [[]], 0
    for name, shape in tensors:
      nbytes = math.prod(shape) * self._dtype.itemsize
      if groups[-1] and size + nbytes > shard_bytes:
        groups.append([])
        size = 0
      groups[-1].append((name, shape, nbytes))
      size += nbytes
    self.files, self.total_bytes, self._views, self._maps = {}, 0, {}, []
    for i, group in enumerate(groups):
      filename = f'model-{i + 1:05d}-of-{len(groups):05d}.safetensors'
      header, offset = {'__metadata__': {'format': 'pt'}}, 0
      for name, shape, nbytes in group:
        header[name] = {
          'dtype': ST_DTYPES[dtype],
          'shape': list(shape),
          'data_offsets': [offset, offset + nbytes],
        }
        self.files[name] = filename
        offset += nbytes
      encoded = json.dumps(header, separators=(',', ':')).encode()
      encoded += b' ' * (-len(encoded) % 8)  # data starts 8-byte aligned
      start = 8 + len(encoded)
      with open(os.path.join(out_dir, filename), 'w+b') as f:
        f.write(len(encoded).to_bytes(8, 'little') + encoded)
        f.truncate(start + offset)  # sparse until written
        self._maps.append(mmap.mmap(f.fileno(), start + offset))
      for name, shape, nbytes in group:
        raw = np.frombuffer(
          self._maps[-1], np.uint8, nbytes, offset=start + header[name]['data_offsets'][0]
        )
        self._views[name] = raw.view(self._dtype).reshape(shape)
      self.total_bytes += offset

  def write(self, name: str, index, values):
    self._views[name][numpy_index(index)] = values.astype(self._dtype)

  def release(self):
    """Flushes written pages and drops them from this process (they stay in the file)."""
    for mapped in self._maps:
      mapped.flush()
      mapped.madvise(mmap.MADV_DONTNEED)

  def close(self) -> dict:
    """Flushes everything; returns model.safetensors.index.json's content."""
    self.release()
    self._views.clear()  # the maps close only once no array views them
    for mapped in self._maps:
      mapped.close()
    return {'metadata': {'total_size': self.total_bytes}, 'weight_map': dict(self.files)}


# --- reading: from-hf ---------------------------------------------------------------------


def hf_weights(hf_dir: str) -> dict[str, str]:
  """{tensor name: safetensors file} of an HF folder; refuses pickles."""
  index_path = os.path.join(hf_dir, 'model.safetensors.index.json')
  if os.path.isfile(index_path):
    weight_map = read_json(index_path).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ValueError(f'{index_path} has no "weight_map" object')
    for filename in sorted(set(weight_map.values())):
      if not os.path.isfile(os.path.join(hf_dir, filename)):
        raise FileNotFoundError(f'{filename}, listed in {index_path}, is missing')
    return {name: os.path.join(hf_dir, f) for name, f in weight_map.items()}
  files = sorted(f for f in os.listdir(hf_dir) if f.endswith('.safetensors'))
  if not files:
    pickles = sorted(f for f in os.listdir(hf_dir) if f.endswith(('.bin', '.pt', '.pth')))
    if pickles:
      raise ValueError(
        f'{hf_dir} holds only PyTorch pickle weights ({", ".join(pickles[:3])}): '
        'k2jax reads safetensors only and never unpickles; re-save the model '
        'with save_pretrained(safe_serialization=True) where you trust the file'
      )
    raise FileNotFoundError(f'{hf_dir} has no *.safetensors weights')
  from safetensors import safe_open

  weights = {}
  for filename in files:
    with safe_open(os.path.join(hf_dir, filename), 'np') as f:
      weights.update({name: os.path.join(hf_dir, filename) for name in f.keys()})
  return weights


class HFReader:
  """Reads boxes of k2jax parameters out of an HF folder's safetensors, slice by slice."""

  def __init__(self, hf_dir: str, weights: dict[str, str], stack: contextlib.ExitStack):
    import ml_dtypes  # noqa: F401  (numpy learns bfloat16, which safetensors returns)
    from safetensors import safe_open

    self._dir, self._weights = hf_dir, weights
    self._files = {f: stack.enter_context(safe_open(f, 'np')) for f in set(weights.values())}

  def check(self, shapes: dict, entries):
    """ValueError naming the first tensor that is missing, extra, mis-shaped or not float."""
    expected = dict(entries)
    keys = {f: set(handle.keys()) for f, handle in self._files.items()}
    for name, path in expected.items():
      filename = self._weights.get(name)
      if filename is None or name not in keys[filename]:
        where = f' (the index names {os.path.basename(filename)})' if filename else ''
        raise ValueError(f'{self._dir}: tensor {name} is missing{where}')
      tensor = self._files[filename].get_slice(name)
      want, got = (
        hf_shape(TENSORS[path], layer_shape(path, shapes[path].shape)),
        tuple(tensor.get_shape()),
      )
      if got != want:
        raise ValueError(
          f'{self._dir}: tensor {name} has shape {got}, expected {want} from config.json'
        )
      if tensor.get_dtype() not in ST_DTYPES.values():
        raise ValueError(
          f'{self._dir}: tensor {name} is {tensor.get_dtype()}, not one of '
          f'{"|".join(ST_DTYPES.values())}'
        )
    for name, filename in self._weights.items():
      if name not in expected and not IGNORED_HF.match(name):
        raise ValueError(
          f'{self._dir}: tensor {name} ({os.path.basename(filename)}) has no '
          'place in k2jax (biases, tied or extra weights are not supported)'
        )

  def read(self, path: str, box, shape, dtype) -> np.ndarray:
    """The box (slices over the stacked shape) of parameter `path`, as `dtype`."""
    if not path.startswith(LAYER_PREFIX):
      return self._read(TENSORS[path].hf, path, box, shape).astype(dtype, copy=False)
    out = np.empty([b.stop - b.start for b in box], dtype)  # filled layer by layer
    for j, layer in enumerate(range(box[0].start, box[0].stop)):
      out[j] = self._read(TENSORS[path].hf.format(layer), path, box[1:], shape[1:])
    return out

  def _read(self, name, path, box, shape):
    spec = TENSORS[path]
    index = hf_index(spec, box, shape)
    # safetensors slices by ranges: read the bounding range, then pick within it.
    bounds = tuple(
      i if isinstance(i, slice) else slice(int(i.min()), int(i.max()) + 1) for i in index
    )
    values = self._files[self._weights[name]].get_slice(name)[bounds]
    if not all(isinstance(i, slice) for i in index):
      values = values[
        numpy_index(
          tuple(
            slice(0, b.stop - b.start) if isinstance(i, slice) else i - b.start
            for i, b in zip(index, bounds)
          )
        )
      ]
    permuted = [box[p].stop - box[p].start for p in spec.perm]
    values = values.reshape(permuted).transpose(np.argsort(spec.perm)).astype(np.float32)
    return values - 1.0 if spec.norm else values
