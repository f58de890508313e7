"""Input checks before Ray starts: unreadable image files (skipped and counted up to 1 %, fatal beyond) and folders
the sweep cannot write. A failing `sweep validate` / `sweep run` leaves the MLflow store byte-identical.

Real images (hymenoptera, extracted from shared/data), real corrupt files, the real CLI in a subprocess.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sweep.driver.preflight import StorageError, check_writable
from sweep.zoo.batching import batches
from sweep.zoo.data import DataError, load_dataset

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout, or $SWEEP_SHARED_DATA (a worktree elsewhere); absent in a user's clone: skip
HYMENOPTERA = Path(os.environ.get("SWEEP_SHARED_DATA") or REPO.parent / "shared" / "data") / "hymenoptera" / \
    "hymenoptera.tar.gz"


@pytest.fixture(scope="module")
def hymenoptera_tar(tmp_path_factory) -> Path:
    if not HYMENOPTERA.exists():
        pytest.skip(f"real data absent: {HYMENOPTERA} (see shared/data/README.md)")
    return HYMENOPTERA


def extract(tar: Path, where: Path) -> Path:
    with tarfile.open(tar) as archive:
        archive.extractall(where, filter="data")
    return where / "hymenoptera_data"


def corrupt(paths: list[Path]) -> None:
    """Half emptied, half overwritten with bytes that are no image."""
    for i, path in enumerate(paths):
        path.write_bytes(b"" if i % 2 == 0 else b"this is not a jpeg" * 50)


def test_a_few_unreadable_images_are_skipped_and_counted(hymenoptera_tar, tmp_path):
    root = extract(hymenoptera_tar, tmp_path)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    start = time.perf_counter()
    clean = load_dataset("imagefolder", root=str(root), image_size=32, seed=0)
    checked_in = time.perf_counter() - start
    images = sum(len(part) for part in (clean.train, clean.val, clean.test))  # 397: ImageFolder's extensions
    assert clean.skipped_files == []
    print(f"loading hymenoptera ({len(files)} files, every header verified) took {checked_in * 1000:.0f} ms")

    bad = [root / "train" / "ants" / sorted(os.listdir(root / "train" / "ants"))[3],
           root / "val" / "bees" / sorted(os.listdir(root / "val" / "bees"))[5]]
    corrupt(bad)
    assert images // 100 >= len(bad)  # within the 1 % a sweep may lose
    splits = load_dataset("imagefolder", root=str(root), image_size=32, seed=0)
    assert sorted(splits.skipped_files) == sorted(map(str, bad))
    every = [p for part in (splits.train, splits.val, splits.test) for p, _ in part.samples]
    assert not set(map(str, bad)) & set(every) and len(every) == images - len(bad)
    # The same files are left out every time (the same splits in every trial), and a whole pass does not crash.
    again = load_dataset("imagefolder", root=str(root), image_size=32, seed=0)
    assert [p for p, _ in again.train.samples] == [p for p, _ in splits.train.samples]
    seen = sum(len(y) for _, y in batches(splits.test, 64, train=False))
    assert seen == len(splits.test)
    # limit keeps the count
    assert load_dataset("imagefolder", root=str(root), image_size=32, seed=0, limit=20).skipped_files == \
        splits.skipped_files


def test_more_than_one_percent_unreadable_is_an_error_naming_the_first_file(hymenoptera_tar, tmp_path):
    root = extract(hymenoptera_tar, tmp_path)
    ants = sorted((root / "train" / "ants").iterdir())
    corrupt(ants[:5])  # 5 of 397 images: more than 3 (1 %)
    with pytest.raises(DataError) as error:
        load_dataset("imagefolder", root=str(root), image_size=32)
    message = str(error.value)
    assert message.startswith(f"dataset.root: {ants[0]} is empty;")
    assert "5 of 397 imagefolder image files are unreadable" in message and "\n" not in message


# --- the CLI: one line, exit 2, the store untouched ------------------------------------------------------------


def small_folder(root: Path, bad: int) -> Path:
    """train/ and test/ with two classes of 8 tiny PNGs each; `bad` of them replaced by garbage."""
    rng = np.random.default_rng(0)
    paths = []
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(8):
                path = root / split / cls / f"{i}.png"
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
                paths.append(path)
    corrupt(paths[:bad])
    return root


SPEC = """name: checks
dataset: {{name: imagefolder, root: {root}, image_size: 12}}
model: {{name: small_cnn}}
base: {{epochs: 1, batch_size: 8}}
finetune: {{epochs: 1, batch_size: 8}}
resources: {{cpu: 1}}
"""


@pytest.fixture
def store(sqlite_uri) -> tuple[str, Path]:
    """A store holding one experiment and run, so 'untouched' means something."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_uri)
    run = client.create_run(client.create_experiment("existing"))
    client.log_metric(run.info.run_id, "m", 1.0)
    client.set_terminated(run.info.run_id)
    return sqlite_uri, Path(sqlite_uri[len("sqlite:///"):])


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file beside the database (the db, and any journal or lock it might have grown)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.timeout(300)
def test_corrupt_image_folder_fails_validate_and_run_leaving_the_store_identical(tmp_path, store):
    uri, db = store
    root = small_folder(tmp_path / "images", bad=2)  # 2 of 32: more than 1 %
    spec = tmp_path / "checks.yaml"
    spec.write_text(SPEC.format(root=root))
    before = digest(db.parent)
    validate = cli("validate", str(spec), cwd=tmp_path)
    run = cli("run", str(spec), "--tracking-uri", uri, "--storage", str(tmp_path / "results"), cwd=tmp_path)
    for result in (validate, run):
        assert result.returncode == 2, result.stderr[-2000:]
        [line] = error_lines(result)
        assert "dataset.root:" in line and "0.png is empty" in line and "2 of 32 imagefolder image files" in line
        assert "Traceback" not in result.stderr
    assert digest(db.parent) == before


@pytest.mark.timeout(300)
def test_unwritable_storage_or_store_folder_fails_run_leaving_the_store_identical(tmp_path, store):
    uri, db = store
    root = small_folder(tmp_path / "images", bad=0)
    spec = tmp_path / "checks.yaml"
    spec.write_text(SPEC.format(root=root))
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder should be")  # unwritable as a folder even for root
    before = digest(db.parent)
    run = cli("run", str(spec), "--tracking-uri", uri, "--storage", str(blocker / "results"), cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    [line] = error_lines(run)
    assert line.startswith(f"error: --storage: {blocker / 'results'}") and "not writable" in line
    assert "give --storage a folder you can write to" in line
    assert digest(db.parent) == before

    bad_uri = f"sqlite:///{blocker}/mlflow.db"
    run = cli("run", str(spec), "--tracking-uri", bad_uri, "--storage", str(tmp_path / "results"), cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    [line] = error_lines(run)
    assert line.startswith(f"error: --tracking-uri: {bad_uri}") and "pass --tracking-uri sqlite:///" in line
    assert not (tmp_path / "results").exists()  # nothing created either


def test_read_only_folders_are_reported_with_their_option(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: a chmod'ed folder stays writable for root (the file-as-folder case above "
                    "covers the check)")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(StorageError, match=r"^--storage: .*/ro is not writable \(PermissionError"):
            check_writable(str(ro), f"sqlite:///{tmp_path}/mlflow.db")
        with pytest.raises(StorageError, match=r"^--tracking-uri: sqlite:///.*/ro/mlflow.db: folder .* not writable"):
            check_writable(str(tmp_path / "results"), f"sqlite:///{ro}/mlflow.db")
    finally:
        ro.chmod(0o755)


def test_writable_folders_pass_and_leave_nothing_behind(tmp_path):
    check_writable(str(tmp_path / "not" / "yet" / "there"), f"sqlite:///{tmp_path}/mlflow.db")
    check_writable(str(tmp_path), "http://127.0.0.1:5000")
    assert list(tmp_path.iterdir()) == []
