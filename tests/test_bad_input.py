"""Bad input and hostile files: refused with one line and exit status 2, never a silent result or a traceback.

Covers the checkpoint loader (a pickle that would run code is refused), the results store (corrupt markers and
metrics are recomputed, an edited run folder is an error), the run identity (it follows the data's content), the
config (non-finite numbers, YAML alias bombs), data files (unreadable, not UTF-8, empty splits, one label class,
duplicates), the report (impossible or truncated records) and interruption (Ctrl-C: exit 130, the rerun resumes).
Permission cases run the command line as an unprivileged user where the tests run as root (root reads anything).
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from malloc.bench.results import load_checkpoint, read_json
from malloc.cli import main
from malloc.config import load_config
from malloc.data.sequences import build_sequences, first_occurrences
from malloc.data.sources import load_dataset
from malloc.errors import CheckpointError
from malloc.runner import run, run_dir_for
from smoke_suite import smoke_run

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
# A tiny MovieLens-1M layout: 4 users x 12 ratings, both labels in every split and most users' windows.
ML1M_LINES = [f"{u}::{10 + (u * 7 + k) % 15}::{1 + (u + k) % 5}::{1000 + 60 * k}" for u in range(1, 5)
              for k in range(12)]
TINY_ML1M = ["--set", "data.source=ml-1m", "--set", "model.max_len=8", "--set", "train.epochs=1",
             "--set", "eval.user_batch=4"]


def _cli(tmp_path: Path, command: str) -> list[str]:
    return [command, "--config", SMOKE, "--set", f"results_dir={tmp_path / 'results'}",
            *(["--quiet"] if command == "train" else [])]


def _one_line_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("malloc ") and ": error: " in err and "\n" not in err, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    return err


def _ml1m(folder: Path, lines: list[str] = ML1M_LINES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
    return folder


class _RunsCode:
    """An object whose unpickling calls ``open(marker, "w")``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# -- 1. checkpoints refuse code ---------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    with evil.open("wb") as handle:  # a plain pickle, not a torch zip file
        pickle.dump(_RunsCode(marker), handle)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_hostile_checkpoints_in_a_run_folder_are_refused_from_the_cli(tmp_path, capsys, name):
    assert main(_cli(tmp_path, "train")) == 0
    (run_dir,) = (tmp_path / "results").iterdir()
    marker = tmp_path / "marker"
    torch.save({"model": _RunsCode(marker), "progress": {"epoch": 0}}, run_dir / name)
    if name == "last.pt":  # an unfinished run: train resumes from last.pt
        (run_dir / "done.json").unlink()
        code = main(_cli(tmp_path, "train"))
    else:  # eval reads best.pt
        code = main(_cli(tmp_path, "eval"))
    assert code == 2
    _one_line_error(capsys, str(run_dir / name), "refused")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "truncated"])
def test_empty_or_truncated_checkpoints_are_one_line(tmp_path, capsys, content):
    assert main(_cli(tmp_path, "train")) == 0
    (run_dir,) = (tmp_path / "results").iterdir()
    best = run_dir / "best.pt"
    best.write_bytes(best.read_bytes()[:200] if content == "truncated" else content)
    assert main(_cli(tmp_path, "eval")) == 2
    _one_line_error(capsys, str(best), "delete it, or rerun with --force")


def test_a_checkpoint_of_another_model_is_one_line(tmp_path, capsys):
    assert main(_cli(tmp_path, "train")) == 0
    (run_dir,) = (tmp_path / "results").iterdir()
    torch.save({"something": torch.zeros(3)}, run_dir / "best.pt")
    assert main(_cli(tmp_path, "eval")) == 2
    _one_line_error(capsys, "best.pt", "do not fit")


# -- 2. no silent results ------------------------------------------------------------------------------------------
def _longctr(folder: Path, train_rows: int) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder.mkdir()
    seqs = [[1 + (u + k) % 9 for k in range(10)] for u in range(6)]
    pq.write_table(pa.table({"user_index": list(range(6)), "full_item_seq": seqs}), folder / "user_info.parquet")
    rows = {"user_index": [u for u in range(6) for _ in range(3)], "item_index": [1 + k % 9 for k in range(18)],
            "seq_len": [4 + k % 6 for k in range(18)], "is_click": [k % 2 for k in range(18)]}
    for split in ("train", "valid", "test"):
        count = train_rows if split == "train" else 18
        pq.write_table(pa.table({k: pa.array(v[:count], type=pa.int64()) for k, v in rows.items()}),
                       folder / f"{split}.parquet")
    return folder


def test_an_empty_training_split_is_an_error_naming_split_and_file(tmp_path, capsys):
    folder = _longctr(tmp_path / "longctr", train_rows=0)
    args = [*_cli(tmp_path, "train"), "--set", "data.source=microvideo", "--set", f"data.path={folder}"]
    assert main(args) == 2
    _one_line_error(capsys, "train split has no rows", "train.parquet")
    assert not list((tmp_path / "results").glob("*/done.json"))


def test_the_run_identity_follows_the_data_content(tmp_path, capsys):
    data = _ml1m(tmp_path / "ml1m")
    args = _cli(tmp_path, "train") + TINY_ML1M + ["--set", f"data.path={data}"]
    assert main(args) == 0
    overrides = [value for flag, value in itertools.pairwise(args) if flag == "--set"]
    first = run_dir_for(load_config(SMOKE, overrides)).root
    edited = [line.replace("::5::", "::1::") for line in ML1M_LINES]  # same path, other labels
    (data / "ratings.dat").write_text("\n".join(edited) + "\n")
    assert main(args) == 0  # trained anew in a folder of its own: not the old run's metrics
    runs = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert len(runs) == 2 and first.name in runs
    stored = [read_json(tmp_path / "results" / r / "identity.json")["data_digest"] for r in runs]
    assert stored[0] != stored[1]
    capsys.readouterr()
    assert main(_cli(tmp_path, "eval") + TINY_ML1M + ["--set", f"data.path={data}"]) == 0  # the new run's checkpoint


def test_an_edited_run_folder_is_an_error_not_a_reuse(tmp_path, capsys):
    assert main(_cli(tmp_path, "train")) == 0
    (run_dir,) = (tmp_path / "results").iterdir()
    config = run_dir / "config.yaml"
    original = config.read_text()
    config.write_text(original.replace("lr: 0.001", "lr: 0.5"))
    assert main(_cli(tmp_path, "train")) == 2
    _one_line_error(capsys, str(config), "another run")
    assert main(_cli(tmp_path, "eval")) == 2
    _one_line_error(capsys, str(config))
    config.write_text(original)
    identity = json.loads((run_dir / "identity.json").read_text())
    identity["model"]["dim"] = 999
    (run_dir / "identity.json").write_text(json.dumps(identity))
    assert main(_cli(tmp_path, "train")) == 2
    _one_line_error(capsys, str(run_dir), "model.dim")


@pytest.mark.parametrize("override", ["train.lr=nan", "train.lr=inf", "train.lr=-inf", "train.weight_decay=-1",
                                      "train.weight_decay=nan", "data.label_threshold=nan", "model.dropout=nan",
                                      "model.memory_ratio=nan", "data.test_fraction=nan"])
def test_non_finite_and_impossible_numbers_are_rejected(tmp_path, capsys, override):
    assert main([*_cli(tmp_path, "train"), "--set", override]) == 2
    _one_line_error(capsys, override.split("=")[0].split(".")[-1])
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(("rating", "missing"), [(5, "negative"), (1, "positive")])
def test_one_label_class_is_an_error_and_nothing_is_done(tmp_path, capsys, rating, missing):
    lines = [f"{line.rsplit('::', 2)[0]}::{rating}::{line.rsplit('::', 1)[1]}" for line in ML1M_LINES]
    data = _ml1m(tmp_path / "ml1m", lines)
    assert main(_cli(tmp_path, "train") + TINY_ML1M + ["--set", f"data.path={data}"]) == 2
    _one_line_error(capsys, "valid split", f"no {missing} labels")
    assert not list((tmp_path / "results").glob("*/done.json"))


def test_no_user_with_both_labels_is_an_error(tmp_path, capsys):
    # users 1 and 3 rate everything 5, users 2 and 4 everything 1: each split has both labels, no user has both
    lines = [f"{u}::{10 + k}::{5 if u % 2 else 1}::{1000 + 60 * k}" for u in range(1, 5) for k in range(12)]
    data = _ml1m(tmp_path / "ml1m", lines)
    assert main(_cli(tmp_path, "train") + TINY_ML1M + ["--set", f"data.path={data}"]) == 2
    _one_line_error(capsys, "no user of the valid split has both labels", "GAUC")


@pytest.mark.parametrize("corrupt", ["done.json", "metrics.json", "meters.json"])
def test_corrupt_markers_and_metrics_are_recomputed(tmp_path, capsys, caplog, corrupt):
    cfg = load_config(SMOKE, [f"results_dir={tmp_path}"])
    first = run(cfg, show_progress=False)
    run_dir = run_dir_for(cfg)
    (run_dir.root / corrupt).write_text('{"truncated": ')
    again = run(cfg, show_progress=False)  # not taken as done, not an error: recomputed from the checkpoint
    assert again["metrics"] == first["metrics"]
    assert run_dir.is_done() and isinstance(read_json(run_dir.root / corrupt), dict)
    assert any(corrupt in record.getMessage() for record in caplog.records)


def test_exact_duplicate_events_are_dropped_and_counted(tmp_path, caplog):
    user = np.array([1, 1, 1, 2, 1, 1])
    item = np.array([5, 5, 6, 5, 5, 5])
    stamp = np.array([10, 10, 10, 10, 10, 11])
    label = np.array([1, 1, 1, 1, 0, 1], dtype=np.int8)
    assert first_occurrences(user, item, stamp, label).tolist() == [True, False, True, True, True, True]
    with caplog.at_level("INFO", logger="malloc.data"):
        seqs = build_sequences("tiny", user, item, stamp, label)
    assert seqs.num_events == 5 and "dropped 1 exact duplicate" in caplog.text
    data = _ml1m(tmp_path / "ml1m", ML1M_LINES + ML1M_LINES[:3])  # three lines repeated
    assert load_dataset("ml-1m", str(data)).sequences.num_events == len(ML1M_LINES)


def _report_folder(tmp_path: Path) -> tuple[Path, list[Path]]:
    folder = tmp_path / "smoke"
    shutil.copytree(smoke_run().folder, folder)
    return folder, sorted((folder / "items").glob("*.json"))


def test_report_lists_impossible_and_truncated_records_and_reports_the_rest(tmp_path, capsys):
    folder, records = _report_folder(tmp_path)
    done = [p for p in records if json.loads(p.read_text())["status"] == "done"]
    impossible, truncated = done[1], done[2]
    record = json.loads(impossible.read_text())
    record["meters"]["memory_ratio"] = -3
    impossible.write_text(json.dumps(record))
    truncated.write_text(truncated.read_text()[:100])
    out = tmp_path / "report"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    md = (out / "index.md").read_text()
    assert "meters.memory_ratio is -3" in md and "not a readable JSON file" in md
    assert "| -3" not in md and "| native |" in md  # the rest is reported


def test_report_of_a_corrupt_manifest_is_one_line(tmp_path, capsys):
    folder, _ = _report_folder(tmp_path)
    (folder / "suite.json").write_text("[1, 2")
    assert main(["report", str(folder), "--out", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, "suite.json")
    (folder / "suite.json").write_text("{}")
    assert main(["report", str(folder), "--out", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, "not a suite manifest")


# -- 3. one line, not a traceback ---------------------------------------------------------------------------------
def test_non_utf8_csv_names_the_file_and_line(tmp_path, capsys):
    folder = tmp_path / "amazon"
    folder.mkdir()
    header = "label,user_id,item_id,cate_id,item_history,cate_history\n"
    (folder / "train.csv").write_bytes(header.encode() + b"1,u1,i\xff1,c1,i2^i3,c1^c1\n")
    (folder / "test.csv").write_text(header + "1,u1,i4,c1,i2^i3,c1^c1\n")
    assert main(["data", "stats", "amazon-electronics", "--path", str(folder)]) == 2
    _one_line_error(capsys, str(folder / "train.csv"), "line 2", "UTF-8")


def test_a_non_utf8_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_bytes(b"name: \xff\xfe\n")
    assert main(["train", "--config", str(config)]) == 2
    _one_line_error(capsys, str(config), "UTF-8")


def _alias_bomb(levels: int = 9) -> str:
    """A flow-style YAML mapping of a few hundred bytes that expands to ``10 ** levels`` strings."""
    parts = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    parts += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "{" + ", ".join(parts) + "}"


@pytest.mark.parametrize("where", ["file", "--set", "--knob"])
def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys, where):
    config = tmp_path / "bomb.yaml"
    config.write_text(f"model:\n  knobs: {_alias_bomb()}\n")
    args = {"file": ["train", "--config", str(config)],
            "--set": ["train", "--set", f"model.knobs={_alias_bomb()}"],
            "--knob": ["eval", "--scheme", "recency", "--knob", f"window={_alias_bomb()}"]}[where]
    tic = time.perf_counter()
    assert main([*args, "--set", f"results_dir={tmp_path}"]) == 2
    assert time.perf_counter() - tic < 10
    _one_line_error(capsys, "expands to more than", *([str(config)] if where == "file" else []))


# Subprocesses: permissions (as an unprivileged user where the tests run as root) and interruption.
@pytest.fixture()
def shared_tmp() -> Iterator[Path]:
    """A temporary folder every user may enter (pytest's own is private to its owner)."""
    folder = Path(tempfile.mkdtemp(prefix="malloc-perm-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _unprivileged(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m malloc ARGS`` as a user without the rights root has (``nobody`` via setpriv when root)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is missing: cannot drop root's right to read anything")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {**os.environ, "HOME": str(cwd), "MPLCONFIGDIR": str(cwd)}
    probe = subprocess.run([*prefix, sys.executable, "-c", "import malloc.cli"], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"the unprivileged user cannot run this Python: {probe.stderr.strip()[-200:]}")
    return subprocess.run([*prefix, sys.executable, "-m", "malloc", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _assert_one_line(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_unreadable_data_file_and_folder_are_one_line(shared_tmp):
    data = _ml1m(shared_tmp / "ml1m")
    (data / "ratings.dat").chmod(0o000)
    _assert_one_line(_unprivileged(["data", "stats", "ml-1m", "--path", str(data)], shared_tmp),
                     str(data / "ratings.dat"), "ermission")
    (data / "ratings.dat").chmod(0o644)
    data.chmod(0o000)
    _assert_one_line(_unprivileged(["data", "stats", "ml-1m", "--path", str(data)], shared_tmp), str(data))
    data.chmod(0o755)


def test_read_only_results_folder_fails_before_any_compute(shared_tmp):
    results = shared_tmp / "results"
    results.mkdir(mode=0o755)  # owned by this user: read-only to the unprivileged one
    if os.geteuid() != 0:
        results.chmod(0o555)
    done = _unprivileged(["train", "--config", SMOKE, "--set", f"results_dir={results}", "--quiet"], shared_tmp)
    _assert_one_line(done, str(results), "cannot write")
    assert "epoch" not in done.stderr  # refused before training
    results.chmod(0o755)


def test_read_only_run_folder_fails_eval_before_the_replay(shared_tmp):
    results = shared_tmp / "results"
    cfg = load_config(SMOKE, [f"results_dir={results}"])
    run(cfg, show_progress=False)
    root = run_dir_for(cfg).root
    for path in [results, root, *root.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    if os.geteuid() != 0:
        root.chmod(0o555)
    done = _unprivileged(["eval", "--config", SMOKE, "--set", f"results_dir={results}"], shared_tmp)
    _assert_one_line(done, str(root), "cannot write")
    assert not (root / "eval-test.json").exists()
    root.chmod(0o755)


def test_ctrl_c_is_one_line_exit_130_and_the_rerun_resumes(tmp_path):
    args = [sys.executable, "-m", "malloc", "train", "--config", SMOKE, "--quiet", "--set", f"results_dir={tmp_path}",
            "--set", "data.synthetic.num_users=600", "--set", "train.epochs=3", "--set", "train.patience=5"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("*/last.pt")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "training ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1].endswith("interrupted; rerun the same command to resume")
    assert "Traceback" not in err
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
