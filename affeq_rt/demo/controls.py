"""The demo's negative controls (issue 22 item 2): the hybrid tables of the digits miniature and of
the real-weight photo networks beside their controls (``method.controls``), with the margins.

Each part fits its maps once more with ``fit(..., controls=True)`` on the fitting rows of the
trained networks **and** of the same architectures with random weights (``NAME~random``): the
random-weight features are one more network (digits: the same arrays through the untrained
networks; photos: an ``extract`` of the random-weight exports, a pass of its own because it is
float32 while the photo stores are float16: random MobileNetV2 features are ~1e-9; a user's store
holds both from one pass, ``extract --models A,A~random --dtype float32``). The noise and
shuffled controls are statistics of the fit's pass and need no image. ``evaluate(...,
controls=True)`` then scores every control hybrid in the table's own pass.

:func:`control_rows` and :func:`controls_reading` put a table's numbers in the demo's words: per
hybrid its score, chance (the target's best constant guess), each control's score and margin,
whether that control is counted (a shuffled control that is bit for bit the hybrid's own map is
reported, not counted: ``ControlTable.same_map``) and the verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.data.readers import read_unlabelled
from affeq_rt.demo import digits
from affeq_rt.errors import InternalError
from affeq_rt.io.maps import MapSet, save_maps
from affeq_rt.io.store import ArrayStore, FeatureStore
from affeq_rt.method.controls import KINDS, ControlTable, control_name
from affeq_rt.method.evaluate import evaluate
from affeq_rt.method.extract import ExtractOptions, ImageOptions, extract
from affeq_rt.method.fit import FitOptions, fit
from affeq_rt.method.results import EvalTable

PHOTO_NETWORKS = ("efficientnet_lite0", "mobilenet_v2")  # the pair, both ways


@dataclass
class NamedArrayStore(ArrayStore):
    """An in-memory store that names its images as a FeatureStore does (``images``): ``fit``
    then groups a photo's views by their file names (``rows.path_groups``, ``NAME__VIEW.jpg``)
    exactly as on the photo store itself, so its folds and hold-out are the photo table's."""

    images: list[str] = field(default_factory=list)


def _with_random(stores: dict[str, FeatureStore], random: dict[str, dict[str, np.ndarray]],
                 random_heads: dict[str, tuple[np.ndarray, np.ndarray]],
                 labels: dict[str, np.ndarray | None], names: Sequence[str],
                 named: bool = False) -> dict[str, ArrayStore]:
    """In-memory stores per part: the trained networks' stored features and the random-weight
    ones (``NAME~random``), with their heads (file rows; these networks have no background row);
    ``named``: with the stores' image names (:class:`NamedArrayStore`)."""
    heads = {m: (stores["fit"].head(m).weight, stores["fit"].head(m).bias) for m in names}
    heads.update(random_heads)
    out: dict[str, ArrayStore] = {}
    for p, st in stores.items():
        feats = {**{m: np.asarray(st.features(m)) for m in names}, **random[p]}
        out[p] = (NamedArrayStore(feats, heads, labels[p], images=list(st.images)) if named
                  else ArrayStore(feats, heads, labels[p]))
    return out


def digits_controls(out: Path, seed: int = 0, say: Callable[[str], None] = print) -> EvalTable:
    """The digits miniature's OLS table with its controls (labelled: top-1). ``out`` is
    ``run_digits``'s folder (its stores ``store_train``/``store_test``)."""
    import torch

    data = digits.load(seed=seed)
    stores = {"fit": FeatureStore.open(out / "store_train"),
              "test": FeatureStore.open(out / "store_test")}
    names = list(stores["fit"].models)
    xs = {"fit": data.x_train, "test": data.x_test}
    random: dict[str, dict[str, np.ndarray]] = {"fit": {}, "test": {}}
    heads = {}
    say("controls: digits networks with random weights, noise and shuffled-row maps")
    for arch in digits.ARCHS:
        torch.manual_seed(seed + 1)
        model = digits.build(arch).eval()
        name = control_name(f"digits_{arch}", "random")
        with torch.no_grad():
            for part, x in xs.items():
                random[part][name] = model.forward_head(model.forward_features(
                    torch.from_numpy(x)), pre_logits=True).numpy().astype(np.float32)
        heads[name] = (model.head.weight.detach().numpy(), model.head.bias.detach().numpy())
    st = _with_random(stores, random, heads, {"fit": data.y_train, "test": data.y_test}, names)
    maps = fit(st["fit"], method="ols",
               options=FitOptions(holdout=0.1, seed=seed, controls=True)).maps
    save_maps(out / "maps_ols_controls.safetensors", maps, {"demo": "digits, with controls"})
    return evaluate(st["test"], maps, device="cpu", controls=True)


# How each photo table's maps are fitted (seed: the demo's): ridge (λ on 20 % of the fit photos,
# held out whole) and prior-ridge (what ``fit --method auto`` picks for so few views; no hold-out,
# CV over whole photos), each with its noise and shuffled controls fitted by the same estimator
# (``fit --controls``); the data-free logit-pinv map, which reads no image, with the random-weight
# control only. Each as ``demo.photos.photo_fit_options``: the real maps are the photo tables'.
PHOTO_FITS = {"ridge": FitOptions(holdout=0.2, controls=True),
              "logit-pinv": FitOptions(holdout=0.0),
              "prior-ridge": FitOptions(holdout=0.0, controls=True)}
# the default estimator first (``demo.photos.DEFAULT_FEW_DATA``)
PHOTO_CONTROL_METHODS = ("prior-ridge", "ridge", "logit-pinv")


def _photo_maps(fit_store: ArrayStore, method: str, opt: FitOptions,
                networks: Sequence[str]) -> MapSet:
    """The maps of one photo table with its control maps: the real pairs (with their noise and
    shuffled controls when ``opt.controls``) in one fit, then each random-weight source toward
    each real target (``fit`` of ``NAME~random`` with that one network; the reverse map comes
    along unused). Fitting every pair of the four sources at once cost more on the full demo's
    photos (ridge 11.6 s against 7.8 s, logit-pinv 3.4 s against 2.0 s; prior-ridge pays per pair
    and per head pseudo-inverse, 16 fits against 10)."""
    res = fit(fit_store, list(networks), method=method, options=opt)
    maps = list(res.maps.values())
    bare = replace(opt, controls=False)
    for a in networks:
        r = control_name(a, "random")
        maps += [fit(fit_store, [r, t], method=method, options=bare).maps[r, t]
                 for t in networks if t != a]
    return MapSet(maps, res.maps.meta)


def photo_controls(out: Path, stores: dict[str, str],
                   networks: Sequence[str] = PHOTO_NETWORKS, seed: int = 0,
                   say: Callable[[str], None] = print,
                   methods: Sequence[str] = PHOTO_CONTROL_METHODS) -> dict[str, EvalTable]:
    """The real-weight photo networks' hybrids with their controls, agreement on the unseen test
    photos, one table per ``methods`` entry (:data:`PHOTO_FITS`): ``prior-ridge`` (the default
    few-data estimator) and ``ridge``, maps fitted on the fit photos' views, with random-weight,
    noise and shuffled controls; ``logit-pinv`` (data-free maps through the heads) with the
    random-weight control, the only one a map that reads no image has. ``out`` is
    ``run_photos``'s folder (views and stores); the random-weight exports go to
    ``out/random_exports`` so the real ones are never replaced."""
    opened = {p: FeatureStore.open(s) for p, s in stores.items()}
    random: dict[str, dict[str, np.ndarray]] = {}
    heads = {}
    for part in ("fit", "test"):
        say(f"controls: {', '.join(networks)} with random weights on the {part} views")
        res = extract(list(networks), read_unlabelled(out / "views" / part),
                      out / f"store_{part}_random", options=ExtractOptions(dtype="float32"),
                      images=ImageOptions(batch_size=16, workers=1, random_weights=True,
                                          export_root=str(out / "random_exports")))
        rs = FeatureStore.open(res.path)
        if list(rs.images) != list(opened[part].images):
            raise InternalError(f"the random-weight {part} store's images differ from the real "
                                "store's")
        random[part] = {control_name(m, "random"): np.asarray(rs.features(m)) for m in networks}
        heads.update({control_name(m, "random"): (rs.head(m).weight, rs.head(m).bias)
                      for m in networks})
    st = _with_random({p: opened[p] for p in ("fit", "test")}, random, heads,
                      {"fit": None, "test": None}, list(networks), named=True)
    out_tables = {}
    for method in methods:
        say(f"controls: {method} maps of {', '.join(networks)} with their controls")
        maps = _photo_maps(st["fit"], method, replace(PHOTO_FITS[method], seed=seed), networks)
        save_maps(out / f"maps_{method}_controls.safetensors", maps,
                  {"demo": "photos, with controls"})
        out_tables[method] = evaluate(st["test"], maps, device="cpu", controls=True)
    return out_tables


def _verdict(ct: ControlTable, i: int, j: int) -> str:
    """``beats`` or why the hybrid (row i, column j) is flagged."""
    a, b = ct.models[i], ct.models[j]
    if f"{a}->{b}" not in ct.flagged:
        return "beats"
    if not ct.beats_chance[i, j]:
        return "flagged: does not beat chance"
    lost = [k for k in ct.kinds if not ct.beats[k][i, j] and not ct.is_own_map(k, f"{a}->{b}")]
    return f"flagged: does not beat {', '.join(lost)}"


def control_rows(ct: ControlTable) -> list[dict[str, Any]]:
    """One row per hybrid A->B of a control table, read off its fields: the real score, chance
    (the target's best constant guess) and real − chance; per control kind its score, margin
    (real − control), whether it is counted (not when it is the hybrid's own map) and beaten; the
    verdict (``beats``, or ``flagged: …``). Scores and margins in points of the table's measure."""
    rows = []
    for i, a in enumerate(ct.models):
        for j, b in enumerate(ct.models):
            if i == j:
                continue
            pair = f"{a}->{b}"
            kinds = {k: {"score": float(ct.score[k][i, j]), "margin": float(ct.margin[k][i, j]),
                         "counted": not ct.is_own_map(k, pair), "beats": bool(ct.beats[k][i, j])}
                     for k in ct.kinds if np.isfinite(ct.score[k][i, j])}
            rows.append({"hybrid": pair, "real": float(ct.real[i, j]),
                         "chance": float(ct.chance[j]),
                         "over_chance": float(ct.real[i, j] - ct.chance[j]),
                         "beats_chance": bool(ct.beats_chance[i, j]), "controls": kinds,
                         "verdict": _verdict(ct, i, j)})
    return rows


def controls_reading(ct: ControlTable) -> str:
    """The table in a few sentences: chance, each kind of control's scores and smallest margin
    (counted controls only), the smallest margin over chance, which shuffled controls are the
    hybrid's own map (not counted), and the verdict."""
    rows = control_rows(ct)
    what = "top-1" if ct.measure == "top1" else "agreement"
    text = (f"On {ct.n} images ({what}): chance (each target's best constant guess) "
            f"{_span([r['chance'] for r in rows])} %; ")
    kinds = []
    for k in KINDS:
        got = [c for r in rows for n, c in r["controls"].items() if n == k and c["counted"]]
        if got:
            kinds.append(f"{k} {_span([c['score'] for c in got])} % (smallest margin "
                         f"{min(c['margin'] for c in got):+.1f} points)")
    if kinds:
        text += "controls score " + ", ".join(kinds) + "; "
    text += f"smallest margin over chance {min(r['over_chance'] for r in rows):+.1f} points."
    if ct.same_map:
        text += (f" Not counted: the shuffled control of {', '.join(ct.same_map)} is bit for bit "
                 "the hybrid's own map (the estimator kept its prior on real and on mismatched "
                 "pairs), so it cannot discriminate.")
    beat = sum(r["verdict"] == "beats" for r in rows)
    text += (f" {beat} of {len(rows)} hybrids beat every counted control and chance by "
             "2 standard errors" + ("." if beat == len(rows) else
                                     f"; flagged: {', '.join(ct.flagged)}."))
    return text


def _span(v: Sequence[float]) -> str:
    """``lo–hi`` (one decimal), or the one value."""
    lo, hi = f"{min(v):.1f}", f"{max(v):.1f}"
    return lo if lo == hi else f"{lo}–{hi}"
