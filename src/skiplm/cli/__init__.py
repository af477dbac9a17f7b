"""The `skiplm` command line: one module per command group; each command parses its options, calls the library and
prints. The group and what every command shares live in :mod:`.common`."""

from . import analysis, data, heal, measure, plan, policy, run, serve, speculative, sweep  # noqa: F401  (each registers its commands)
from .common import cli, main

__all__ = ["cli", "main"]
