"""Plots of input-adaptive policies: the activation map (which MLPs ran, token by layer) of a recorded run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ...errors import PlanError
from . import pyplot, save_figure


def plot_activation_maps(maps: Sequence, num_layers: int, path: str | Path, title: str) -> Path:
    """A token x layer picture of which MLPs ran: prefill (first row of the batch) and decode steps side by side.
    ``maps``: the :class:`~skiplm.policies.ActivationMap` list a handle recorded (``record=True``)."""
    panels = []
    prefill = [m for m in maps if m.phase == "prefill"]
    if prefill:
        panels.append(("prompt processing (prefill)", prefill[0].grid("mlp", num_layers)[:, 0, :].float()))
    decode = [m for m in maps if m.phase == "decode"]
    if decode:
        grids = [m.grid("mlp", num_layers)[:, 0, :] for m in decode]
        panels.append(("response generation (decode)", torch.cat(grids, dim=1).float()))
    if not panels:
        raise PlanError("no activation maps were recorded: run a forward pass with record=True first.")
    fig, axes = pyplot().subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for axis, (name, grid) in zip(axes[0], panels):
        axis.imshow(grid.numpy(), aspect="auto", cmap="Greys_r", vmin=0, vmax=1, origin="lower", interpolation="nearest")
        axis.set_title(f"{name}: {grid.mean():.0%} of MLPs active")
        axis.set_xlabel("token")
        axis.set_ylabel("layer")
    fig.suptitle(f"{title} (white: MLP ran; black: skipped)")
    return save_figure(fig, path, dpi=110)


__all__ = ["plot_activation_maps"]
