"""Results files: JSON with the machine and versions, a markdown table, and a plot."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
import transformers


def machine_info(device: str = "cpu") -> dict[str, Any]:
    from .. import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "skiplm": __version__,
        "device": device,
        "malloc_keeps_freed_memory": _malloc_tuned(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _malloc_tuned() -> bool:
    from ..system import keep_freed_memory

    return keep_freed_memory()  # idempotent: reports whether the setting is (now) in force


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def measure_label(measure: str, settings: dict) -> str:
    """e.g. "prefill b8" — the token counts are stated once, by :func:`settings_line`."""
    kind, batch = measure.split("_b")
    return f"{kind} b{batch}"


def settings_line(settings: dict) -> str:
    chat = settings.get("decode_prompts") == "gsm8k-chat"
    kind = " (the end of a GSM8K question in the chat template)" if chat else ""
    return (f"prefill: {settings['prompt_tokens']} prompt tokens per row; decode: {settings['new_tokens']} greedy steps "
            f"after a {settings['decode_prompt_tokens']}-token prompt{kind}; b = batch size")


def speed_rows(speed: dict, settings: dict) -> tuple[list[str], list[list[str]]]:
    """One row per configuration and measure: time, throughput, measured and ideal speedup."""
    headers = ["config", "measure", "median", "tokens/s", "speedup vs full (paired)", "95% CI", "ideal speedup"]
    rows = []
    for name, measures in speed.items():
        for measure, r in measures.items():
            rows.append([
                name,
                measure_label(measure, settings),
                f"{r['median_s'] * 1000:.1f} ms",
                f"{r['tokens_per_s']:.1f}",
                f"{r['speedup']:.3f}x",
                "{:.2f}-{:.2f}".format(*r["speedup_ci95"]),
                f"{r['ideal_speedup']:.3f}x",
            ])
    return headers, rows


def policy_rows(speed: dict, settings: dict) -> tuple[list[str], list[list[str]]]:
    """Per input-adaptive policy and measure: what it skipped, what that saved, what deciding cost."""
    headers = ["policy", "measure", "MLPs skipped / token", "MLP time (probe)", "saved / token",
               "saved / skipped MLP time", "decision overhead / token"]
    rows = []
    for name, measures in speed.items():
        for measure, r in measures.items():
            policy = r.get("policy")
            if policy is None or name.endswith("(decisions only)"):
                continue
            share = policy.get("saved_share_of_skipped")
            rows.append([
                name, measure_label(measure, settings), f"{policy['skipped_mlps_per_token']:.2f}",
                _us(policy.get("mlp_s")), _us(policy.get("saved_s_per_token")),
                "-" if share is None else f"{share:.2f}", _us(policy.get("decision_overhead_s_per_token")),
            ])
    return headers, rows


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.0f} us"


def plot_speedups(speed: dict, settings: dict, path: Path, title: str) -> Path:
    """Grouped bars: measured speedup of every non-full configuration per measure, ideal speedup as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [name for name in speed if name != "full"]
    measures = list(next(iter(speed.values())))
    width = 0.8 / max(len(configs), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(measures)), 4))
    for i, name in enumerate(configs):
        xs = [m + (i - (len(configs) - 1) / 2) * width for m in range(len(measures))]
        ax.bar(xs, [speed[name][m]["speedup"] for m in measures], width, label=f"{name} (measured)")
        ax.scatter(xs, [speed[name][m]["ideal_speedup"] for m in measures], marker="_", s=400, color="black",
                   label="ideal (cost model)" if i == 0 else None, zorder=3)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(measures)), [measure_label(m, settings) for m in measures], fontsize=8)
    ax.set_ylabel("speedup vs full model (x)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
