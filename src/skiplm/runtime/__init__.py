"""The runtime every skipper installs through: the hook machinery (:mod:`.hooks`) and static plans' swapped forwards
(:mod:`.static`). Apply any skipper with :func:`skiplm.apply`."""

from .hooks import (HANDLE_ATTRIBUTE, Installed, advance_cache, attach, cache_from, check_free, check_layers,
                    decoder_stack, install_handle, installed_handle, phase_of)
from .static import SkipHandle, SkipState, install_plan

__all__ = ["HANDLE_ATTRIBUTE", "Installed", "SkipHandle", "SkipState", "advance_cache", "attach", "cache_from",
           "check_free", "check_layers", "decoder_stack", "install_handle", "install_plan", "installed_handle",
           "phase_of"]
