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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from affeq_rt.data.readers import read_unlabelled
from affeq_rt.demo import digits
from affeq_rt.errors import InternalError
from affeq_rt.io.maps import save_maps
from affeq_rt.io.store import ArrayStore, FeatureStore
from affeq_rt.method.controls import control_name
from affeq_rt.method.evaluate import evaluate
from affeq_rt.method.extract import ImageOptions, extract
from affeq_rt.method.fit import FitOptions, fit
from affeq_rt.method.results import EvalTable

PHOTO_NETWORKS = ("efficientnet_lite0", "mobilenet_v2")  # the pair, both ways


def _with_random(stores: dict[str, FeatureStore], random: dict[str, dict[str, np.ndarray]],
                 random_heads: dict[str, tuple[np.ndarray, np.ndarray]],
                 labels: dict[str, np.ndarray | None], names: Sequence[str]
                 ) -> dict[str, ArrayStore]:
    """In-memory stores per part: the trained networks' stored features and the random-weight
    ones (``NAME~random``), with their heads (file rows; these networks have no background row)."""
    heads = {m: (stores["fit"].head(m).weight, stores["fit"].head(m).bias) for m in names}
    heads.update(random_heads)
    return {p: ArrayStore({**{m: np.asarray(st.features(m)) for m in names}, **random[p]}, heads,
                          labels[p]) for p, st in stores.items()}


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


# How each photo table's maps are fitted: ridge with the Gram controls (noise, shuffled); the
# data-free logit-pinv map and prior-ridge (what ``fit --method auto`` picks for so few views) with
# the random-weight control only. A rows method has no Gram controls, and a shuffled-row
# prior-ridge could not serve as one: no correction helps on mismatched pairs, so its CV is
# expected to keep the prior, the very map the real fit starts from.
PHOTO_FITS = {"ridge": FitOptions(holdout=0.2, controls=True),
              "logit-pinv": FitOptions(holdout=0.0),
              "prior-ridge": FitOptions(holdout=0.0)}


def photo_controls(out: Path, stores: dict[str, str],
                   networks: Sequence[str] = PHOTO_NETWORKS, seed: int = 0,
                   say: Callable[[str], None] = print,
                   methods: Sequence[str] = ("ridge", "logit-pinv")) -> dict[str, EvalTable]:
    """The real-weight photo networks' hybrids with their controls, agreement on the unseen test
    photos, one table per ``methods`` entry (:data:`PHOTO_FITS`): ``ridge`` (maps fitted on the
    fit photos' views: random-weight, noise and shuffled controls), ``logit-pinv`` (data-free maps
    through the heads: the random-weight control, the only one a map that reads no image has) and
    ``prior-ridge`` (random-weight control). ``out`` is ``run_photos``'s folder (views and
    stores); the random-weight exports go to ``out/random_exports`` so the real ones are never
    replaced."""
    opened = {p: FeatureStore.open(s) for p, s in stores.items()}
    random: dict[str, dict[str, np.ndarray]] = {}
    heads = {}
    for part in ("fit", "test"):
        say(f"controls: {', '.join(networks)} with random weights on the {part} views")
        res = extract(list(networks), read_unlabelled(out / "views" / part),
                      out / f"store_{part}_random", dtype="float32",
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
                      {"fit": None, "test": None}, list(networks))
    out_tables = {}
    for method in methods:
        opt = FitOptions(**{**PHOTO_FITS[method].__dict__, "seed": seed})
        maps = fit(st["fit"], method=method, options=opt).maps
        save_maps(out / f"maps_{method}_controls.safetensors", maps,
                  {"demo": "photos, with controls"})
        out_tables[method] = evaluate(st["test"], maps, device="cpu", controls=True)
    return out_tables
