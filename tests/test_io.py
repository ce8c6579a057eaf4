import pytest

from ctl.io import atomic_path, write_bytes_atomic, write_text_atomic


def _leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_write_text_creates_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    write_text_atomic(path, "first")
    assert path.read_text() == "first"
    write_text_atomic(path, "second, longer content")
    assert path.read_text() == "second, longer content"
    write_text_atomic(path, "3")
    assert path.read_text() == "3"  # shorter content is not padded by the old one
    assert _leftovers(path.parent, {"out.txt"}) == []


def test_write_bytes_atomic(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 10
    write_bytes_atomic(path, data)
    assert path.read_bytes() == data
    assert _leftovers(tmp_path, {"blob.bin"}) == []


def test_atomic_path_writes_elsewhere_until_the_block_ends(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("old")
    with atomic_path(path) as tmp:
        assert tmp != path
        assert tmp.parent == path.parent  # same filesystem, so the rename is atomic
        tmp.write_text("new")
        assert path.read_text() == "old"  # readers still see the old file mid-write
    assert path.read_text() == "new"
    assert _leftovers(tmp_path, {"model.pt"}) == []


def test_exception_inside_block_keeps_old_content_and_no_temp(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"old": true}')
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(path) as tmp:
            tmp.write_text('{"partial"')
            raise RuntimeError("boom")
    assert path.read_text() == '{"old": true}'
    assert _leftovers(tmp_path, {"results.json"}) == []


def test_exception_without_previous_file_leaves_nothing(tmp_path):
    path = tmp_path / "new.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []
