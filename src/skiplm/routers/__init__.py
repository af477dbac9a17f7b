"""Trained per-sequence routers, registered in :data:`skiplm.registry.ROUTERS`.

* ``first`` (:mod:`.first`, FiRST, arXiv 2410.12513): a router per skippable layer reads the prompt at prefill and
  decides, per row, which layers the whole sequence skips (the KV cache stays valid); :mod:`.train` trains the
  routers with soft gates, a skip-rate cost and LoRA by distillation toward the full model, and calibrates their
  threshold to a target speedup. ``skiplm first`` on the command line; the folder it writes is a skipper
  (``skiplm.load_skipper(folder)``, ``--plan FOLDER/first.json`` in ``bench`` / ``eval`` / ``generate``).
"""

from ..registry import ROUTERS
from .first import (FORMAT_NAME, RECORD_FILE, FiRST, FirstHandle, RouterError, Routers, RouterStats, SoftGateHandle,
                    SoftGates, load_first, protected_layers)
from .train import blocks_for_speedup, calibrate_threshold, skipped_per_sequence, train_first

__all__ = ["FORMAT_NAME", "RECORD_FILE", "ROUTERS", "FiRST", "FirstHandle", "RouterError", "RouterStats", "Routers",
           "SoftGateHandle", "SoftGates", "blocks_for_speedup", "calibrate_threshold", "load_first",
           "protected_layers", "skipped_per_sequence", "train_first"]
