"""The correction journal: what is recorded is restored exactly, torn records are skipped, a killed process loses
no acknowledged record, and the journal never touches folders that are not its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_mamba_seg.interactive import journal as journal_module
from napari_mamba_seg.interactive.edits import Edit
from napari_mamba_seg.interactive.journal import (
    CorrectionJournal,
    JournalError,
    default_recovery_root,
    discard_journal,
    journal_key,
)
from napari_mamba_seg.interactive.review import ReviewState

SHAPE = (8, 16, 16)
KEY = "case-0001"


def base_labels() -> np.ndarray:
    """``SHAPE`` uint8 labels with a few classes, the same in every process."""
    rng = np.random.default_rng(7)
    return rng.integers(0, 3, SHAPE).astype(np.uint8)


def apply_change(labels: np.ndarray, step: int, journal: CorrectionJournal | None = None) -> None:
    """Make correction number ``step`` on ``labels`` in place, and record it in ``journal`` when one is given.

    Cycles through the three ways labels change: an :class:`Edit` of a correction tool, napari's ``data_setitem``
    voxel change, and napari's masked brush/fill atom. Each step changes at least one voxel.
    """
    rng = np.random.default_rng(1000 + step)
    z, y, x = (int(rng.integers(0, size - 6)) for size in labels.shape)
    value = int(labels[z, y, x]) % 3 + 1  # differs from the voxel at (z, y, x), so the change is never empty
    if step % 3 == 0:
        new = labels.copy()
        new[z : z + 2, y : y + 5, x : x + 4] = value
        edit = Edit.between(labels, new, f"tool {step}")
        edit.apply(labels)
        if journal is not None:
            journal.record_edit(edit)
    elif step % 3 == 1:
        indices = tuple(
            np.append(rng.integers(0, size, 30), start) for size, start in zip(labels.shape, (z, y, x), strict=True)
        )
        old = labels[indices].copy()
        labels[indices] = value
        if journal is not None:
            journal.record_voxels(indices, old, value, f"brush {step}")
    else:
        region = (slice(z, z + 1), slice(y, y + 6), slice(x, x + 6))
        mask = rng.random((1, 6, 6)) < 0.5
        mask[0, 0, 0] = True
        box = labels[region]
        old = box[mask].copy()
        box[mask] = value
        if journal is not None:
            journal.record_region(region, mask, old, value, f"paint {step}")


def replayed(steps: int) -> np.ndarray:
    """The base labels after changes ``0 .. steps - 1``, made without a journal."""
    labels = base_labels()
    for step in range(steps):
        apply_change(labels, step)
    return labels


def generations(root: Path, key: str = KEY) -> list[str]:
    return sorted(path.name for path in (root / key).iterdir() if path.name.startswith("gen-"))


def current_generation(root: Path, key: str = KEY) -> Path:
    return root / key / json.loads((root / key / "CURRENT.json").read_text())["generation"]


def start_with_changes(root: Path, steps: int, **options) -> tuple[CorrectionJournal, np.ndarray]:
    labels = base_labels()
    journal = CorrectionJournal.start(root, KEY, labels, description={"image": "case.nii.gz"}, **options)
    for step in range(steps):
        apply_change(labels, step, journal)
    return journal, labels


# -- round trips -------------------------------------------------------------------------------------------------


def test_edits_voxels_regions_and_reviews_round_trip(tmp_path: Path) -> None:
    labels = base_labels()
    start_review = ReviewState.for_shape(SHAPE, axis=0)
    start_review.mark(4)
    journal = CorrectionJournal.start(
        tmp_path, KEY, labels, description={"image": "case.nii.gz", "layer": "seg"}, review=start_review
    )
    assert CorrectionJournal.restore(tmp_path, KEY).review.reviewed == {4}
    review = ReviewState.for_shape(SHAPE, axis=0)
    for step in range(9):
        apply_change(labels, step, journal)
        if step % 4 == 1:
            review.mark(step % SHAPE[0])
            journal.record_review(review)
    full_box = (slice(2, 3), slice(None), slice(0, 5))  # napari's atom without mask: the whole box changed
    old = labels[full_box].copy()
    labels[full_box] = 3
    assert journal.record_region(full_box, None, old, 3, "fill") == journal.num_records
    review.unmark(1)
    journal.record_review(review)

    restored = CorrectionJournal.restore(tmp_path, KEY)
    np.testing.assert_array_equal(restored.labels, labels)
    assert restored.labels.dtype == np.uint8
    assert restored.review == review and restored.review is not review
    assert (restored.num_records, restored.num_edits, restored.skipped) == (13, 10, ())
    np.testing.assert_array_equal(journal.labels, labels)
    assert not np.array_equal(labels, base_labels())

    info = CorrectionJournal.find(tmp_path, KEY)
    assert (info.num_records, info.num_edits, info.has_review) == (13, 10, True)
    assert info.description == {"image": "case.nii.gz", "layer": "seg"}
    assert (info.shape, info.dtype, info.key, info.folder) == (SHAPE, "uint8", KEY, tmp_path / KEY)
    assert info.created <= info.last_change
    assert abs(info.last_change.timestamp() - time.time()) < 60


def test_a_stroke_of_several_atoms_and_repeated_voxels_replay_in_order(tmp_path: Path) -> None:
    labels = base_labels()
    journal = CorrectionJournal.start(tmp_path, KEY, labels, description={})
    changes = []  # a napari brush stroke: overlapping atoms, each painting over the ones before
    for value, (y, x) in zip((1, 2, 3), ((2, 2), (4, 4), (5, 3)), strict=True):
        region = (slice(3, 4), slice(y, y + 5), slice(x, x + 5))
        box = labels[region]
        mask = (box != value) & (np.add.outer(np.arange(5), np.arange(5)) < 6)[None]
        changes.append((region, mask, box[mask].copy(), value))
        box[mask] = value
    full_box = (slice(0, 1), slice(0, 3), slice(None, 3))
    changes.append((full_box, None, labels[full_box].copy(), 2))
    labels[full_box] = 2
    assert journal.record_regions(changes, "brush stroke") == 1
    # data_setitem with voxel (1, 0, 0) listed twice: its last value wins, as when the values are written in turn
    indices = (np.array([1, 1, 2, 1]), np.array([0, 5, 5, 0]), np.array([0, 6, 6, 0]))
    new = np.array([3, 1, 3, 2], np.uint8)
    old = labels[indices].copy()
    for position in range(4):
        labels[indices[0][position], indices[1][position], indices[2][position]] = new[position]
    assert journal.record_voxels(indices, old, new, "setitem") == 2
    assert journal.record_regions([], "nothing") is None

    restored = CorrectionJournal.restore(tmp_path, KEY)
    np.testing.assert_array_equal(restored.labels, labels)
    np.testing.assert_array_equal(journal.labels, labels)
    assert restored.num_records == restored.num_edits == 2
    assert labels[1, 0, 0] == 2


def test_a_snapshot_resets_the_base(tmp_path: Path) -> None:
    journal, labels = start_with_changes(tmp_path, 4)
    replacement = np.random.default_rng(3).integers(0, 300, SHAPE).astype(np.uint16)  # widened to hold class 299
    assert journal.record_snapshot(replacement) == 5
    labels = replacement.copy()
    for step in range(4, 7):
        apply_change(labels, step, journal)

    restored = CorrectionJournal.restore(tmp_path, KEY)
    np.testing.assert_array_equal(restored.labels, labels)
    assert restored.labels.dtype == np.uint16
    assert (restored.num_records, restored.num_edits, restored.review) == (8, 8, None)
    assert len(generations(tmp_path)) == 1  # the generation before the snapshot is gone
    with pytest.raises(ValueError, match="start a new journal"):
        journal.record_snapshot(np.zeros((2, 2), np.uint8))


def test_compaction_folds_records_without_changing_the_result(tmp_path: Path) -> None:
    journal, labels = start_with_changes(tmp_path, 10, compact_after_records=4)
    review = ReviewState(axis=0, num_slices=SHAPE[0], reviewed={0, 2})
    journal.record_review(review)  # record 11: the review survives the next compaction too
    apply_change(labels, 10, journal)  # record 12 triggers the third compaction

    assert generations(tmp_path) == ["gen-000004"]  # the start, then after records 4, 8 and 12
    assert (current_generation(tmp_path) / "index.jsonl").read_bytes() == b""
    restored = CorrectionJournal.restore(tmp_path, KEY)
    np.testing.assert_array_equal(restored.labels, labels)
    np.testing.assert_array_equal(restored.labels, replayed(11))
    assert (restored.num_records, restored.num_edits, restored.review) == (12, 11, review)

    apply_change(labels, 11, journal)
    journal.compact()  # by hand
    assert generations(tmp_path) == ["gen-000005"]
    np.testing.assert_array_equal(CorrectionJournal.restore(tmp_path, KEY).labels, replayed(12))


def test_compaction_by_size(tmp_path: Path) -> None:
    journal, _ = start_with_changes(tmp_path, 3, compact_after_bytes=1)  # every record reaches the limit
    assert generations(tmp_path) == ["gen-000004"]
    assert CorrectionJournal.find(tmp_path, KEY).num_records == journal.num_records == 3
    np.testing.assert_array_equal(CorrectionJournal.restore(tmp_path, KEY).labels, replayed(3))


def test_a_large_volume_is_journalled(tmp_path: Path) -> None:
    labels = np.zeros((200, 512, 512), np.uint8)
    labels[40:160, 100:400, 120:380] = 1
    labels[90:110, 200:260, 200:240] = 2
    journal = CorrectionJournal.start(tmp_path, KEY, labels, description={})
    new_block = labels[100:102, 0:50, 0:50].copy()
    new_block[:, 10:20, 10:20] = 3
    edit = Edit((slice(100, 102), slice(0, 50), slice(0, 50)), labels[100:102, :50, :50], new_block, "x", labels.shape)
    edit.apply(labels)
    journal.record_edit(edit)
    base_file = current_generation(tmp_path) / "base.npz"
    assert base_file.stat().st_size < labels.nbytes // 20  # compressed
    restored = CorrectionJournal.restore(tmp_path, KEY)
    assert np.array_equal(restored.labels, labels) and restored.num_records == 1


# -- torn and stray records --------------------------------------------------------------------------------------


def test_a_truncated_last_record_is_skipped(tmp_path: Path) -> None:
    start_with_changes(tmp_path, 5)
    last = current_generation(tmp_path) / "00000005.voxels.npz"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])

    restored = CorrectionJournal.restore(tmp_path, KEY)
    np.testing.assert_array_equal(restored.labels, replayed(4))
    assert restored.num_records == 4
    assert len(restored.skipped) == 1 and "record 5" in restored.skipped[0]
    assert CorrectionJournal.find(tmp_path, KEY).num_records == 4


def test_a_torn_index_line_and_stray_files_are_ignored(tmp_path: Path) -> None:
    start_with_changes(tmp_path, 5)
    generation = current_generation(tmp_path)
    # A crash after record 6's file was renamed into place but before its index line was complete:
    (generation / "00000006.edit.npz").write_bytes((generation / "00000004.edit.npz").read_bytes())
    (generation / ".00000007.edit.npz.tmp-0123").write_bytes(b"PK\x03\x04 half a zip")
    with open(generation / "index.jsonl", "ab") as index:
        index.write(b'{"seq": 6, "kind": "edit", "file": "00000006.ed')

    restored = CorrectionJournal.restore(tmp_path, KEY)
    np.testing.assert_array_equal(restored.labels, replayed(5))
    assert restored.num_records == 5
    assert len(restored.skipped) == 1 and "torn last line" in restored.skipped[0]
    assert CorrectionJournal.find(tmp_path, KEY).num_records == 5


def test_a_damaged_record_stops_the_replay_before_it(tmp_path: Path) -> None:
    start_with_changes(tmp_path, 6)
    damaged = current_generation(tmp_path) / "00000003.region.npz"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))

    restored = CorrectionJournal.restore(tmp_path, KEY)
    np.testing.assert_array_equal(restored.labels, replayed(2))  # records 4..6 were made on top of record 3
    assert restored.num_records == 2
    assert "record 3" in restored.skipped[-1] and "3 later record(s)" in restored.skipped[-1]


CRASH_WRITER = """
import sys
sys.path.insert(0, {test_dir!r})
from test_journal import apply_change, base_labels
from napari_mamba_seg.interactive.journal import CorrectionJournal

labels = base_labels()
journal = CorrectionJournal.start({root!r}, {key!r}, labels, description={{}}, compact_after_records=7)
step = 0
while True:
    apply_change(labels, step, journal)
    step += 1
    print(step, flush=True)
"""


@pytest.mark.parametrize("kill_after", [4, 23])
def test_a_killed_process_loses_no_acknowledged_record(tmp_path: Path, kill_after: int) -> None:
    code = CRASH_WRITER.format(test_dir=str(Path(__file__).parent), root=str(tmp_path), key=KEY)
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reported = 0
        while reported < kill_after:
            line = writer.stdout.readline()
            assert line, f"the writer stopped early: {writer.stderr.read()}"
            reported = int(line)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
        reported = max([reported] + [int(line) for line in writer.stdout.read().split()])
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.stdout.close()
        writer.stderr.close()
    assert writer.returncode == -signal.SIGKILL

    info = CorrectionJournal.find(tmp_path, KEY)
    restored = CorrectionJournal.restore(tmp_path, KEY)
    # Every reported record is there; at most the one being written when the kill came completed after the report.
    assert reported <= restored.num_records <= reported + 1
    assert info.num_records == restored.num_records
    np.testing.assert_array_equal(restored.labels, replayed(restored.num_records))

    # Going on from the restored state (as the widget does) leaves one clean generation.
    CorrectionJournal.start(tmp_path, KEY, restored.labels, description={})
    assert generations(tmp_path) == [current_generation(tmp_path).name]
    assert not [path for path in (tmp_path / KEY).rglob(".*") if ".tmp-" in path.name]


# -- starting, finding, discarding -------------------------------------------------------------------------------


def test_find_gives_none_for_an_unknown_key_and_restore_refuses(tmp_path: Path) -> None:
    assert CorrectionJournal.find(tmp_path, KEY) is None
    assert CorrectionJournal.find(tmp_path / "not-created-yet", KEY) is None
    with pytest.raises(JournalError, match="no correction journal"):
        CorrectionJournal.restore(tmp_path, KEY)


def test_discard_removes_the_journal(tmp_path: Path) -> None:
    journal, labels = start_with_changes(tmp_path, 2)
    (tmp_path / "other-file.txt").write_text("not ours")
    journal.discard()
    assert not (tmp_path / KEY).exists() and journal.discarded
    assert (tmp_path / "other-file.txt").read_text() == "not ours"
    assert CorrectionJournal.find(tmp_path, KEY) is None
    with pytest.raises(JournalError, match="discarded"):
        apply_change(labels, 2, journal)
    assert discard_journal(tmp_path, KEY) is False


def test_a_discard_cut_short_leaves_no_journal_and_a_reusable_folder(tmp_path: Path) -> None:
    start_with_changes(tmp_path, 2)
    (tmp_path / KEY / "CURRENT.json").unlink()  # the first step of discard_journal, then a crash
    assert CorrectionJournal.find(tmp_path, KEY) is None
    CorrectionJournal.start(tmp_path, KEY, base_labels(), description={})
    assert generations(tmp_path) == ["gen-000002"]
    assert CorrectionJournal.restore(tmp_path, KEY).num_records == 0


def test_start_replaces_a_journal_only_once_the_new_base_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_with_changes(tmp_path, 3)
    before = CorrectionJournal.find(tmp_path, KEY)
    write = journal_module._write_file_durably

    def fail_on_base(path: Path, data: bytes) -> None:
        if path.name == "base.npz":
            write(path, data[: len(data) // 2])  # half a base, then the disk fails
            raise OSError(28, "No space left on device")
        write(path, data)

    monkeypatch.setattr(journal_module, "_write_file_durably", fail_on_base)
    with pytest.raises(OSError, match="No space"):
        CorrectionJournal.start(tmp_path, KEY, np.zeros(SHAPE, np.uint8), description={"new": True})
    assert CorrectionJournal.find(tmp_path, KEY) == before
    np.testing.assert_array_equal(CorrectionJournal.restore(tmp_path, KEY).labels, replayed(3))
    assert generations(tmp_path) == ["gen-000001"]

    def fail_on_switch(path: Path, data: bytes) -> None:
        if path.name == "CURRENT.json":
            raise OSError(5, "Input/output error")
        write(path, data)

    monkeypatch.setattr(journal_module, "_write_file_durably", fail_on_switch)
    with pytest.raises(OSError, match="Input/output"):
        CorrectionJournal.start(tmp_path, KEY, np.zeros(SHAPE, np.uint8), description={"new": True})
    np.testing.assert_array_equal(CorrectionJournal.restore(tmp_path, KEY).labels, replayed(3))

    monkeypatch.setattr(journal_module, "_write_file_durably", write)
    CorrectionJournal.start(tmp_path, KEY, np.zeros(SHAPE, np.uint8), description={"new": True})
    restored = CorrectionJournal.restore(tmp_path, KEY)
    assert not restored.labels.any() and restored.num_records == 0
    assert CorrectionJournal.find(tmp_path, KEY).description == {"new": True}
    assert len(generations(tmp_path)) == 1


def test_a_folder_without_the_marker_is_refused_and_left_alone(tmp_path: Path) -> None:
    foreign = tmp_path / KEY
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone's notes")
    for call in (
        lambda: CorrectionJournal.start(tmp_path, KEY, base_labels(), description={}),
        lambda: CorrectionJournal.find(tmp_path, KEY),
        lambda: CorrectionJournal.restore(tmp_path, KEY),
        lambda: discard_journal(tmp_path, KEY),
    ):
        with pytest.raises(JournalError, match=r"no napari-mamba-seg-journal\.json marker.*left alone"):
            call()
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]


def test_a_linked_key_folder_is_never_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    start_with_changes(elsewhere, 1)  # a real journal, reachable only through the link
    root = tmp_path / "recovery"
    root.mkdir()
    (root / KEY).symlink_to(elsewhere / KEY, target_is_directory=True)
    for call in (
        lambda: CorrectionJournal.find(root, KEY),
        lambda: discard_journal(root, KEY),
        lambda: CorrectionJournal.start(root, KEY, base_labels(), description={}),
    ):
        with pytest.raises(JournalError, match="symbolic link"):
            call()
    assert CorrectionJournal.find(elsewhere, KEY).num_records == 1


def test_bad_input_is_refused_before_anything_is_recorded(tmp_path: Path) -> None:
    journal, _ = start_with_changes(tmp_path, 2)
    with pytest.raises(ValueError, match="outside labels of shape"):
        journal.record_voxels((np.array([0]), np.array([3]), np.array([16])), [0], 1, "brush")
    with pytest.raises(ValueError, match="cannot store"):
        journal.record_voxels((np.array([0]), np.array([3]), np.array([1])), [0], 300, "brush")
    with pytest.raises(ValueError, match="tuple of 3 index arrays"):
        journal.record_voxels((np.array([0]), np.array([3])), [0], 1, "brush")
    with pytest.raises(ValueError, match="mask must be a bool array"):
        journal.record_region((slice(0, 1), slice(0, 2), slice(0, 2)), np.ones((2, 2), bool), [0] * 4, 1, "paint")
    with pytest.raises(ValueError, match="recorded on labels of shape"):
        journal.record_edit(Edit.between(np.zeros((2, 2), np.uint8), np.ones((2, 2), np.uint8), "other"))
    with pytest.raises(TypeError, match="skip None"):
        journal.record_edit(None)
    with pytest.raises(ValueError, match="does not fit labels"):
        journal.record_review(ReviewState.for_shape((3, 4, 4), axis=0))
    assert journal.record_voxels((np.array([], int),) * 3, [], [], "nothing") is None
    assert journal.num_records == CorrectionJournal.find(tmp_path, KEY).num_records == 2
    np.testing.assert_array_equal(CorrectionJournal.restore(tmp_path, KEY).labels, replayed(2))

    with pytest.raises(ValueError, match="JSON values"):
        CorrectionJournal.start(tmp_path, "other", base_labels(), description={"when": object()})
    with pytest.raises(ValueError, match="integer label array"):
        CorrectionJournal.start(tmp_path, "other", base_labels().astype(np.float32), description={})
    with pytest.raises(ValueError, match="journal key"):
        CorrectionJournal.start(tmp_path, "../escape", base_labels(), description={})
    assert sorted(path.name for path in tmp_path.iterdir()) == [KEY]


# -- keys and the recovery root ----------------------------------------------------------------------------------


def test_journal_key_identifies_the_image_and_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "study" / "case.nii.gz"
    image.parent.mkdir()
    image.write_bytes(b"")
    (tmp_path / "link").symlink_to(image.parent, target_is_directory=True)
    affine = np.diag([0.7, 0.7, 2.0, 1.0])
    key = journal_key(image, (40, 64, 64), affine, "segmentation")
    monkeypatch.chdir(tmp_path)
    assert len(key) == 24 and set(key) <= set("0123456789abcdef")
    for spelling in ("study/case.nii.gz", "study/../study/case.nii.gz", "link/case.nii.gz", str(image)):
        assert journal_key(spelling, (40, 64, 64), affine + 1e-9, "segmentation") == key
    others = {
        journal_key(image, (40, 64, 65), affine, "segmentation"),
        journal_key(image, (40, 64, 64), np.diag([0.7, 0.7, 2.5, 1.0]), "segmentation"),
        journal_key(image, (40, 64, 64), affine, "lesions"),
        journal_key(tmp_path / "other.nii.gz", (40, 64, 64), affine, "segmentation"),
        journal_key(None, (40, 64, 64), affine, "segmentation"),
    }
    assert key not in others and len(others) == 5
    assert journal_key(None, (8, 8), None, "Labels") == journal_key(None, [8, 8], None, "Labels")
    assert journal_key(None, (8, 8), None, "Labels") != journal_key(None, (8, 8), None, "Labels [1]")
    with pytest.raises(ValueError, match="affine"):
        journal_key(None, (8, 8), [[np.nan]], "Labels")


def test_default_recovery_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAPARI_MAMBA_SEG_RECOVERY", str(tmp_path / "mine"))
    assert default_recovery_root() == tmp_path / "mine"
    monkeypatch.delenv("NAPARI_MAMBA_SEG_RECOVERY")
    root = default_recovery_root()
    assert root.name == "recovery" and root.parent.name == "napari-mamba-seg"


def test_the_journal_imports_no_heavy_modules() -> None:
    code = textwrap.dedent(
        """
        import sys
        import napari_mamba_seg.interactive.journal
        heavy = {'torch', 'napari', 'qtpy', 'PyQt6', 'platformdirs'}
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in heavy)
        assert not heavy, heavy
        """
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
