"""k2jax: K2-V2's training pipeline (pre-training, mid-training, SFT) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
  name='k2jax',
  version='0.1.0',
  description="JAX/Flax training system for large dense LLMs, starting with LLM360's K2-V2",
  python_requires='>=3.10',
  packages=find_packages(
    include=['k2jax', 'k2jax.*', 'data_pipeline', 'data_pipeline.*', 'configs', 'configs.*']
  ),
  package_data={'data_pipeline': ['demo/*', 'demo/sft/*'], 'configs': ['data/*.json']},
  # Compatible ranges, so k2jax installs beside other packages; constraints.txt holds the exact
  # versions the test suite ran with (`make` and .ci/run install with it).
  install_requires=[
    'jax>=0.10.2,<0.11',
    'flax>=0.12.8,<0.13',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.8,<0.13',
    'grain>=0.2.18,<0.3',
    'array-record>=0.8.6,<0.9',
    'sentencepiece>=0.2.3,<0.3',
    'tokenizers>=0.23.3,<0.24',  # HF tokenizer.json (K2-V2 ships one)
    'pyarrow>=20',  # parquet sources (TxT360-Midas, TxT360-3efforts)
    'zstandard>=0.23,<1',  # .jsonl.zst sources
    'fsspec>=2024.6',  # URLs as data paths (gcs/s3 need gcsfs/s3fs besides)
    'tqdm>=4.66,<5',  # progress bars of data_pipeline.prepare
    'matplotlib>=3.8,<4',  # the curves of `python -m k2jax.monitor WORKDIR`
    'tensorstore>=0.1.86,<0.2',
    'clu>=0.0.12,<0.1',  # clu.metrics only: clu.metric_writers would pull in TensorFlow
    'ml-collections>=1.1,<2',
    'safetensors>=0.4,<1',
    'absl-py>=2.1,<3',
    'numpy>=2.0,<3',
    'tensorboardX>=2.6,<3',  # TensorBoard event files without TensorFlow
  ],
  extras_require={
    'gpu': ['jax[cuda12]>=0.10.2,<0.11'],
    # The test oracle: HF transformers on a CPU build of torch (2.13.0 is on the machines'
    # disk; any other torch would fetch a multi-GB CUDA build), and the linter at the exact
    # version whose formatting .ci/run checks.
    'dev': [
      'pytest>=9.2,<10',
      'pytest-xdist>=3.8,<4',
      'torch==2.13.0',
      'transformers>=5.23,<6',
      'lm-eval>=0.4.13,<0.5',
      'ruff==0.17.6',
      'ray>=2.60,<3',  # tests of data_pipeline.prepare --engine=ray
    ],
    # `python -m data_pipeline.prepare --engine=ray`: plain ray (no dashboard, no [default]).
    'ray': ['ray>=2.60,<3'],
    # `python -m k2jax.lm_eval_adapter`: lm-evaluation-harness on k2jax checkpoints.
    'eval': ['lm-eval>=0.4.13,<0.5'],
  },
)
