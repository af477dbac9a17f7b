"""The one reader of skiplm folders' JSON records (heal, FiRST, LoRA-Drop, draft adapters): valid JSON, the right
format, a schema version this skiplm reads — each refusal names the file and what to do."""

from __future__ import annotations

import json

import pytest

from skiplm.files import check_record, read_json


class Refused(Exception):
    pass


def test_a_record_of_the_format_and_a_known_version_is_returned(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"format": "skiplm.x", "schema_version": 1, "k": 2}))
    data = check_record(read_json(path, Refused), format_name="skiplm.x", schema_version=1, error=Refused,
                        what="an x record", where=path)
    assert data == {"format": "skiplm.x", "schema_version": 1, "k": 2}


@pytest.mark.parametrize("text, message", [
    ('{"format": "skiplm.x", "schema', "is not valid JSON .*it may be truncated. Make it again."),
    (b"\xff\xfe", "is not valid JSON"),
    ('[1, 2]', 'is not an x record \\(expected "format": "skiplm.x"\\)'),
    ('{"format": "skiplm.y", "schema_version": 1}', "is not an x record"),
    ('{"format": "skiplm.x"}', "has schema version None; this skiplm reads up to 1: upgrade skiplm"),
    ('{"format": "skiplm.x", "schema_version": true}', "has schema version True"),
    ('{"format": "skiplm.x", "schema_version": 2}', "has schema version 2; this skiplm reads up to 1"),
])
def test_bad_records_are_refused_naming_the_file(tmp_path, text, message):
    path = tmp_path / "x.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(Refused, match=message) as refused:
        check_record(read_json(path, Refused, "Make it again."), format_name="skiplm.x", schema_version=1,
                     error=Refused, what="an x record", where=path)
    assert str(path) in str(refused.value)
