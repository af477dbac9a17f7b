"""The `skiplm` command line: commands parse their options, call the library and print."""

from .core import cli, main

__all__ = ["cli", "main"]
