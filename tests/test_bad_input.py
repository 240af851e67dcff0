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

from conftest import run_dirs
from malloc.cli import main
from malloc.config import load_config
from malloc.data.sequences import build_sequences, first_occurrences
from malloc.data.sources import load_dataset
from malloc.errors import CheckpointError
from malloc.results import load_checkpoint, read_json
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
    (run_dir,) = run_dirs(tmp_path / "results")
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
    (run_dir,) = run_dirs(tmp_path / "results")
    best = run_dir / "best.pt"
    best.write_bytes(best.read_bytes()[:200] if content == "truncated" else content)
    assert main(_cli(tmp_path, "eval")) == 2
    _one_line_error(capsys, str(best), "delete it, or rerun with --force")


def test_a_checkpoint_of_another_model_is_one_line(tmp_path, capsys):
    assert main(_cli(tmp_path, "train")) == 0
    (run_dir,) = run_dirs(tmp_path / "results")
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
    runs = sorted(p.name for p in run_dirs(tmp_path / "results"))
    assert len(runs) == 2 and first.name in runs
    stored = [read_json(tmp_path / "results" / r / "identity.json")["data_digest"] for r in runs]
    assert stored[0] != stored[1]
    capsys.readouterr()
    assert main(_cli(tmp_path, "eval") + TINY_ML1M + ["--set", f"data.path={data}"]) == 0  # the new run's checkpoint


def test_an_edited_run_folder_is_an_error_not_a_reuse(tmp_path, capsys):
    assert main(_cli(tmp_path, "train")) == 0
    (run_dir,) = run_dirs(tmp_path / "results")
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
            "--set", "data.synthetic.num_users=600", "--set", "train.epochs=20", "--set", "train.patience=20"]
    # 20 epochs (under a second each on an idle machine): still training when the interrupt comes after epoch 1
    # SIGINT at its default even where this test runs with it ignored (a background job of a non-interactive shell)
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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


# -- a hostile probe's findings: one line and exit 2 for each --------------------------------------------------------
@pytest.mark.parametrize(("args", "words"), [
    (["train", "--set", "model.dim=1000000000"], ["model", "dim"]),
    (["train", "--set", "model.heads=1024", "--set", "model.head_dim=4096"], ["heads x head_dim"]),
    (["train", "--set", "train.seed=-1"], ["seed"]),
    (["train", "--set", "train.seed=99999999999999999999"], ["seed"]),
    (["train", "--set", "train.lr=1e300"], ["lr"]),
    (["train", "--set", "task=retrieval", "--set", "model.max_len=1"], ["max_len >= 2"]),
    (["train", "--set", "eval.monitor=foo"], ["eval.monitor", "foo"]),
    (["train", "--set", "task=retrieval", "--set", "eval.monitor=hr@7"], ["hr@7"]),
    (["train", "--set", "data.synthetic.mean_gap_seconds=1e300"], ["mean_gap_seconds"]),
    (["train", "--set", "data.synthetic.num_users=100000000000"], ["not enough memory"]),
    (["train", "--scheme", "mla", "--knob", "latent_dim=100000000"], ["latent_dim"]),
    (["train", "--scheme", "reformer", "--knob", "n_hashes=100000"], ["n_hashes"]),
    (["train", "--set", "task=retrieval", "--set", "train.negatives=1000000"], ["negatives", "catalogue"]),
    (["eval", "--scheme", "h2o", "--memory-ratio", "0.5", "--knob", "recent_fraction=nan"], ["recent_fraction"]),
    (["eval", "--scheme", "pyramid", "--memory-ratio", "0.25", "--knob", "inner=h2o", "--knob", "beta=nan"],
     ["beta"]),
    (["eval", "--scheme", "tova", "--memory-ratio", "0.5", "--knob", "foo=1"], ["takes no knobs"]),
    (["sensitivity", "synthetic", "--bootstrap", "100000000"], ["bootstrap"]),
    (["sensitivity", "synthetic", "--seed", "-1"], ["seed"]),
    (["sensitivity", "synthetic", "--set", "task=retrieval"], ["--task"]),
    (["sensitivity", "synthetic:"], ["preset"]),
])
def test_probe_findings_are_one_line(tmp_path, capsys, args, words):
    base = ["--config", SMOKE, "--set", f"results_dir={tmp_path}"]
    tic = time.perf_counter()
    assert main([*args, *base]) == 2
    assert time.perf_counter() - tic < 60
    _one_line_error(capsys, *words)
    assert not list(tmp_path.glob("*/done.json"))


@pytest.mark.parametrize(("text", "words"), [
    ("name: a\nname: b\n", ["line 2", "duplicate key 'name'"]),
    ("model: {dim: 16, dim: 32}\n", ["duplicate key 'dim'"]),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", ["nested too deeply"]),
])
def test_config_files_with_repeated_keys_or_deep_nesting_are_one_line(tmp_path, capsys, text, words):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(["train", "--config", str(config), "--set", f"results_dir={tmp_path}"]) == 2
    _one_line_error(capsys, str(config), *words)


def test_a_config_that_is_not_a_regular_file_is_one_line(tmp_path, capsys):
    assert main(["train", "--config", "/dev/zero"]) == 2
    _one_line_error(capsys, "/dev/zero", "not a regular file")


def test_run_folder_and_lock_of_the_wrong_kind_are_one_line(tmp_path, capsys):
    assert main(_cli(tmp_path, "train")) == 0
    (run_dir,) = run_dirs(tmp_path / "results")
    (run_dir / "run.lock").unlink()
    (run_dir / "run.lock").mkdir()
    assert main([*_cli(tmp_path, "train"), "--force"]) == 2
    _one_line_error(capsys, "run.lock", "not a lock file")
    shutil.rmtree(run_dir)
    run_dir.write_text("x")
    for extra in ([], ["--force"]):
        assert main([*_cli(tmp_path, "train"), *extra]) == 2
        _one_line_error(capsys, str(run_dir), "not a run folder")


def test_the_monitor_minimises_logloss(tmp_path):
    cfg = load_config(SMOKE, [f"results_dir={tmp_path}", "eval.monitor=logloss", "train.epochs=4",
                              "train.patience=4"])
    result = run(cfg, show_progress=False)
    history = read_json(run_dir_for(cfg).metrics_path)["valid_history"]
    losses = [h["valid_logloss"] for h in history]
    assert result["meters"]["best_epoch"] == 1 + int(np.argmin(losses))


def test_retrieval_on_a_catalogue_smaller_than_the_cut_off(tmp_path, capsys):
    lines = [f"{u}::{1 + (u + k) % 6}::{1 + k % 5}::{1000 + 60 * k}" for u in range(1, 9) for k in range(10)]
    data = _ml1m(tmp_path / "ml1m", lines)
    args = [*_cli(tmp_path, "train"), *TINY_ML1M, "--set", f"data.path={data}", "--set", "task=retrieval"]
    assert main(args) == 0  # six items: every metric at K >= 6 is the whole ranking


def test_longctr_sequences_that_are_not_lists_are_one_line(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = _longctr(tmp_path / "longctr", train_rows=18)
    pq.write_table(pa.table({"user_index": [0, 1], "full_item_seq": [1, 2]}), folder / "user_info.parquet")
    assert main(["data", "stats", "microvideo", "--path", str(folder)]) == 2
    _one_line_error(capsys, "user_info.parquet", "full_item_seq must be a list")


def _suite(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text((ROOT / "configs" / "suites" / "smoke.yaml").read_text().replace("name: smoke", "name: probe")
                    + extra)
    return path


@pytest.mark.parametrize(("edit", "words"), [
    ("ratios: [0.5, '1/2']\n", ["repeats the ratio 0.5"]),
    ("variants: {v: {scheme: nosuch}}\n", ["variants.v", "nosuch"]),
    ("variants: {v: {scheme: h2o, knobs: {recent_fraction: 5}}}\n", ["variants.v", "recent_fraction"]),
    ("variants: {v: {scheme: pyramid, knobs: {inner: nosuch}}}\n", ["variants.v", "nosuch"]),
    ("seeds: [-1]\n", ["seed"]),
    ("latency: {candidates: 1000000000000}\n", ["candidates"]),
    ("datasets: {m: {config: {data: {source: ml-1m, path: /nonexistent/ratings.dat}}}}\n", ["datasets.m",
                                                                                             "/nonexistent"]),
    ("datasets: {m: {config: {data: {source: nosuch}}}}\n", ["nosuch"]),
    ("datasets: {m: {config: {data: {source: ml-1m}}, needs_path: true}}\n", ["plans no items", "--data m=PATH"]),
])
def test_suite_errors_known_before_any_work_are_one_line(tmp_path, capsys, edit, words):
    suite = _suite(tmp_path, "")
    key = edit.split(":", 1)[0]
    kept, skipping = [], False
    for line in suite.read_text().splitlines():  # drop the smoke suite's own entry for the key (and its block)
        skipping = line.startswith(f"{key}:") or (skipping and line.startswith(" "))
        if not skipping:
            kept.append(line)
    suite.write_text("\n".join(kept) + "\n" + edit)
    assert main(["bench", "--suite", str(suite), "--results", str(tmp_path / "res"), "--quiet"]) == 2
    _one_line_error(capsys, *words)


def test_report_markdown_into_a_folder_is_one_line(tmp_path, capsys):
    folder, _ = _report_folder(tmp_path)
    (tmp_path / "md").mkdir()
    assert main(["report", str(folder), "--out", str(tmp_path / "r"), "--markdown", str(tmp_path / "md")]) == 2
    _one_line_error(capsys, "md", "takes a file")


@pytest.mark.parametrize(("field", "value", "words"), [
    ("memory_ratio_targets", "x", "memory_ratio_targets"),
    ("label", 5, "label is 5"),
    ("family", "nonsense", "family is 'nonsense'"),
    ("per_user", {"users": "x", "delta": [1]}, "per_user"),
])
def test_report_lists_malformed_records_as_unreadable(tmp_path, capsys, field, value, words):
    folder, records = _report_folder(tmp_path)
    target = next(p for p in records if json.loads(p.read_text())["kind"] == "policy"
                  and json.loads(p.read_text())["status"] == "done")
    record = json.loads(target.read_text())
    record[field] = value
    target.write_text(json.dumps(record))
    assert main(["report", str(folder), "--out", str(tmp_path / "r")]) == 0
    assert words in (tmp_path / "r" / "index.md").read_text()


def test_report_of_a_manifest_item_without_an_id_is_one_line(tmp_path, capsys):
    folder, _ = _report_folder(tmp_path)
    manifest = json.loads((folder / "suite.json").read_text())
    manifest["items"][0] = {"foo": 1}
    (folder / "suite.json").write_text(json.dumps(manifest))
    assert main(["report", str(folder), "--out", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, "items[0]")


def test_cached_results_with_impossible_values_are_recomputed(tmp_path, capsys):
    assert main(_cli(tmp_path, "train")) == 0
    (run_dir,) = run_dirs(tmp_path / "results")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "auc": "high"}))
    assert main(_cli(tmp_path, "train")) == 0
    assert isinstance(json.loads((run_dir / "metrics.json").read_text())["auc"], float)
    scheme = ["eval", "--config", SMOKE, "--set", f"results_dir={tmp_path / 'results'}", "--scheme", "recency",
              "--memory-ratio", "0.5"]
    assert main(scheme) == 0
    (path,) = (run_dir / "schemes").glob("recency-*.json")
    stored = json.loads(path.read_text())
    stored["metrics"]["gauc"], stored["meters"]["memory_ratio"] = 42.0, -3
    path.write_text(json.dumps(stored))
    capsys.readouterr()
    assert main(scheme) == 0
    out = capsys.readouterr().out
    assert "exists; skipping" not in out and "42.0000" not in out
