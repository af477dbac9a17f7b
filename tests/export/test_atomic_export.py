"""An export appears whole or not at all: interrupted or failed part-way it leaves nothing that looks like a
checkpoint, an earlier export at the target stays intact until the new one is complete, and a target that cannot be
written is refused before any work. The writers every result goes through are whole-or-nothing too."""

import json
import os

import pytest

import skiplm
from skiplm.export.pruned import PLAN_FILENAME, export_pruned
from skiplm.files import OutputError, atomic_folder, write_text_atomic
from skiplm.report.files import write_json

from conftest import NUM_LAYERS, tiny_model


class FailingTokenizer:
    """Saves one file of a tokenizer, then fails as an interrupted or broken save would."""

    def __init__(self, error: BaseException):
        self.error = error

    def save_pretrained(self, folder):
        (folder / "tokenizer_config.json").write_text("{}")
        raise self.error


class Tokenizer:
    def save_pretrained(self, folder):
        (folder / "tokenizer_config.json").write_text('{"ok": true}')


@pytest.fixture(scope="module")
def model_and_plan():
    model = tiny_model("llama")
    return model, skiplm.SkipPlan.from_layers(NUM_LAYERS, blocks=[1]).for_model(model)


def _snapshot(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("disk full")])
def test_an_interrupted_export_leaves_no_checkpoint(model_and_plan, tmp_path, error):
    model, plan = model_and_plan
    out = tmp_path / "pruned"
    with pytest.raises(type(error)):
        export_pruned(model, plan, out, tokenizer=FailingTokenizer(error))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left beside it either


def test_an_earlier_export_stays_intact_when_a_new_one_fails(model_and_plan, tmp_path):
    model, plan = model_and_plan
    out = tmp_path / "pruned"
    export_pruned(model, plan, out, tokenizer=Tokenizer())
    before = _snapshot(out)
    assert {"config.json", PLAN_FILENAME, "tokenizer_config.json"} <= {str(p) for p in before}
    other = skiplm.SkipPlan.from_layers(NUM_LAYERS, blocks=[2, 3]).for_model(model)
    with pytest.raises(KeyboardInterrupt):
        export_pruned(model, other, out, tokenizer=FailingTokenizer(KeyboardInterrupt()))
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]

    export_pruned(model, other, out, tokenizer=Tokenizer())  # an earlier export is replaced as a whole
    assert json.loads((out / PLAN_FILENAME).read_text())["export"]["deleted_blocks"] == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_export_refuses_an_unwritable_or_foreign_target_before_any_work(model_and_plan, tmp_path, monkeypatch):
    model, plan = model_and_plan
    monkeypatch.setattr("skiplm.export.pruned.prune_blocks", lambda *a, **k: pytest.fail("work started"))
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(OutputError, match="existing file"):
        export_pruned(model, plan, afile)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not an earlier skiplm export"):
        export_pruned(model, plan, busy)
    assert afile.read_text() == (busy / "notes.txt").read_text() == "keep me"
    if os.path.isdir("/proc/self"):
        with pytest.raises(OutputError, match="cannot be written"):
            export_pruned(model, plan, "/proc/skiplm-export")


def test_an_exported_folder_loads_and_is_readable_by_others(model_and_plan, tmp_path):
    from transformers import AutoModelForCausalLM

    model, plan = model_and_plan
    out = export_pruned(model, plan, tmp_path / "pruned")
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == NUM_LAYERS - 1
    assert out.stat().st_mode & 0o055 == 0o777 & ~_umask() & 0o055  # not left 0700 by the temporary folder


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_folder_replaces_only_when_asked(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(OutputError, match="not empty"):
        with atomic_folder(target):
            pass
    with atomic_folder(target, replace=True) as building:
        (building / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_result_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = write_json(tmp_path / "r" / "eval.json", {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, '{"a": 2, "cut')
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]
