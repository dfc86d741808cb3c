"""extract.core.atomic: a target holds its old content or the whole new one, never a part; no temp file is left."""

import pytest

from extract.core.atomic import atomic_path, write_errors, write_text_atomic
from extract.core.errors import UserError


def test_write_text_atomic_replaces_and_leaves_only_the_target(tmp_path):
    path = tmp_path / "sub" / "result.json"
    assert write_text_atomic(path, "first") == path
    write_text_atomic(path, "second · ü")
    assert path.read_text(encoding="utf-8") == "second · ü"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_failure_mid_write_keeps_the_previous_content(tmp_path):
    path = tmp_path / "head.joblib"
    path.write_bytes(b"old complete file")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(path) as tmp:
            assert tmp.parent == path.parent and tmp.name.endswith(".tmp")
            with open(tmp, "wb") as f:
                f.write(b"half of the new")
                f.flush()
                raise RuntimeError("writer died")
    assert path.read_bytes() == b"old complete file"
    assert [p.name for p in tmp_path.iterdir()] == ["head.joblib"]


def test_interrupt_mid_write_removes_the_temp_file(tmp_path):
    path = tmp_path / "a.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text("{")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_write_errors_names_the_file(tmp_path):
    (tmp_path / "taken").write_text("a file where a folder is needed")
    path = tmp_path / "taken" / "logreg.json"
    with pytest.raises(UserError, match=r"could not write .*taken/logreg\.json: .*intact"):
        with write_errors(path):
            write_text_atomic(path, "{}")
    assert (tmp_path / "taken").read_text() == "a file where a folder is needed"


def test_write_errors_lets_other_exceptions_through():
    with pytest.raises(ValueError):
        with write_errors("x.json"):
            raise ValueError("not an I/O problem")
