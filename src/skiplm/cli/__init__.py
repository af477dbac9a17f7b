"""The `skiplm` command line: one module per command group; each command parses its options, calls the library and
prints. The group and what every command shares live in :mod:`.common`."""

from . import analysis, data, first, heal, measure, plan, policy, run, serve, speculative, sweep  # noqa: F401  (each registers its commands)
from . import lora_drop  # noqa: F401  (registers `skiplm lora-drop`)
from .common import cli, main

__all__ = ["cli", "main"]
