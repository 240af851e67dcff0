"""The report (built from the smoke suite's results only), Pareto fronts, the paired test and the complexity table."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest

from malloc.bench.complexity import complexity_table, missing_entries
from malloc.bench.pareto import pareto_front
from malloc.bench.report import ratio_text
from malloc.cli import main
from malloc.eval.statistics import mean_std, seed_mean_delta, wilcoxon_signed_rank
from malloc.memory.registry import describe
from smoke_suite import smoke_run


def test_report_from_the_smoke_results_contains_every_scheme(tmp_path, capsys):
    run = smoke_run()
    out = tmp_path / "report"
    assert main(["report", str(run.folder), "--out", str(out), "--markdown", str(tmp_path / "RESULTS.md")]) == 0
    assert "index.html" in capsys.readouterr().out
    md = (out / "index.md").read_text()
    page = (out / "index.html").read_text()
    for scheme in ("native", "recency", "h2o", "int8", "gqa"):
        assert f"| {scheme} |" in md, scheme
        assert f"<td>{scheme}</td>" in page, scheme
    for heading in ("HSTU, ctr, synthetic", "HSTU, retrieval, synthetic", "Complexity of every registered scheme"):
        assert heading in md
    assert "malloc bench --suite smoke" in md and "Git commit" in md and "torch" in md  # how it was made
    assert "int8 1/4 (seed 0): failed: SchemeError" in md  # unreachable points are listed with their reason
    # four plots (two tasks x memory, MACs), as files and embedded in the one-file HTML; no external resource
    plots = sorted(p.name for p in out.glob("*.png"))
    assert len(plots) == 4 and all(f"]({name})" in md for name in plots)
    assert page.count("src='data:image/png;base64,") == 4
    assert not re.search(r"(src|href)=['\"](?!data:)", page)
    assert md.count("**Pareto front** against") == 4
    # the Markdown copy links the plots relative to itself
    assert "](report/pareto-smoke-synthetic-hstu-ctr-memory.png)" in (tmp_path / "RESULTS.md").read_text()


def test_report_names_the_commit_of_every_item_when_a_suite_spans_commits(tmp_path, capsys):
    run = smoke_run()
    folder = tmp_path / "smoke"
    shutil.copytree(run.folder, folder)
    manifest = json.loads((folder / "suite.json").read_text())
    records = sorted((folder / "items").glob("*.json"))
    assert all(json.loads(p.read_text())["git"] == manifest["git"] for p in records)  # each record names its commit
    out = tmp_path / "report"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    assert "Items by the commit" not in (out / "index.md").read_text()  # one commit: the manifest's line says it
    # a suite resumed at another commit: two items ran earlier, one before records named their commit
    earlier = {"commit": "0123456789abcdef", "dirty": True}
    for path, git in zip(records[:3], [earlier, earlier, None], strict=True):
        record = json.loads(path.read_text())
        record.pop("git") if git is None else record.update(git=git)
        path.write_text(json.dumps(record))
    assert main(["report", str(folder), "--out", str(out)]) == 0
    capsys.readouterr()
    line = next(x for x in (out / "index.md").read_text().splitlines() if "Items by the commit" in x)
    here = manifest["git"]["commit"][:12] if manifest["git"]["commit"] else None
    assert "`0123456789ab` (with uncommitted changes) 2" in line and "not recorded 1" in line
    assert here is None or f"`{here}`" in line
    records.pop(3).unlink()  # an item not run yet has no commit to count
    assert main(["report", str(folder), "--out", str(out)]) == 0
    line = next(x for x in (out / "index.md").read_text().splitlines() if "Items by the commit" in x)
    assert "not recorded 1" in line
    # records written before they named a commit: nothing to count, no line
    for path in records:
        record = json.loads(path.read_text())
        record.pop("git", None)
        path.write_text(json.dumps(record))
    assert main(["report", str(folder), "--out", str(out)]) == 0
    assert "Items by the commit" not in (out / "index.md").read_text()


def test_report_of_a_folder_that_is_not_a_suite_is_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no suite.json" in capsys.readouterr().err


def test_pareto_front_of_hand_made_points():
    points = [(1.0, 0.70), (0.5, 0.69), (0.5, 0.65), (0.25, 0.69), (0.25, 0.60), (0.125, 0.50),
              (0.3, float("nan")), (0.06, None), (0.125, 0.50)]
    # (0.5, 0.69) is dominated by (0.25, 0.69); equal points (0.125, 0.50) are both kept; missing values never count
    assert pareto_front(points) == [5, 8, 3, 0]
    # a loss: lower is better
    assert pareto_front([(1.0, 0.5), (0.5, 0.6), (0.25, 0.4)], higher_is_better=False) == [2]
    assert pareto_front([]) == []


def test_wilcoxon_by_hand_and_against_scipy():
    # differences 1, -2, 3, 0 (dropped): ranks of |d| 1, 2, 3; W+ = 1 + 3 = 4; mean 3, variance 3.5
    result = wilcoxon_signed_rank(np.array([1.0, -2.0, 3.0, 0.0, np.nan]))
    assert result["n"] == 3 and result["w_plus"] == 4.0
    assert result["z"] == pytest.approx(1 / math.sqrt(3.5))
    assert math.isnan(wilcoxon_signed_rank(np.zeros(5))["p_value"])
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for delta in (rng.normal(0.05, 0.2, 300), np.round(rng.normal(0, 1, 80)), rng.normal(0, 1, 30)):
        ours = wilcoxon_signed_rank(delta)
        theirs = stats.wilcoxon(delta, zero_method="wilcox", correction=False, method="approx")
        assert ours["p_value"] == pytest.approx(theirs.pvalue, rel=1e-9)


def test_seed_statistics():
    assert mean_std([0.5, 0.7, None]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert mean_std([0.5]) == (0.5, 0.0)
    deltas = seed_mean_delta([([1, 2, 3], [0.1, None, 0.3]), ([2, 3, 4], [0.2, 0.5, float("nan")])])
    np.testing.assert_allclose(deltas, [0.1, 0.2, 0.4, np.nan])


def test_every_registered_scheme_has_complexity_formulas():
    assert missing_entries() == [], "state the scheme's formulas on its class: complexity = Complexity(...)"
    names = {row.name for row in describe()}
    assert set(complexity_table()) >= names
    for formulas in complexity_table().values():
        assert formulas.state and formulas.request and formulas.knob


def test_ratio_text():
    assert [ratio_text(r) for r in (1.0, 0.5, 0.0625, 0.3, 1 / 64)] == ["1", "1/2", "1/16", "0.3", "1/64"]


def test_markdown_regeneration_keeps_the_hand_written_text_around_the_markers(tmp_path):
    from malloc.bench.report import BEGIN, END, splice

    page = tmp_path / "RESULTS.md"
    assert splice(page, "# new\n") == "# new\n"  # no file: the report alone
    page.write_text("# mine\nintro\n")
    assert splice(page, "# new\n") == "# new\n"  # no markers: the report alone
    page.write_text(f"# mine\nintro\n{BEGIN}\nold table\n{END}\n## by hand\nkept\n")
    assert splice(page, "# new\ntable\n") == f"# mine\nintro\n{BEGIN}\n# new\ntable\n{END}\n## by hand\nkept\n"
