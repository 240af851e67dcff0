"""Where and how many: the ``device`` setting, run locks, and suites split into shards that run at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import run_dirs
from malloc.bench.suite import load_suite, plan
from malloc.bench.sweep import SuiteRunner
from malloc.cli import main
from malloc.config import load_config
from malloc.configio import ConfigError
from malloc.device import check_device_name, resolve_device
from malloc.results import RunDir, read_json
from malloc.runner import run_dir_for

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / "configs" / "suites"


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:1", "auto"])
def test_device_names_that_are_accepted(name):
    check_device_name(name)
    assert load_config(None, [f"device={name}"]).device == name


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "mps0", ""])
def test_a_bad_device_name_is_a_config_error_naming_the_key(name):
    with pytest.raises(ConfigError, match="device"):
        load_config(None, [f"device={name}"])


def test_auto_is_the_cpu_without_a_gpu_and_a_missing_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="sees 0 CUDA device"):
        resolve_device("cuda")


def test_the_device_is_not_part_of_the_run_hash():
    assert run_dir_for(load_config(None, ["device=auto"])).root == run_dir_for(load_config(None, [])).root


def test_bench_refuses_a_missing_gpu_before_running_anything(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "--suite", "smoke", "--results", str(tmp_path), "--device", "cuda"]) == 2
    assert "sees 0 CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "smoke").exists()


def test_the_run_lock_excludes_another_process(tmp_path):
    run = RunDir(tmp_path / "r-0123abcd")
    probe = textwrap.dedent(f"""
        import fcntl, sys
        with open({str(run.lock_path)!r}, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                sys.exit(3)
    """)
    with run.lock():
        assert subprocess.run([sys.executable, "-c", probe]).returncode == 3  # held here: the other waits
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
    (run.root / "best.pt").write_bytes(b"x")
    run.clear()  # a forced rerun keeps the lock file, so waiting processes keep waiting on the same lock
    assert sorted(p.name for p in run.root.iterdir()) == ["run.lock"]


def test_shards_partition_the_plan():
    spec = load_suite("smoke", SUITES)
    every = [item.id for item in plan(spec, "unused")]
    shards = [[item.id for item in SuiteRunner(spec, "unused", shard=(i, 3)).shard_items] for i in range(3)]
    assert sorted(i for shard in shards for i in shard) == sorted(every) and all(shards)
    with pytest.raises(ValueError, match="shard must be I/N"):
        SuiteRunner(spec, "unused", shard=(3, 3))


def test_only_selects_items_by_glob_in_the_order_of_the_patterns():
    spec = load_suite("smoke", SUITES)
    every = [item.id for item in plan(spec, "unused")]
    quarter = [i for i in every if i.endswith("-r0.25")]
    ordered = [item.id for item in SuiteRunner(spec, "unused", only=["*-r0.25", "*"]).shard_items]
    assert ordered == quarter + [i for i in every if i not in quarter]  # each once, the 1/4 items first
    gqa = [item.id for item in SuiteRunner(spec, "unused", only=["*--gqa*"]).shard_items]
    assert gqa and all("--gqa" in i for i in gqa) and gqa == [i for i in every if "--gqa" in i]
    # with shards, a pattern is checked against the whole plan and selects within the shard
    shards = [[item.id for item in SuiteRunner(spec, "unused", shard=(k, 2), only=["*--native"]).shard_items]
              for k in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(i for i in every if i.endswith("--native"))


def test_an_only_pattern_that_matches_nothing_is_one_clear_error(tmp_path, capsys):
    assert main(["bench", "--suite", "smoke", "--results", str(tmp_path), "--only", "*rwvk*"]) == 2
    err = capsys.readouterr().err
    assert "--only '*rwvk*' matches no item of the suite" in err and "synthetic-hstu-ctr-s0--native" in err
    assert not (tmp_path / "smoke").exists()  # nothing ran


@pytest.mark.parametrize("shard", ["2/2", "1", "a/b", "1/-2"])
def test_a_bad_shard_is_one_clear_error(tmp_path, capsys, shard):
    assert main(["bench", "--suite", "smoke", "--results", str(tmp_path), "--shard", shard]) == 2
    assert "--shard expects I/N" in capsys.readouterr().err


def test_trained_ratios_give_the_trained_in_arms_their_own_ratios(tmp_path):
    (tmp_path / "x.yaml").write_text("name: x\nschemes: [recency, mqa, mla]\nratios: [1/2, 1/4]\n"
                                     "trained_ratios: [1/8]\n")
    items = plan(load_suite("x", tmp_path), "unused")
    assert {item.ratios for item in items if item.kind == "policy"} == {(0.5,), (0.25,)}
    assert {item.ratios for item in items if item.kind == "trained"} == {(0.125,)}
    (tmp_path / "y.yaml").write_text("name: y\ntrained_ratios: [3]\n")
    with pytest.raises(ConfigError, match="trained_ratios"):
        load_suite("y", tmp_path)


def test_two_shards_at_once_run_the_whole_suite_and_train_each_run_once(tmp_path):
    """Two processes, one results folder: every item done, and every training run trained by exactly one."""
    command = [sys.executable, "-m", "malloc", "bench", "--suite", "smoke", "--results", str(tmp_path), "--quiet"]
    shards = [subprocess.Popen([*command, "--shard", f"{i}/2"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [shard.communicate(timeout=600)[0] for shard in shards]
    assert all(shard.returncode == 0 for shard in shards), logs
    spec = load_suite("smoke", SUITES)
    for item in plan(spec, tmp_path):
        record = read_json(tmp_path / "smoke" / "items" / f"{item.id}.json")
        assert record["status"] == ("failed" if item.scheme == "int8" and item.ratios == (0.25,) else "done")
    runs = run_dirs(tmp_path / "smoke" / "runs")
    trained = "\n".join(logs).count("malloc.train INFO epoch 1 ")
    assert runs and trained == len(runs)  # each run's first epoch logged once, by one of the two shards
