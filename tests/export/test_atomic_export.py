"""Exports replace their target whole, only once the artefact is complete and checked.

What is asserted (a tiny classifier, 4 parity images):
* a SavedModel export that fails half-way through writing (a truncated
  saved_model.pb, then `OSError(ENOSPC)`) leaves the earlier SavedModel and its
  metadata JSON exactly as they were, no temporary folder, and a one-line
  `DiskFullError` naming the SavedModel;
* a successful re-export replaces the SavedModel folder whole (a file of the
  old folder is gone) and it loads;
* a `.tflite` export that fails half-way (half the bytes, then ENOSPC) leaves
  the earlier `.tflite` and its JSON (which claims parity for it) unchanged.
"""

import errno
import json
import os
from pathlib import Path

import pytest

from keras_resnet.export import export_model, load_exported_model
from keras_resnet.export import steps as export_job
from keras_resnet_settings.errors import DiskFullError
from tests.helpers import tiny_classifier


def snapshot(path: Path) -> dict:
    """{relative file path: bytes} of a file or a folder."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list:
    return sorted(name for name in os.listdir(folder) if name.startswith((".tmp-", ".old-")))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    tiny_classifier().save(path)
    return path


def test_saved_model_failing_mid_write_keeps_the_old_export(model_file, tmp_path, monkeypatch):
    result = export_model(model_file, format="saved_model", output=tmp_path, parity_samples=4)
    folder, metadata = Path(result["path"]), Path(result["metadata_path"])
    before, metadata_before = snapshot(folder), metadata.read_text()
    original = export_job.write_saved_model

    def write_then_fail(directory, track, endpoints):
        original(directory, track, endpoints)
        pb = Path(directory) / "saved_model.pb"
        pb.write_bytes(pb.read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_job, "write_saved_model", write_then_fail)
    with pytest.raises(DiskFullError, match=f"no space left on device while writing {folder}"):
        export_model(model_file, format="saved_model", output=tmp_path, parity_samples=4)
    assert snapshot(folder) == before
    assert metadata.read_text() == metadata_before
    assert leftovers(tmp_path) == []

    monkeypatch.undo()
    (folder / "stale_file_of_the_old_export").write_text("old")
    export_model(model_file, format="saved_model", output=tmp_path, parity_samples=4)
    assert not (folder / "stale_file_of_the_old_export").exists()
    assert load_exported_model(folder).predict is not None
    assert leftovers(tmp_path) == []


def test_tflite_failing_mid_write_keeps_the_old_file_and_its_json(model_file, tmp_path, monkeypatch):
    result = export_model(model_file, format="tflite", output=tmp_path, parity_samples=4)
    artefact, metadata = Path(result["path"]), Path(result["metadata_path"])
    before, metadata_before = artefact.read_bytes(), metadata.read_text()
    assert json.loads(metadata_before)["parity"]["passed"]

    def write_half(self, data):
        with open(self, "wb") as stream:
            stream.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_half)
    with pytest.raises(DiskFullError, match=f"no space left on device while writing {artefact}"):
        export_model(model_file, format="tflite", output=tmp_path, parity_samples=4)
    monkeypatch.undo()
    assert artefact.read_bytes() == before
    assert metadata.read_text() == metadata_before
    assert leftovers(tmp_path) == []
    assert load_exported_model(artefact).predict is not None
