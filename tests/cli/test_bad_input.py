"""Every bad input a clear error: one row per bad input, run through the real entry point (`skiplm.cli.main`, what the
`skiplm` script calls) on a tiny model. Each row states the command's arguments, the exit code and a phrase the
message must contain; no row may print a traceback.

Adding a row: append ``Row(args, code, phrase)`` to :data:`ROWS` (or a list of your own, added to it). In ``args``:

- ``{model}`` is the tiny model folder (a Llama with the default model's tokenizer), ``{tmp}`` a fresh folder for
  this row, ``{files}`` the folder of prepared inputs: every name in :data:`FILES` (bad plan files, a valid
  ``plan.json`` for the tiny model, ``afile`` — an existing file —, ``policy.json``, ...). Add a file there as
  ``name: text | bytes | callable(model) -> text | bytes`` (``model`` is the tiny model, loaded once).
- ``early=True``: the value must be refused before any model loads (the row fails if one does).
- ``needs_no_gpu=True``: the row is about a device this machine lacks (skipped where a CUDA GPU is present).
- ``id``: the test id (default: the arguments).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch

EXIT_USAGE = 2  # a usage error or a SkipLMError: one message
EXIT_BUG = 1  # an unexpected error: one line saying it is a bug


@dataclasses.dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_main(*args, env: dict[str, str] | None = None) -> Outcome:
    """Run ``skiplm ARGS`` through :func:`skiplm.cli.main` in this process: its exit code and what it printed."""
    from skiplm.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", ["skiplm", *map(str, args)]), mock.patch.dict("os.environ", env or {}), \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return Outcome(code, stdout.getvalue(), stderr.getvalue())


@dataclasses.dataclass(frozen=True)
class Row:
    args: tuple
    code: int
    phrase: str
    id: str | None = None
    early: bool = False
    needs_no_gpu: bool = False

    def param(self):
        gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
        marks = [gpu] if self.needs_no_gpu else []
        return pytest.param(self, id=self.id or " ".join(map(str, self.args)).replace("{model} ", ""), marks=marks)


def usage(*args, phrase: str, **kwargs) -> Row:
    """A bad option value: a usage error (exit 2) before any model loads."""
    return Row(args, EXIT_USAGE, phrase, early=True, **kwargs)


# -- the prepared inputs -------------------------------------------------------------------------------------------
def _plan_json(model) -> dict:
    from skiplm import SkipPlan

    return SkipPlan.from_layers(4, blocks=[1]).for_model(model).to_json()


def _edited(edit: Callable[[dict], None]) -> Callable:
    def make(model):
        data = _plan_json(model)
        edit(data)
        return json.dumps(data)

    return make


def _set(path: str, value) -> Callable[[dict], None]:
    def edit(data):
        *parents, key = path.split(".")
        for parent in parents:
            data = data[parent]
        data[key] = value

    return edit


def _other_weights(model):
    from skiplm import SkipPlan

    with torch.no_grad():  # (the identity samples the embeddings' weights)
        weight = model.get_input_embeddings().weight
        weight.add_(1.0)
        try:
            return json.dumps(SkipPlan.from_layers(4, blocks=[1]).for_model(model, name="other-weights").to_json())
        finally:
            weight.sub_(1.0)


FILES: dict[str, str | bytes | Callable] = {
    "afile": "an existing file, where a folder is expected",
    "plan.json": lambda model: json.dumps(_plan_json(model)),
    "full.json": lambda model: json.dumps(_plan_json(model)),
    "empty.json": "",
    "whitespace.json": "  \n\t\n",
    "truncated.json": lambda model: json.dumps(_plan_json(model), indent=2)[:120],
    "binary.json": bytes(range(256)),
    "object.json": json.dumps({"hello": 1}),
    "list.json": json.dumps([1, 2, 3]),
    "string.json": json.dumps("a string"),
    "number.json": json.dumps(42),
    "null.json": json.dumps(None),
    "other-format.json": json.dumps({"format": "other", "schema_version": 1}),
    "newer.json": _edited(_set("schema_version", 2)),
    "schema-string.json": _edited(_set("schema_version", "1")),
    "out-of-range.json": _edited(_set("decode.blocks", [1, 7])),
    "negative.json": _edited(_set("decode.blocks", [-1])),
    "float-index.json": _edited(_set("decode.blocks", [1.5])),
    "bool-index.json": _edited(_set("decode.attention", [True])),
    "string-index.json": _edited(_set("decode.blocks", ["1"])),
    "comma-string.json": _edited(_set("decode.mlp", "0,2")),
    "nested-index.json": _edited(_set("prefill.attention", [[3]])),
    "num-layers-string.json": _edited(_set("num_layers", "4")),
    "decode-list.json": _edited(_set("decode", [1, 2])),
    "unknown-keys.json": _edited(_set("prefill", {"blocks": [], "layers": [1]})),
    "bad-model.json": _edited(_set("model", "llama")),
    "bad-provenance.json": _edited(_set("provenance", "yesterday")),
    "no-decode.json": _edited(lambda data: data.pop("decode")),
    "inconsistent.json": _edited(_set("model.num_layers", 5)),
    "every-layer.json": _edited(_set("decode.blocks", [0, 1, 2, 3])),
    "seven-layers.json": lambda model: json.dumps(__import__("skiplm").SkipPlan.from_layers(7, blocks=[3]).to_json()),
    "other-weights.json": _other_weights,
}


@pytest.fixture(scope="module")
def files(tiny_folder, tmp_path_factory):
    from skiplm.models.loading import load_model

    model, _ = load_model(str(tiny_folder))
    folder = tmp_path_factory.mktemp("inputs")
    for name, content in FILES.items():
        content = content(model) if callable(content) else content
        path = folder / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    (folder / "a-folder.json").mkdir()
    _model_folders(tiny_folder, folder)
    _result_files(folder)
    _heal_folders(model, folder)
    policy = run_main("policy", tiny_folder, "--method", "lac", "--skip-ratio", "0.2", "--protect-first", 1,
                      "--protect-last", 0, "--sequences", 1, "--length", 16, "-o", folder / "policy.json")
    assert policy.code == 0, policy.output
    return folder


def _model_folders(tiny_folder: Path, folder: Path) -> None:
    """Copies of the tiny model, each damaged one way; and a file that is not a GGUF."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_folder, folder / name))

    config_only = folder / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_folder / "config.json", config_only)
    weights = copy("truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    no_tokenizer = folder / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_folder / name, no_tokenizer)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(folder / "gpt2")
    (folder / "not-a-model.gguf").write_text("nope")


def _heal_folders(model, folder: Path) -> None:
    """``heal``: a heal folder for the tiny model; ``other-heal``: one for other weights of the same shapes."""
    from conftest import heal_folder

    heal_folder(model, folder / "heal")
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight.add_(1.0)
        try:
            heal_folder(model, folder / "other-heal", name="other-weights")
        finally:
            weight.sub_(1.0)


def _result_files(folder: Path) -> None:
    """Result files of the wrong shape, as `skiplm report` and a resumed sweep meet them."""
    (folder / "bad-sweep").mkdir()
    (folder / "bad-sweep" / "sweep.json").write_text(json.dumps({"kind": "sweep", "points": []}))
    (folder / "bad-bench").mkdir()
    (folder / "bad-bench" / "bench.json").write_text(json.dumps({"kind": "speed", "settings": {}}))
    (folder / "bad-points").mkdir()
    (folder / "bad-points" / "points.jsonl").write_text(json.dumps({"method": "full", "target": 1.0}) + "\n")
    (folder / "not-an-export").mkdir()
    (folder / "not-an-export" / "notes.txt").write_text("someone's files")


# -- the rows ------------------------------------------------------------------------------------------------------
GEN = ("generate", "{model}", "--prompt", "Hi")
SPEC = (*GEN, "--speculative", "--plan", "{files}/plan.json")
EVAL = ("eval", "{model}", "--tokens", 16, "--context", 8, "--stride", 4, "-o", "{tmp}/eval")
BENCH = ("bench", "{model}", "-o", "{tmp}/bench")
PLAN = ("plan", "{model}", "--skip", 1)

OPTION_ROWS = [
    # token counts, sampling settings: the plain and the speculative path alike
    usage(*GEN, "--max-new-tokens", 0, phrase="'--max-new-tokens': 0 is not in the range x>=1"),
    usage(*GEN, "--max-new-tokens", -5, phrase="'--max-new-tokens': -5 is not in the range x>=1"),
    usage(*SPEC, "--max-new-tokens", 0, phrase="'--max-new-tokens': 0 is not in the range x>=1"),
    usage(*GEN, "--temperature", -1, phrase="'--temperature': -1.0 is not in the range x>=0"),
    usage(*SPEC, "--temperature", -1, phrase="'--temperature': -1.0 is not in the range x>=0"),
    usage(*GEN, "--top-p", 2, phrase="'--top-p': 2.0 is not in the range 0.0<x<=1.0"),
    usage(*SPEC, "--top-p", 2, phrase="'--top-p': 2.0 is not in the range 0.0<x<=1.0"),
    usage(*GEN, "--top-p", 0, phrase="'--top-p': 0.0 is not in the range 0.0<x<=1.0"),
    usage(*GEN, "--top-k", -1, phrase="'--top-k': -1 is not in the range x>=0"),
    usage(*GEN, "--seed", -1, phrase="'--seed': -1 is not in the range x>=0"),
    usage(*SPEC, "--max-draft", 0, phrase="'--max-draft': 0 is not in the range x>=1"),
    usage(*SPEC, "--prompt-lookup", -1, phrase="'--prompt-lookup': -1 is not in the range x>=0"),
    usage(*GEN, "--max-new-tokens", "many", phrase="'--max-new-tokens': 'many' is not a valid integer"),
    usage("generate", "{model}", phrase="Missing option '--prompt'"),
    usage(*GEN, "--nope", phrase="No such option '--nope'"),
    # bench: lists, counts
    usage(*BENCH, "--batch-sizes", "0,abc", phrase="'--batch-sizes': '0,abc': every value must be at least 1, got 0"),
    usage(*BENCH, "--batch-sizes", "1,abc",
          phrase="'1,abc' is not a comma-separated list of integers ('abc' is not one)"),
    usage(*BENCH, "--batch-sizes", 0, phrase="every value must be at least 1, got 0"),
    usage(*BENCH, "--batch-sizes", "1,-2", phrase="every value must be at least 1, got -2"),
    usage(*BENCH, "--repeats", 0, phrase="'--repeats': 0 is not in the range x>=1"),
    usage(*BENCH, "--prompt-tokens", 0, phrase="'--prompt-tokens': 0 is not in the range x>=1"),
    usage(*BENCH, "--decode-prompt-tokens", 0, phrase="'--decode-prompt-tokens': 0 is not in the range x>=1"),
    usage(*BENCH, "--new-tokens", 0, phrase="'--new-tokens': 0 is not in the range x>=1"),
    usage(*BENCH, "--warmup", -1, phrase="'--warmup': -1 is not in the range x>=0"),
    usage(*BENCH, "--sweep", "--batch-sizes", 0, phrase="every value must be at least 1, got 0"),
    usage(*BENCH, "--sweep", "--repeats", 0, phrase="'--repeats': 0 is not in the range x>=1"),
    usage(*BENCH, "--sweep", "--targets", "1.1,x", phrase="'x' is not one"),
    usage(*BENCH, "--sweep", "--targets", "1.1,0.9", phrase="greater than 1"),
    usage(*BENCH, "--sweep", "--seed", -1, phrase="'--seed': -1 is not in the range x>=0"),
    usage(*BENCH, "--tokens", 64, phrase="--tokens only applies with --sweep"),
    # eval, agree, compare, analyze, cola, demo, plan, policy
    usage(*EVAL, "--tokens", 0, phrase="'--tokens': 0 is not in the range x>=1"),
    usage(*EVAL, "--context", 1, phrase="'--context': 1 is not in the range x>=2"),
    usage(*EVAL, "--stride", 8, phrase="8 is not less than --context 8"),
    usage("agree", "{model}", "--limit", 0, phrase="'--limit': 0 is not in the range x>=1"),
    usage("compare", "{model}", "--targets", "1.2,0.9", phrase="every value must be greater than 1, got 0.9"),
    usage("compare", "{model}", "--tokens", 0, phrase="'--tokens': 0 is not in the range x>=1"),
    usage("compare", "{model}", "--stride", 1024, phrase="1024 is not less than --context 1024"),
    usage("analyze", "{model}", "--sequences", 0, phrase="'--sequences': 0 is not in the range x>=1"),
    usage("cola", "{model}", "--seed", -2, phrase="'--seed': -2 is not in the range x>=0"),
    usage("demo", "--tokens", 0, phrase="'--tokens': 0 is not in the range x>=1"),
    usage("demo", "--speedup", 0.5, phrase="'--speedup': 0.5 is not in the range x>1"),
    usage(*PLAN, "--sequences", 0, "-o", "{tmp}/p.json", phrase="'--sequences': 0 is not in the range x>=1"),
    usage("plan", "{model}", "--method", "search", "--latency-ms", 0, "-o", "{tmp}/p.json",
          phrase="'--latency-ms': 0.0 is not in the range x>0"),
    usage("policy", "{model}", "--method", "lac", "--skip-ratio", 1.5, "-o", "{tmp}/p.json",
          phrase="'--skip-ratio': 1.5 is not in the range 0<x<1"),
    usage("policy", "{model}", "--method", "lac", "--speedup", 0.9, "-o", "{tmp}/p.json",
          phrase="'--speedup': 0.9 is not in the range x>1"),
    usage("policy", "{model}", "--method", "nope", "--skip-ratio", 0.2, "-o", "{tmp}/p.json",
          phrase="'nope' is not one of"),
    # threads, dtype, device
    usage(*GEN, "--threads", 0, phrase="'--threads': 0 is not in the range x>=1"),
    usage(*EVAL, "--threads", -1, phrase="'--threads': -1 is not in the range x>=1"),
    usage("info", "{model}", "--threads", 0, phrase="'--threads': 0 is not in the range x>=1"),
    usage(*GEN, "--dtype", "int4", phrase="'int4' is not one of 'float32', 'bfloat16', 'float16'"),
    usage(*GEN, "--device", "cuda", phrase="pass --device cpu", needs_no_gpu=True),
    usage(*BENCH, "--device", "cuda", phrase="pass --device cpu", needs_no_gpu=True),
    usage(*EVAL, "--device", "cuda:0", phrase="pass --device cpu", needs_no_gpu=True),
    usage("info", "{model}", "--device", "foo", phrase="'foo' is not a device: use cpu, cuda"),
    usage("info", "{model}", "--device", "meta", phrase="skiplm does not run models on 'meta' devices"),
    # output paths: checked before the work, the right kind
    usage(*EVAL[:-1], "{files}/afile", phrase="is an existing file, but a folder is written there"),
    usage(*BENCH[:-1], "{files}/afile", phrase="is an existing file, but a folder is written there"),
    usage(*BENCH[:-1], "{files}/afile", "--sweep", phrase="is an existing file, but a folder is written there"),
    usage("analyze", "{model}", "-o", "{files}/afile", phrase="is an existing file, but a folder is written there"),
    usage("cola", "{model}", "-o", "{files}/afile", phrase="is an existing file, but a folder is written there"),
    usage("agree", "{model}", "-o", "{files}/afile", phrase="is an existing file, but a folder is written there"),
    usage("compare", "{model}", "-o", "{files}/afile", phrase="is an existing file, but a folder is written there"),
    usage("demo", "-o", "{files}/afile", phrase="is an existing file, but a folder is written there"),
    usage("export", "{model}", "--plan", "{files}/plan.json", "-o", "{files}/afile",
          phrase="is an existing file, but a folder is written there"),
    usage("export", "{model}", "--plan", "{files}/plan.json", "-o", "{files}/afile/sub",
          phrase="is a file, not a folder"),
    usage(*PLAN, "-o", "/proc/skiplm-plan.json", phrase="cannot be written: /proc does not take new files"),
    usage(*PLAN, "-o", "{tmp}", phrase="is an existing folder, but a file is written there"),
    usage(*EVAL[:-1], "/proc/skiplm-eval", phrase="cannot be written: /proc does not take new files"),
    usage(*GEN, "--policy", "{files}/policy.json", "--activation-map", "/proc/map.png",
          phrase="cannot be written: /proc does not take new files"),
    usage("report", "{tmp}", "-o", "/proc/report.html", phrase="cannot be written: /proc does not take new files"),
    usage("policy", "{model}", "--method", "lac", "--skip-ratio", 0.2, "-o", "{tmp}",
          phrase="is an existing folder, but a file is written there"),
]

PLAN_FILE_ROWS = [
    Row((*EVAL, "--plan", f"{{files}}/{name}"), EXIT_USAGE, phrase, id=f"plan file: {name}")
    for name, phrase in [
        ("empty.json", "is empty"),
        ("whitespace.json", "is empty"),
        ("truncated.json", "not valid JSON"),
        ("binary.json", "plan file"),
        ("object.json", "not a skiplm plan"),
        ("list.json", "not a skiplm plan"),
        ("string.json", "not a skiplm plan"),
        ("number.json", "not a skiplm plan"),
        ("null.json", "not a skiplm plan"),
        ("other-format.json", "not a skiplm plan"),
        ("newer.json", "schema version 2 is newer"),
        ("schema-string.json", "schema_version"),
        ("out-of-range.json", "out of range"),
        ("negative.json", "out of range"),
        ("float-index.json", "decode.blocks must be a list of layer indices"),
        ("bool-index.json", "decode.attention must be a list of layer indices"),
        ("string-index.json", "decode.blocks must be a list of layer indices"),
        ("comma-string.json", "decode.mlp must be a list of layer indices"),
        ("nested-index.json", "prefill.attention must be a list of layer indices"),
        ("num-layers-string.json", "'num_layers' must be an integer"),
        ("decode-list.json", "decode must be an object"),
        ("unknown-keys.json", "unknown keys ['layers']"),
        ("bad-model.json", "'model' is malformed"),
        ("bad-provenance.json", "'provenance' must be an object"),
        ("no-decode.json", "no 'decode' section"),
        ("inconsistent.json", "inconsistent"),
        ("every-layer.json", "skips every one of the 4 layers"),
        ("seven-layers.json", "7 layers"),
        ("other-weights.json", "same shapes but different weights"),
        ("missing.json", "does not exist"),
        ("a-folder.json", "is a directory"),
    ]
] + [
    Row(("export", "{model}", "--plan", "{files}/policy.json", "-o", "{tmp}/out"), EXIT_USAGE,
        "no fixed set of layers", id="a policy given as a plan to export"),
    Row((*GEN, "--speculative", "--plan", "{files}/policy.json"), EXIT_USAGE, "an input-adaptive policy cannot draft",
        id="a policy given as a draft"),
    Row((*GEN, "--policy", "{files}/plan.json"), EXIT_USAGE, "is a skip plan, not a policy",
        id="a plan given as a policy"),
    Row((*GEN, "--policy", "lac"), EXIT_USAGE, "calibrate one", id="a policy method given as a policy file"),
    Row((*GEN, "--policy", "{files}/policy.json", "--plan", "{files}/plan.json"), EXIT_USAGE, "does not combine"),
    Row((*GEN, "--activation-map", "{tmp}/map.png"), EXIT_USAGE, "--activation-map records what a --policy decided"),
    Row((*GEN, "--speculative"), EXIT_USAGE, "--speculative needs a draft"),
    Row((*SPEC, "--adapt"), EXIT_USAGE, "--adapt needs a --plan made by `skiplm draft-search"),
    Row(("generate", "{model}", "--prompt", "   "), EXIT_USAGE, "prompt is empty"),
    Row(("agree", "{model}", "--plan", "{files}/full.json", "-o", "{tmp}/agree"), EXIT_USAGE,
        "may not be named full.json"),
    Row(("report", "{tmp}", "-o", "{tmp}/r.html"), EXIT_USAGE, "holds no skiplm results",
        id="report on an empty folder"),
]

LONG_PROMPT = ("generate", "{model}", "--raw", "--prompt", "word " * 600, "--max-new-tokens", 8)
MODEL_AND_RESULT_ROWS = [
    Row(("info", "{files}/config-only"), EXIT_USAGE, "has a config.json but no weights"),
    Row(("info", "{files}/truncated"), EXIT_USAGE, "is truncated or corrupt", id="a truncated safetensors file"),
    Row(("info", "{files}/gpt2"), EXIT_USAGE, "a family skiplm has no adapter for"),
    Row(("info", "{files}/no-tokenizer"), EXIT_USAGE, "has no tokenizer"),
    Row(("info", "{files}/not-a-model.gguf"), EXIT_USAGE, "is not a GGUF file"),
    usage("info", "{model}", "--device", "meta", phrase="does not run models on 'meta'"),
    Row(LONG_PROMPT, EXIT_USAGE, "context is 512 tokens", id="a prompt longer than the context"),
    Row((*LONG_PROMPT, "--speculative", "--plan", "{files}/plan.json"), EXIT_USAGE, "context is 512 tokens",
        id="a prompt longer than the context, speculative"),
    Row(("generate", "{model}", "--prompt", "Hi", "--max-new-tokens", 600), EXIT_USAGE,
        "ask for at most 511 new tokens"),
    Row(("report", "{files}/bad-sweep", "-o", "{tmp}/r.html"), EXIT_USAGE, "settings is missing",
        id="report on a sweep.json of the wrong shape"),
    Row(("report", "{files}/bad-bench", "-o", "{tmp}/r.html"), EXIT_USAGE, "settings.prompt_tokens is missing",
        id="report on a bench.json of the wrong shape"),
    Row(("eval", "{model}", "--plan", "{files}/plan.json", "--plan", "{files}/./plan.json", "--tokens", 16,
         "--context", 8, "--stride", 4, "-o", "{tmp}/eval"), EXIT_USAGE, "given twice"),
    Row(("export", "{model}", "--plan", "{files}/plan.json", "-o", "{files}/not-an-export"), EXIT_USAGE,
        "not an earlier skiplm export"),
    usage("bench-speculative", "{model}", "--draft-dtype", "int8", "--batch-sizes", "0",
          phrase="every value must be at least 1, got 0"),
    usage("bench-speculative", "{model}", "--draft-dtype", "int8", "-o", "{files}/afile", phrase="is an existing file"),
    usage("draft-search", "{model}", "-o", "{tmp}", phrase="is an existing folder"),
    Row(("bench", "{model}", "--sweep", "--methods", "uniform", "--targets", "1.5", "-o", "{files}/bad-points"),
        EXIT_USAGE, "settings_hash is missing", id="a resumed sweep whose points file has the wrong shape"),
]

SELF = ("self-generate", "{model}", "--sequences", 2, "--length", 16, "--cache-dir", "{tmp}/cache")
SELF_GENERATE_ROWS = [
    usage(*SELF, "--length", 4, phrase="'--length': 4 is not in the range x>=8"),
    usage(*SELF, "--batch-size", 0, phrase="'--batch-size': 0 is not in the range x>=1"),
    usage(*SELF, "--sequences", 0, phrase="'--sequences': 0 is not in the range x>=1"),
    usage(*SELF, "--temperature", -0.5, phrase="'--temperature': -0.5 is not in the range x>=0"),
    usage(*SELF, "--top-p", 0, phrase="'--top-p': 0.0 is not in the range 0.0<x<=1.0"),
    usage(*SELF, "--top-p", 1.5, phrase="'--top-p': 1.5 is not in the range 0.0<x<=1.0"),
    usage(*SELF, "--chat-fraction", 2, phrase="'--chat-fraction': 2.0 is not in the range 0.0<=x<=1.0"),
    usage(*SELF, "--seed", -1, phrase="'--seed': -1 is not in the range x>=0"),
    usage(*SELF, "--cache-dir", "{files}/afile", phrase="is an existing file, but a folder is written there"),
    usage(*SELF, "--out", "{tmp}", phrase="is an existing folder, but a file is written there"),
    Row((*SELF, "--length", 600), EXIT_USAGE, "--length: 600 is more than the model's context of 512 tokens",
        id="self-generate: a length beyond the context"),
    Row((*SELF, "--length", 8, "--chat-fraction", 1), EXIT_USAGE, "longer than half of the length",
        id="self-generate: chat prompts longer than the rows"),
]

HEAL = ("--heal", "{files}/heal")
EXPORT = ("export", "{model}", "-o", "{tmp}/out")
HEAL_ROWS = [
    usage(*GEN, "--plan", "{files}/plan.json", *HEAL, phrase="--heal and --plan do not combine"),
    usage(*EXPORT, "--plan", "{files}/plan.json", *HEAL, phrase="--heal and --plan do not combine"),
    usage(*EXPORT, phrase="give --plan PLAN or --heal DIR"),
    usage(*EXPORT, *HEAL, "--zero-sublayers", phrase="--zero-sublayers does not apply with --heal"),
    usage(*GEN, "--speculative", *HEAL, phrase="--speculative does not take a heal folder as the draft yet"),
    usage(*GEN, "--merge", phrase="--merge bakes a heal folder into the weights: give --heal DIR"),
    usage(*BENCH, "--sweep", *HEAL, "--force", phrase="--force does not apply with --sweep"),
    Row((*GEN, "--policy", "{files}/policy.json", *HEAL), EXIT_USAGE, "does not combine with --plan, --heal"),
    Row((*GEN, "--heal", "{files}/other-heal"), EXIT_USAGE, "heal folder was made for a model with the same shapes "
        "but different weights", id="a heal folder for other weights"),
    Row((*EVAL, "--heal", "{files}/other-heal"), EXIT_USAGE, "same shapes but different weights",
        id="eval: a heal folder for other weights"),
    Row((*EVAL, "--heal", "{files}/plan.json"), EXIT_USAGE, "is not a heal folder", id="a plan file given as --heal"),
    Row((*EVAL, "--heal", "{files}/a-folder.json"), EXIT_USAGE, "is not a heal folder",
        id="a folder without heal.json given as --heal"),
    Row(("compare", "{model}", "--heal", "{files}/other-heal", "-o", "{tmp}/compare"), EXIT_USAGE,
        "same shapes but different weights", id="compare: a heal folder for other weights"),
    Row((*EXPORT, "--heal", "{files}/other-heal"), EXIT_USAGE, "same shapes but different weights",
        id="export: a heal folder for other weights"),
]

HEALING = ("heal", "{model}", "--plan", "{files}/plan.json", "-o", "{tmp}/healed")
HEALING_ROWS = [
    usage(*HEALING, "--method", "lora+bridge", phrase="at most one trained method, last"),
    usage(*HEALING, "--method", "lora+lora", phrase="runs each method once"),
    usage(*HEALING, "--method", "retrain", phrase="unknown healing method 'retrain'"),
    usage(*HEALING, "--minutes", 5, phrase="--minutes bounds a training method's time"),
    usage(*HEALING, "--resume", phrase="--resume continues a training run; the bridge has none"),
    usage(*HEALING, "--method", "lora", "--option", "steps=0", phrase="steps must be a whole number >= 1"),
    usage(*HEALING, "--method", "lora", "--option", "held_out=0", phrase="held_out must be a whole number >= 1"),
    usage(*HEALING, "--method", "lora", "--option", "rank=0", phrase="rank must be a whole number >= 1"),
    usage(*HEALING, "--method", "lora", "--option", "modules=embeddings", phrase="must be one of all, attention, mlp"),
    usage(*HEALING, "--method", "lora", "--option", "ridge=1", phrase="has no option 'ridge'"),
    usage(*HEALING, "--method", "lora", "--option", "learning_rate=-1", phrase="learning_rate must be > 0"),
]

ROWS = OPTION_ROWS + PLAN_FILE_ROWS + MODEL_AND_RESULT_ROWS + HEAL_ROWS + SELF_GENERATE_ROWS + HEALING_ROWS


def _expand(arg, model: Path, files: Path, tmp: Path) -> str:
    return str(arg).replace("{model}", str(model)).replace("{files}", str(files)).replace("{tmp}", str(tmp))


@pytest.mark.parametrize("row", [row.param() for row in ROWS])
def test_bad_input_is_a_clear_error(row, tiny_folder, files, tmp_path, monkeypatch):
    if row.early:
        def no_loading(*args, **kwargs):
            raise AssertionError("a model was loaded before the bad option was refused")

        monkeypatch.setattr("skiplm.models.loading.load_model", no_loading)
    outcome = run_main(*(_expand(arg, tiny_folder, files, tmp_path) for arg in row.args))
    assert "Traceback" not in outcome.output, outcome.output
    assert outcome.code == row.code, outcome.output
    assert row.phrase in " ".join(outcome.output.split()), outcome.output
    assert "bug in skiplm" not in outcome.output, outcome.output


# -- main(): what a user sees of an error ------------------------------------------------------------------------
def _broken_load(*args, **kwargs):
    raise RuntimeError("something inside broke")


def test_an_unexpected_error_is_one_line_that_says_it_is_a_bug(tiny_folder, monkeypatch):
    monkeypatch.setattr("skiplm.models.loading.load_model", _broken_load)
    outcome = run_main("info", tiny_folder, env={"SKIPLM_TRACEBACK": ""})
    assert outcome.code == EXIT_BUG
    assert "Traceback" not in outcome.output
    text = " ".join(outcome.stderr.split())
    assert "bug in skiplm: RuntimeError: something inside broke" in text and "--traceback" in text
    assert "SKIPLM_TRACEBACK=1" in text


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_the_traceback_of_an_unexpected_error_on_request(tiny_folder, monkeypatch, how):
    monkeypatch.setattr("skiplm.models.loading.load_model", _broken_load)
    args = ("--traceback", "info", tiny_folder) if how == "flag" else ("info", tiny_folder)
    outcome = run_main(*args, env={"SKIPLM_TRACEBACK": "1" if how == "environment" else ""})
    assert outcome.code == EXIT_BUG
    assert "Traceback (most recent call last)" in outcome.stderr and "something inside broke" in outcome.stderr
    # and the next run, without the request, is one line again (nothing is left switched on)
    outcome = run_main("info", tiny_folder, env={"SKIPLM_TRACEBACK": ""})
    assert outcome.code == EXIT_BUG and "Traceback" not in outcome.output


def test_a_skiplm_error_never_shows_its_traceback_even_on_request(tiny_folder):
    outcome = run_main("--traceback", "generate", tiny_folder, "--prompt", " ")
    assert outcome.code == EXIT_USAGE and "Traceback" not in outcome.output and "prompt is empty" in outcome.stderr


def test_a_message_with_brackets_is_printed_as_is(tiny_folder, files, tmp_path):
    args = [_expand(arg, tiny_folder, files, tmp_path) for arg in EVAL]
    outcome = run_main(*args, "--plan", files / "unknown-keys.json")
    assert "unknown keys ['layers']" in outcome.stderr  # (not eaten as console markup)


def test_info_writes_its_result_to_stdout(tiny_folder):
    outcome = run_main("info", tiny_folder)
    assert outcome.code == 0, outcome.output
    assert "decoder layers" in outcome.stdout and "per layer: attention" in outcome.stdout
    assert "decoder layers" not in outcome.stderr


@pytest.mark.parametrize("command", ["generate", "eval", "bench", "agree", "analyze", "cola", "plan", "policy",
                                     "export", "info", "compare", "demo", "bench-speculative", "draft-search",
                                     "self-generate"])
def test_every_model_command_takes_threads(command):
    outcome = run_main(command, "--help")
    assert outcome.code == 0 and "--threads" in outcome.stdout, outcome.output


def test_threads_are_set_before_the_model_runs(tiny_folder):
    try:
        outcome = run_main("generate", tiny_folder, "--prompt", "Hi", "--max-new-tokens", 2, "--threads", 2)
        assert outcome.code == 0, outcome.output
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)  # (the tests' setting, see conftest.py)


def test_a_search_plan_says_which_phase_it_is_in(tiny_folder, tmp_path):
    outcome = run_main("plan", tiny_folder, "--method", "search", "--skip", 1, "--sequences", 1, "--length", 16,
                       "--option", "refine_budget=2", "-o", tmp_path / "plan.json")
    assert outcome.code == 0, outcome.output
    for phase in ("measuring the latency model", "the full model's reference logits", "search path", "refining"):
        assert f"planning (search): {phase}" in outcome.stderr, outcome.stderr
