"""StagedFiles (io/_atomic.py): several files into place all or none, restores on failure, never loses a user's file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from napari_mamba_seg.io import _atomic as atomic_module
from napari_mamba_seg.io._atomic import StagedFiles


def _contents(folder: Path) -> dict[str, str | None]:
    """Every entry under ``folder``, hidden ones included: relative path → text (None for folders)."""
    return {str(p.relative_to(folder)): (p.read_text() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder holding a user's file ``a.txt`` and a stale ``stale.txt``."""
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "stale.txt").write_text("stale")
    return tmp_path


def _stage_and_commit(staging: StagedFiles, folder: Path, overwrite: bool = True) -> None:
    staging.stage(folder / "a.txt").write_text("new a")
    staging.stage(folder / "sub" / "deep" / "a.txt").write_text("deep a")  # same name, another folder
    staging.commit(overwrite=overwrite, remove=[folder / "stale.txt"])


def test_commit_moves_every_file_into_place_and_removes_the_staging_folder(folder: Path) -> None:
    with StagedFiles(folder, prefix=".test-", create=[folder / "sub" / "deep"]) as staging:
        _stage_and_commit(staging, folder)
    assert _contents(folder) == {"a.txt": "new a", "sub": None, "sub/deep": None, "sub/deep/a.txt": "deep a"}


def test_a_failure_after_the_commit_restores_everything_and_removes_created_folders(folder: Path) -> None:
    before = _contents(folder)
    with pytest.raises(KeyboardInterrupt), StagedFiles(folder, prefix=".test-", create=[folder / "sub" / "deep"]) as s:
        _stage_and_commit(s, folder)
        assert (folder / "a.txt").read_text() == "new a" and not (folder / "stale.txt").exists()
        raise KeyboardInterrupt
    assert _contents(folder) == before


def test_a_file_that_appeared_meanwhile_is_refused_and_kept(folder: Path) -> None:
    (folder / "sub" / "deep").mkdir(parents=True)
    (folder / "sub" / "deep" / "a.txt").write_text("theirs")
    before = _contents(folder)
    with pytest.raises(FileExistsError, match="appeared during the export"), StagedFiles(folder, prefix=".t-") as s:
        s.stage(folder / "new.txt").write_text("moved in first")
        s.stage(folder / "sub" / "deep" / "a.txt").write_text("ours")
        s.commit(overwrite=False)
    assert _contents(folder) == before  # new.txt removed again, "theirs" untouched


def test_a_file_that_cannot_be_restored_keeps_its_earlier_version(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace

    def replace_failing_on_restore(source: object, target: object) -> None:
        if Path(source).name.startswith("kept-"):
            raise OSError(5, "Input/output error (simulated)")
        real_replace(source, target)

    monkeypatch.setattr(atomic_module.os, "replace", replace_failing_on_restore)
    unrestored = pytest.raises(OSError, match=r"could not restore .*a\.txt.*Move them back by hand")
    with unrestored, StagedFiles(folder, prefix=".test-") as staging:
        staging.stage(folder / "a.txt").write_text("new a")
        staging.commit(overwrite=True)
        raise RuntimeError("a later step failed")
    kept = [path.read_text() for path in folder.glob(".test-*/kept-*")]
    assert kept == ["old a"]  # the only copy of the earlier a.txt survives
