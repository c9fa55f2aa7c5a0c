"""common.fileio.atomic_write: the one temp-file-and-rename mechanism."""

import pytest

from common.cli import UserError
from common.fileio import atomic_write, atomic_write_text, tmp_path_for


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as f:
        f.write("half")
        raise RuntimeError("crash inside the block")
    assert target.read_text() == "old"
    assert not tmp_path_for(target).exists()
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and not tmp_path_for(target).exists()


def test_atomic_write_os_error_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"cannot write the manifest"):
        atomic_write_text(blocker / "manifest.json", "{}", what="manifest")
