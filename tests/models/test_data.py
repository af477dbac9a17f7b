"""The shipped text: corpora and prompt sets, registered by name; text files wherever a name is taken."""

import ast
from pathlib import Path

import pytest

import skiplm
from skiplm.errors import DataError
from skiplm.models.data import Prompt, corpus_label, gsm8k_questions, load_corpus, load_prompts
from skiplm.registry import CORPORA, PROMPT_SETS


def test_corpora_ship_with_packages(tmp_path):
    assert len(gsm8k_questions()) == 1319
    assert "Question:" in load_corpus("gsm8k")[:100]
    assert len(load_corpus("pydoc")) > 100_000
    text_file = tmp_path / "notes.txt"
    text_file.write_text("some words to score")
    assert load_corpus(str(text_file)) == "some words to score"
    with pytest.raises(DataError, match="neither a shipped corpus"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(tmp_path / "empty.txt"))


def test_corpora_and_prompt_sets_are_registered_with_a_loader_each():
    assert {"gsm8k", "pydoc"} <= set(CORPORA.names())
    assert "gsm8k" in PROMPT_SETS
    for spec in CORPORA:
        assert spec.summary and load_corpus(spec.name) == spec.target()
    assert PROMPT_SETS.get("gsm8k").target(2) == load_prompts("gsm8k", 2)
    assert corpus_label("pydoc") == "pydoc" and corpus_label("/some/where/notes.txt") == "notes.txt"


def test_a_registered_corpus_or_prompt_set_is_taken_wherever_a_name_is():
    with CORPORA.temporarily("tiny-text", lambda: "a tiny registered text"):
        assert load_corpus("tiny-text") == "a tiny registered text"
        assert corpus_label("tiny-text") == "tiny-text"
    with PROMPT_SETS.temporarily("two", lambda limit=None: [Prompt("one?"), Prompt("two?", "#### 2")][:limit]):
        prompts = load_prompts("two", 1)
        assert prompts == [Prompt("one?")]
        assert load_prompts("two")[1].answer == "2"
    with pytest.raises(DataError, match="neither a shipped corpus"):
        load_corpus("tiny-text")


def test_measure_imports_no_later_stage():
    """The import direction: measuring (and the models and data under it) imports neither the speculative decoder nor
    the sweeps, at module level or in a function."""
    package = Path(skiplm.__file__).parent
    for folder in ("measure", "models"):
        for path in (package / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    target = ("." * node.level + (node.module or "")).removeprefix("skiplm.")
                    assert not target.lstrip(".").startswith(("speculative", "sweep")), f"{path.name} imports {target}"
