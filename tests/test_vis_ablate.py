"""Robustness ablations: the corruptions themselves, and ``affeq-rt ablate`` on the digits
miniature (three trained networks, six OLS hybrids): grayscale and the channel shuffles are exact
identities on the grey digits, blur and salt-and-pepper lower every accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from affeq_rt.cli.main import main
from affeq_rt.vis.corrupt import blur, channels, default_corruptions, grayscale, salt_pepper


def test_grayscale_and_shuffles_are_identities_on_grey() -> None:
    """PIL's integer luma weights sum to 2^16: a grey pixel maps to itself, for every value."""
    v = np.arange(256, dtype=np.uint8)
    grey = np.repeat(np.tile(v, (4, 1))[:, :, None], 3, axis=2)
    assert np.array_equal(grayscale(grey), grey)
    assert np.array_equal(channels("BGR")(grey), grey)
    assert np.array_equal(channels("BRG")(grey), grey)
    colour = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    assert np.array_equal(channels("BRG")(colour), colour[:, :, [2, 0, 1]])
    assert not np.array_equal(grayscale(colour), colour)


def test_blur_and_salt_pepper() -> None:
    """Blur keeps a constant image and the mean of a ramp, smooths an impulse; S&P sets about
    λ·H·W·C values to 0/255 (binomial: λn = 600, sd 24.5, so ±5 sd = ±123)."""
    flat = np.full((9, 9, 3), 77, np.uint8)
    assert np.array_equal(blur(5)(flat), flat)
    imp = np.zeros((9, 9, 3), np.uint8)
    imp[4, 4] = 255
    b = blur(3)(imp)
    assert b[4, 4, 0] < 255
    assert b[4, 5, 0] > 0
    img = np.full((100, 100, 3), 128, np.uint8)
    noisy = salt_pepper(0.02)(img, np.random.default_rng(0))
    changed = noisy != 128
    assert abs(int(changed.sum()) - 600) < 123
    assert set(np.unique(noisy[changed])) <= {0, 255}
    names = [c.name for c in default_corruptions()]
    assert names[:6] == ["clean", "grayscale", "channels BGR", "channels BRG", "blur 3x3",
                         "blur 5x5"]


def test_ablate_help() -> None:
    """``--help`` works (exit 0)."""
    assert main(["ablate", "--help"]) == 0


# DataSource.head's check is extract's: one message and fix text
MAX_IMAGES_SAID = "--max-images must be positive, got 0; pass --max-images ≥ 1 or leave it out"


@pytest.mark.parametrize(("flag", "said"), [("--batch-size", "batch size must be positive"),
                                            ("--max-images", MAX_IMAGES_SAID)])
def test_ablate_bad_image_options_one_line(flag: str, said: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """A batch size or image count of 0 is one line (exit 1) before any network opens."""
    rc = main(["ablate", "--models", "no_such_net", "--data", str(tmp_path), "--out",
               str(tmp_path / "o"), flag, "0", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1
    assert said in err[0]


@pytest.fixture(scope="module")
def miniature(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The demo's digits miniature (quick) and its held-out digits written as PNG class folders
    (the very 8×8 grey images the demo preprocesses, so clean accuracy = the demo's)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from affeq_rt.demo.run import run_digits

    out = tmp_path_factory.mktemp("abl_demo") / "digits"  # the demo's own layout
    tables, _ = run_digits(out, quick=True, say=lambda _m: None)
    d = load_digits()
    imgs = (d.images / 16.0 * 255.0).round().astype(np.uint8)
    _, te = train_test_split(np.arange(len(imgs)), test_size=1 / 3, random_state=0,
                             stratify=d.target)
    for i in np.sort(te):
        p = out / "images" / str(d.target[i])
        p.mkdir(parents=True, exist_ok=True)
        Image.fromarray(imgs[i], mode="L").save(p / f"{i:04d}.png")
    return out, tables


@pytest.mark.slow
def test_cli_ablate_digits(miniature: tuple[Path, dict], tmp_path: Path) -> None:
    """Accuracies per corruption for 3 networks + 6 hybrids; identities exact; blur 5×5 and the
    strongest salt-and-pepper lower every row; clean = the demo's evaluate table."""
    out, tables = miniature
    nets = [out / "exports" / f"digits_{a}" for a in ("lenet5", "resnet_small", "inception_small")]
    rc = main(["ablate", "--models", ",".join(map(str, nets)), "--maps",
               str(out / "maps_ols.safetensors"), "--data", str(out / "images"), "--out",
               str(tmp_path / "abl"), "--provider", "cpu", "-q"])
    assert rc == 0
    doc = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert doc["measure"] == "top-1"
    assert doc["n"] == 599
    assert len(doc["rows"]) == 9
    assert sum("→" in r for r in doc["rows"]) == 6
    assert (tmp_path / "abl" / "ablation.png").stat().st_size > 10_000
    score = np.array(doc["score"])
    col = {c: i for i, c in enumerate(doc["corruptions"])}
    for c in ("grayscale", "channels BGR", "channels BRG"):
        assert np.array_equal(score[:, col[c]], score[:, col["clean"]]), c  # exactly
    assert np.all(score[:, col["blur 5x5"]] < score[:, col["clean"]])
    assert np.all(score[:, col["blur 3x3"]] < score[:, col["clean"]])
    assert np.all(score[:, col["s&p 0.2"]] < score[:, col["clean"]])
    # clean column = the demo's evaluate() on the same held-out digits (ONNX features, same
    # preprocessing); hybrids by a different float path (float64 fold here, the compiled core
    # there): equal up to one near-tie image (100/599 = 0.17 points)
    ols = tables["ols"]
    for r, name in enumerate(doc["rows"]):
        a, _, b = name.partition("→")
        i, j = ols.models.index(a), ols.models.index(b or a)
        assert abs(score[r, col["clean"]] - ols.top1[i, j]) <= 100 / 599 + 1e-9, name


@pytest.mark.slow
def test_ablate_maps_for_other_networks(miniature: tuple[Path, dict], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    """A maps file that lacks a pair of --models: one line, exit 1."""
    out, _ = miniature
    from affeq_rt.io.maps import MapSet, load_maps, save_maps

    ms = load_maps(out / "maps_ols.safetensors")
    only = MapSet([ms[("digits_lenet5", "digits_resnet_small")]])
    p = save_maps(tmp_path / "one.safetensors", only)
    nets = [out / "exports" / f"digits_{a}" for a in ("lenet5", "resnet_small")]
    rc = main(["ablate", "--models", ",".join(map(str, nets)), "--maps", str(p), "--data",
               str(out / "images"), "--out", str(tmp_path / "abl"), "--max-images", "5", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1
    assert "no map digits_resnet_small->digits_lenet5" in err[0]


@pytest.fixture(scope="module")
def random_digit_nets(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """resnet_small and inception_small, untrained (fixed seed), exported: fast real graphs."""
    import torch

    from affeq_rt.demo import digits
    from affeq_rt.onnx.export import export_split

    root = tmp_path_factory.mktemp("abl_random")
    out = []
    for arch in ("resnet_small", "inception_small"):
        torch.manual_seed(1)
        out.append(export_split(digits.build(arch).eval(), digits.spec_for(arch),
                                root / f"digits_{arch}"))
    return out


def test_ablate_unlabelled_logit_pinv_hybrids(random_digit_nets: list[Path],
                                              tmp_path: Path) -> None:
    """Without labels the score is agreement with the row's own clean prediction (clean = 100);
    a logit-pinv hybrid A→B reproduces A's logits (W_B W_B⁺ = I: K = 10 ≤ d_B), so its row
    equals A's under every corruption — which checks that each hybrid reads ITS source's
    features. The report section renders the table and the plot."""
    from PIL import Image

    from affeq_rt.io.maps import AffineMap, MapSet
    from affeq_rt.method.extract import ImageOptions
    from affeq_rt.method.solvers import logit_pinv
    from affeq_rt.onnx.exported import ExportedBackbone
    from affeq_rt.report.vis_sections import robustness_report_section
    from affeq_rt.vis.ablate import ablate

    rng = np.random.default_rng(0)
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(data / f"{i}.png")
    exps = [ExportedBackbone(p) for p in random_digit_nets]
    maps = []
    for a in exps:
        for b in exps:
            if a is not b:
                ha, hb = a.classifier_head(), b.classifier_head()
                w, bias, st = logit_pinv(ha, hb)
                assert st["logits_exact"]
                maps.append(AffineMap(a.name, b.name, w.astype(np.float32),
                                      bias.astype(np.float32), "logit-pinv"))
    events: list[tuple[str, object]] = []

    class Recorder:
        """A Progress that records what the library reports."""

        def start(self, task: str, total: int | None = None, done: int = 0,
                  unit: str = "img") -> None:
            events.append(("start", (task, total, done, unit)))

        def advance(self, n: int = 1) -> None:
            events.append(("advance", n))

        def done(self) -> None:
            events.append(("done", None))

        def step(self, message: str) -> None:
            events.append(("step", message))

    t = ablate(random_digit_nets, data, MapSet(maps), out=tmp_path / "o",
               images=ImageOptions(provider="cpu", batch_size=5), progress=Recorder())
    assert ("start", ("ablations", 12, 0, "img")) in events
    assert [v for k, v in events if k == "advance"] == [5, 5, 2]
    assert events[-1] == ("done", None)
    assert t.measure == "agreement"
    assert t.rows[2:] == ["digits_resnet_small→digits_inception_small",
                          "digits_inception_small→digits_resnet_small"]
    np.testing.assert_array_equal(t.score[:, 0], 100.0)
    # predictions of A→B equal A's (argmax of the same logits to float rounding; random nets
    # have no near-ties at this seed — checked on every image)
    np.testing.assert_array_equal(t.pred[2], t.pred[0])
    np.testing.assert_array_equal(t.pred[3], t.pred[1])
    head, body = robustness_report_section(t)
    assert head == "Robustness (agreement)"
    assert "data:image/png;base64" in body
    assert (tmp_path / "o" / "ablation.md").read_text().count("\n") == 2 + 4


@pytest.mark.slow
def test_demo_robustness_section(miniature: tuple[Path, dict]) -> None:
    """The demo's issue-12 sections on the digits part: a top-1 robustness section whose table
    has the three networks and six hybrids (the photo part needs the PyPI networks)."""
    from affeq_rt.demo.run import vis_sections

    out, _ = miniature
    said: list[str] = []
    secs = vis_sections(out.parent, None, None, 0, said.append)
    assert [h for h, _ in secs] == ["Robustness (top-1)"]
    body = secs[0][1]
    assert body.count("<tr>") == 1 + 9
    assert "data:image/png;base64" in body
    assert (out / "ablation" / "ablation.json").is_file()

