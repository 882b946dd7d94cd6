"""report.py: every format written, numbers round-trip through CSV/JSON, figures are real PNGs,
and the HTML page is self-contained."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from affeq_rt.io.maps import AffineMap, MapSet
from affeq_rt.io.store import ArrayStore
from affeq_rt.method.curve import Curve
from affeq_rt.method.evaluate import evaluate
from affeq_rt.method.results import EvalTable
from affeq_rt.method.similarity import similarity
from affeq_rt.report import markdown_table, text_table, write_report
from affeq_rt.report.html import html_table
from affeq_rt.report.scale import cell_scale, rgb
from affeq_rt.report.tables import csv_text, loss_gain_markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _store(labelled: bool = True) -> tuple[ArrayStore, MapSet]:
    """Three networks whose features share a class signal; maps by least squares."""
    rng = np.random.default_rng(7)
    n, k, dims = 400, 6, {"lenet": 10, "resnet": 14, "incept": 12}
    labels = rng.integers(0, k, n)
    latent = rng.standard_normal((k, 5))[labels] + 0.8 * rng.standard_normal((n, 5))
    feats, heads = {}, {}
    for m, d in dims.items():
        f = latent @ rng.standard_normal((5, d)) + 0.2 * rng.standard_normal((n, d))
        feats[m] = f.astype(np.float32)
        w = np.linalg.lstsq(f, np.eye(k)[labels], rcond=None)[0].T
        heads[m] = (w.astype(np.float32), np.zeros(k, np.float32))
    maps = []
    for a in dims:
        for b in dims:
            if a != b:
                z = np.hstack([feats[a], np.ones((n, 1), np.float32)])
                sol = np.linalg.lstsq(z, feats[b], rcond=None)[0]
                maps.append(AffineMap(a, b, sol[:-1].T, sol[-1], "lstsq"))
    return ArrayStore(feats, heads, labels if labelled else None), MapSet(maps)


@pytest.fixture(scope="module")
def labelled_report(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    store, maps = _store()
    out = tmp_path_factory.mktemp("rep")
    table = evaluate(store, maps, device="cpu", overlap_pairs=[("lenet", "resnet")])
    paths = write_report(table, out, notes=["a note"])
    return table, paths


def test_all_files_written(labelled_report: tuple) -> None:
    _, paths = labelled_report
    for kind in ("markdown", "csv", "json", "html", "heatmap", "overlap", "pred", "correct"):
        assert paths[kind].is_file(), kind
        assert paths[kind].stat().st_size > 0, kind
    assert not list(paths["html"].parent.glob(".*.tmp"))  # atomic writes leave no temp files
    for kind in ("heatmap", "overlap"):
        assert paths[kind].read_bytes()[:8] == PNG_MAGIC


def test_csv_and_json_hold_every_number(labelled_report: tuple) -> None:
    table, paths = labelled_report
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(rows) == len(table.models) ** 2
    doc = json.loads(paths["json"].read_text())
    for r in rows:
        i, j = table.index(r["source"]), table.index(r["target"])
        assert float(r["top1"]) == pytest.approx(table.top1[i, j], abs=1e-6)
        assert float(r["top5"]) == pytest.approx(table.top5[i, j], abs=1e-6)
        assert float(r["change_top1"]) == pytest.approx(table.change_top1[i, j], abs=1e-6)
        # the row is the hybrid source→target and carries that hybrid's loss
        assert float(r["hybrid_loss_top1"]) == pytest.approx(table.top1[j, j] - table.top1[i, j],
                                                             abs=1e-6)
        assert float(r["agree"]) == pytest.approx(table.agree[i, j], abs=1e-6)
        assert doc["top1"][i][j] == pytest.approx(table.top1[i, j], abs=1e-5)
    assert doc["overlaps"][0]["hybrid"] == "lenet->resnet"
    assert sum(doc["overlaps"][0]["regions"].values()) == table.n
    np.testing.assert_array_equal(np.load(paths["pred"]), table.pred)
    np.testing.assert_array_equal(np.load(paths["correct"]), table.correct)


def test_markdown_layout(labelled_report: tuple) -> None:
    table, _ = labelled_report
    md = markdown_table(table).splitlines()
    body = [ln for ln in md if ln.startswith("| **")]
    assert len(body) == len(table.models)
    # every off-diagonal cell carries the % change under the accuracy; diagonal cells do not
    for i, line in enumerate(body):
        cells = line.strip("|").split("|")[1:]
        for j, c in enumerate(cells):
            assert ("<sub>" in c) == (i != j)
            assert f"{table.top1[i, j]:.2f}%" in c
    txt = text_table(table)
    assert all(m[:9] in txt for m in table.models)


def test_html_is_self_contained(labelled_report: tuple) -> None:
    _, paths = labelled_report
    page = paths["html"].read_text()
    imgs = re.findall(r"src='([^']*)'", page)
    assert len(imgs) == 2
    assert all(s.startswith("data:image/png;base64,") for s in imgs)
    assert "http://" not in page
    assert "https://" not in page
    assert "a note" in page
    assert "lenet→resnet" in page


def test_unlabelled_report(tmp_path: Path) -> None:
    store, maps = _store(labelled=False)
    table = evaluate(store, maps, device="cpu")
    paths = write_report(table, tmp_path)
    assert "overlap" not in paths
    assert "correct" not in paths
    doc = json.loads(paths["json"].read_text())
    assert doc["labelled"] is False
    assert "top1" not in doc
    assert "unmapped" in paths["markdown"].read_text()
    assert paths["heatmap"].read_bytes()[:8] == PNG_MAGIC


def _hand_table() -> EvalTable:
    """Two networks, 200 images, top-1 chosen by hand: A alone 80 %, B alone 70 %, hybrid A→B
    (A's features, B's classifier) 75 %, hybrid B→A 60 %."""
    top1 = np.array([[80.0, 75.0], [60.0, 70.0]])
    nan = np.full((2, 2), np.nan)
    return EvalTable(models=["A", "B"], n=200, labelled=True, top1=top1, top5=nan.copy(),
                     agree=nan.copy(), agree_unmapped=nan.copy(),
                     pred=np.zeros((2, 2, 0), np.int32), correct=None)


def test_csv_row_carries_its_own_hybrids_loss() -> None:
    """Hybrid A→B: B's classifier scores 70 % on B's features and 75 % on A's mapped ones, a loss
    of −5 (a gain). Hybrid B→A: A's 80 % falls to 60 %, a loss of +20. (Before issue 11 the row
    A,B carried +20, the reverse hybrid's loss.)"""
    table = _hand_table()
    rows = {(r["source"], r["target"]): r for r in csv.DictReader(io.StringIO(csv_text(table)))}
    assert float(rows[("A", "B")]["hybrid_loss_top1"]) == pytest.approx(-5.0)
    assert float(rows[("B", "A")]["hybrid_loss_top1"]) == pytest.approx(20.0)
    assert float(rows[("A", "A")]["hybrid_loss_top1"]) == 0.0
    assert float(rows[("A", "B")]["top1"]) == 75.0
    # the paper's Loss_{A,B} matrix keeps its convention: A's classifier, B's features
    assert table.loss_top1[0, 1] == pytest.approx(20.0)
    np.testing.assert_array_equal(table.hybrid_loss_top1, table.loss_top1.T)


def test_loss_gain_markdown_in_paper_table_1_layout() -> None:
    table = _hand_table()
    md = loss_gain_markdown(table)
    lines = md.splitlines()
    assert lines[0] == "| description | mapping | correct | percent | loss (points) |"
    assert "| A | A→A | 160 / 200 | 80.00% | |" in lines
    assert "| B | B→B | 140 / 200 | 70.00% | |" in lines
    assert "| A features, B classifier | A→B | 150 / 200 | 75.00% | −5.00 |" in lines
    assert "| B features, A classifier | B→A | 120 / 200 | 60.00% | +20.00 |" in lines
    assert md in markdown_table(table)
    # unlabelled tables have no loss
    nan = np.full((2, 2), np.nan)
    unl = EvalTable(models=["A", "B"], n=200, labelled=False, top1=nan, top5=nan,
                    agree=np.full((2, 2), 50.0), agree_unmapped=np.full((2, 2), 50.0),
                    pred=np.zeros((2, 2, 0), np.int32), correct=None)
    assert loss_gain_markdown(unl) == ""
    assert "Loss and gain" not in markdown_table(unl)


# ---- issue 11 item 7: colours that tell the truth; similarity and curve sections


def _cells(page: str) -> list[tuple[str, str]]:
    """(background colour, cell text) of every cell of the page's N×N table."""
    nxn = page[page.index("<table class='nxn"):]
    nxn = nxn[: nxn.index("</table>")]
    return [(bg, re.sub("<[^>]+>", " ", body)) for bg, body in
            re.findall(r"<td style='background:(#[0-9a-f]{6});[^']*'[^>]*>(.*?)</td>", nxn)]


def _lum(hexc: str) -> float:
    r, g, b = (int(hexc[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return 0.299 * r + 0.587 * g + 0.114 * b


def test_html_and_heatmap_share_one_scale_and_small_changes_stay_pale() -> None:
    """Source A 599 images, 500 right; A→B loses 5 images (−1.0 %), B→A 60 (−14 %). The small
    change must be pale (before: the HTML scale saturated at ~1 % and showed it deep red), the
    large one dark, and the heatmap's colormap must give the HTML's colours."""
    n = 599
    top1 = np.array([[500, 495], [367, 427]]) / n * 100.0
    nan = np.full((2, 2), np.nan)
    table = EvalTable(models=["A", "B"], n=n, labelled=True, top1=top1, top5=nan, agree=nan,
                      agree_unmapped=nan, pred=np.zeros((2, 2, 0), np.int32), correct=None)
    cells = _cells(html_table(table))
    small, large = cells[1], cells[2]
    assert _lum(small[0]) > 0.9  # pale
    assert _lum(large[0]) < 0.4  # dark red
    assert int(large[0][1:3], 16) > int(large[0][5:7], 16)  # red, not blue
    assert "495/599" in small[1]
    assert "−5 images" in small[1]
    assert "[" in small[1]  # the binomial interval
    sc = cell_scale(table)
    cmap = sc.cmap()
    for v in (-14.0, -1.0, 0.0, 3.0):
        want = rgb(v / sc.limit)
        got = cmap((v / sc.limit + 1) / 2)[:3]
        # a 256-entry lookup table: positions quantised by 1/255, colours by ≤ 1/255·slope
        np.testing.assert_allclose(got, want, atol=0.02)


def test_agreement_is_coloured_against_the_unmapped_baseline() -> None:
    """14 % agreement where the networks agree unmapped on 88 %: red, not green; 30 % where they
    agree unmapped on 20 %: blue (better than the baseline), although 30 % is low."""
    nan = np.full((2, 2), np.nan)
    agree = np.array([[100.0, 14.0], [30.0, 100.0]])
    unm = np.array([[100.0, 88.0], [20.0, 100.0]])
    table = EvalTable(models=["A", "B"], n=50, labelled=False, top1=nan, top5=nan, agree=agree,
                      agree_unmapped=unm, pred=np.zeros((2, 2, 0), np.int32), correct=None)
    cells = _cells(html_table(table))
    bad, good = cells[1][0], cells[2][0]
    assert int(bad[1:3], 16) > int(bad[5:7], 16)  # red
    assert _lum(bad) < 0.4
    assert int(good[5:7], 16) > int(good[1:3], 16)  # +10 points: blue
    assert "7/50" in cells[1][1]


def test_report_shows_similarity_and_curve(tmp_path: Path) -> None:
    store, maps = _store()
    table = evaluate(store, maps, device="cpu", overlap_pairs=[])
    sim = similarity(store, device="cpu")
    k = len(table.models)
    pts = [{"images": m, "score": table.top1.tolist(), "r2": np.eye(k).tolist()}
           for m in (100, 200)]
    curve = Curve(list(table.models), "top-1", table.n, pts)
    paths = write_report(table, tmp_path, similarity=sim, curve=curve)
    page = paths["html"].read_text()
    assert "Similarity of the networks" in page
    assert "Data efficiency" in page
    assert "Spearman" in page
    doc = json.loads(paths["json"].read_text())
    assert doc["similarity"]["cka"][0][1] == pytest.approx(sim.cka[0, 1])
    assert doc["similarity_vs_loss"]["pairs"] == k * (k - 1)
    assert [p["images"] for p in doc["curve"]["points"]] == [100, 200]
