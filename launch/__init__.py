"""Launchers for multi-host runs: SLURM, Kubernetes, plain environment variables (docs/multihost.md).

Run from the repository root (`python -m launch.local ...`); not part of the installed package.
"""
