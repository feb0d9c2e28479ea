"""fsutil: a file or directory appears whole or not at all, and a failed write leaves no temp file behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from searchr1.fsutil import (
    atomic_path,
    copy_file_atomic,
    copy_tree_atomic,
    move_dir,
    open_atomic,
    publish_dir,
    write_json_atomic,
)


class Boom(Exception):
    pass


def leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def test_writes_replace_the_old_version_whole(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out.json"
    write_json_atomic(out, {"a": "é"})
    assert out.read_text(encoding="utf-8") == '{\n  "a": "é"\n}\n'
    with open_atomic(out, "w") as fh:
        fh.write("new")
    assert out.read_text() == "new"
    with atomic_path(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        tmp.write_bytes(b"by name")
    assert out.read_bytes() == b"by name"
    assert leftovers(out.parent, {"out.json"}) == []


@pytest.mark.parametrize("writer", ["open_atomic", "atomic_path", "copy_file_atomic"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, writer: str) -> None:
    out = tmp_path / "out.txt"
    out.write_text("old")
    with pytest.raises((Boom, FileNotFoundError)):
        if writer == "open_atomic":
            with open_atomic(out, "w") as fh:
                fh.write("half")
                raise Boom
        elif writer == "atomic_path":
            with atomic_path(out) as tmp:
                tmp.write_text("half")
                raise Boom
        else:
            copy_file_atomic(tmp_path / "missing", out)
    assert out.read_text() == "old"
    assert leftovers(tmp_path, {"out.txt"}) == []


def test_open_atomic_refuses_modes_that_do_not_write_a_new_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        with open_atomic(tmp_path / "x", "a"):
            pass


def test_directories_are_swapped_in_whole(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("1")
    dst = tmp_path / "dst"
    (dst / "stale").mkdir(parents=True)
    copy_tree_atomic(src, dst)
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*")) == ["sub", "sub/f"]

    def fill_and_fail(tmp: Path) -> None:
        (tmp / "partial").write_text("x")
        raise Boom

    with pytest.raises(Boom):
        publish_dir(dst, fill_and_fail)
    assert (dst / "sub" / "f").read_text() == "1"
    assert leftovers(tmp_path, {"src", "dst"}) == []


def test_publish_file_moves_a_finished_file_in_one_rename(tmp_path):
    from searchr1.fsutil import publish_file

    partial = tmp_path / "image.sif.partial"
    partial.write_bytes(b"done")
    (tmp_path / "image.sif").write_bytes(b"old")
    assert publish_file(partial, tmp_path / "image.sif") == tmp_path / "image.sif"
    assert (tmp_path / "image.sif").read_bytes() == b"done" and not partial.exists()


def test_no_rename_outside_fsutil():
    """Every publish of a file goes through fsutil (one place for atomicity)."""
    import re
    from pathlib import Path

    import searchr1

    root = Path(searchr1.__file__).parent
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for path in root.rglob("*.py")
        if path.name != "fsutil.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bos\.(replace|rename)\(|\.rename\(|\.replace\(tmp", line)
    ]
    assert not offenders, offenders


def test_move_dir_replaces_the_destination(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "new").write_text("1")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old").write_text("0")
    assert move_dir(tmp_path / "a", tmp_path / "b") == tmp_path / "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and (tmp_path / "b" / "new").read_text() == "1"
