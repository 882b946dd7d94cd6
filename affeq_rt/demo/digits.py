"""The demo's miniature of the thesis: three small CNNs of different architectures (LeNet-5 from the
course notes, a small residual net, a small Inception-style net), trained on scikit-learn's digits
with fixed seeds on the CPU. Each ends in ONE Linear head, whose input is the network's feature
vector (84, 48 and 72 dimensions: all ≥ 10 classes, so logit-pinv maps are exact).

Images: the 8×8 digits become greyscale PIL images, preprocessed by ``preprocess.preprocess`` with
the nets' spec (bilinear resize to 28×28, RGB, mean/std 0.5) — the same transform the exported
ONNX graphs are fed, so training and extraction see identical tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from affeq_rt.data.preprocess import preprocess
from affeq_rt.errors import AffeqError
from affeq_rt.registry.spec import BackboneSpec

INPUT_SIZE = 28
NUM_CLASSES = 10
ARCHS = ("lenet5", "resnet_small", "inception_small")
FEATURE_DIMS = {"lenet5": 84, "resnet_small": 48, "inception_small": 72}
# Stages (modules of ``features``) for the layer-by-layer analysis (``onnx.stages``): the stem,
# then each block that ends a resolution or a module, shallow to deep; the network's features last.
STAGES = {"lenet5": ["features.2", "features.5", "features.8"],
          "resnet_small": ["features.2", "features.3", "features.4"],
          "inception_small": ["features.2", "features.3", "features.5"]}
PAPER_NAMES = {"lenet5": "LeNet-5 (course notes, 3-channel input)",
               "resnet_small": "small residual net (basic block + downsampling block)",
               "inception_small": "small Inception-style net (two 4-branch modules)"}


def spec_for(arch: str, weights_file: str | None = None) -> BackboneSpec:
    """The registry-style spec (library ``affeq``) of one demo network."""
    if arch not in ARCHS:
        raise AffeqError(f"unknown demo architecture {arch!r}", f"use one of {', '.join(ARCHS)}")
    return BackboneSpec.from_dict({
            "name": f"digits_{arch}", "aliases": [], "paper_name": PAPER_NAMES[arch],
            "library": "affeq", "arch": arch,
            "weights": {"kind": "file", "file": weights_file} if weights_file else {"kind": "none"},
            "input_size": INPUT_SIZE, "crop_pct": 1.0, "interpolation": "bilinear",
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "feature_dim": FEATURE_DIMS[arch],
            "num_classes": NUM_CLASSES, "label_offset": 0, "expected_top1": None, "tags": ["demo"],
            "note": "trained by `affeq-rt demo` on scikit-learn's digits (fixed seed)"},
                                  source=f"demo spec {arch}")


def _split_class() -> Any:
    """The ``Split`` module class (torch is imported here, on first use)."""
    import torch
    from torch import nn

    class Split(nn.Module):
        """features → head, with timm-style accessors for the exporter."""

        def __init__(self, features: nn.Module, dim: int) -> None:
            super().__init__()
            self.features = features
            self.head = nn.Linear(dim, NUM_CLASSES)
            self.num_features = dim

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.features(x)

        def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
            return f if pre_logits else self.head(f)

        def get_classifier(self) -> nn.Module:
            return self.head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    return Split


def _basic_block(cin: int, cout: int, stride: int = 1) -> Any:
    """He et al.'s basic residual block (two 3×3 convs), projection shortcut when needed."""
    import torch
    from torch import nn

    class Basic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(y)) + self.short(x))

    return Basic()


def _inception_module(cin: int, c1: int, c3: int, c5: int, cp: int) -> Any:
    """Inception module with dimension reductions: 1×1 | 1×1→3×3 | 1×1→5×5 | pool→1×1."""
    import torch
    from torch import nn

    def cbr(a: int, b: int, k: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(a, b, k, padding=k // 2, bias=False),
                             nn.BatchNorm2d(b), nn.ReLU())

    class Module(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b1 = cbr(cin, c1, 1)
            self.b3 = nn.Sequential(cbr(cin, c3 // 2, 1), cbr(c3 // 2, c3, 3))
            self.b5 = nn.Sequential(cbr(cin, c5 // 2, 1), cbr(c5 // 2, c5, 5))
            self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(cin, cp, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)

    return Module()


def _features(arch: str) -> Any:
    """The feature extractor of ``arch``: image [N, 3, 28, 28] → [N, FEATURE_DIMS[arch]]."""
    from torch import nn

    if arch == "lenet5":
        # The course notes' LeNet5 (conv5-pool-conv5-pool, 256→120→84→10) on 3×28×28 inputs.
        return nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
    if arch == "resnet_small":
        # stride-2 stem (14×14), a basic block, a downsampling block (7×7), global average pool
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            _basic_block(16, 16), _basic_block(16, 48, stride=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if arch == "inception_small":
        # stride-2 stem (14×14), Inception module (56 ch), max-pool (7×7), module (72 ch), GAP
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            _inception_module(16, 16, 24, 8, 8), nn.MaxPool2d(2, 2),
            _inception_module(56, 24, 24, 12, 12),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    raise AffeqError(f"unknown demo architecture {arch!r}", f"use one of {', '.join(ARCHS)}")


def build(arch: str) -> Any:
    """A fresh (untrained) demo network: ``features`` (image → [N, d]) then ``head`` (Linear)."""
    net = _split_class()(_features(arch), FEATURE_DIMS[arch])
    net.feature_info = [{"module": m} for m in STAGES[arch]]  # as timm lists its stages
    return net


@dataclass
class Digits:
    """The digits split: preprocessed tensors and labels for training and held-out evaluation."""

    x_train: np.ndarray  # float32 [n_train, 3, 28, 28]
    y_train: np.ndarray  # int64 [n_train]
    x_test: np.ndarray
    y_test: np.ndarray
    ids_train: list[str]
    ids_test: list[str]


def load(test_fraction: float = 1 / 3, seed: int = 0) -> Digits:
    """scikit-learn's 1,797 digits, a fixed stratified split, preprocessed like the exports are."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    imgs = (d.images / 16.0 * 255.0).round().astype(np.uint8)  # 0..16 → 0..255
    spec = spec_for(ARCHS[0])
    x = np.stack([preprocess(Image.fromarray(im, mode="L"), spec) for im in imgs])
    idx = np.arange(len(imgs))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed,
                              stratify=d.target)
    tr, te = np.sort(tr), np.sort(te)
    y = d.target.astype(np.int64)
    return Digits(x[tr], y[tr], x[te], y[te], [f"sklearn-digits/{i}" for i in tr],
                  [f"sklearn-digits/{i}" for i in te])


def train(arch: str, data: Digits, epochs: int, seed: int = 0, lr: float = 3e-3,
          batch_size: int = 32) -> tuple[Any, dict[str, float]]:
    """Train one network with Adam and a fixed seed; returns it in eval mode and its accuracies."""
    import torch

    threads = torch.get_num_threads()
    # One thread: these nets are tiny, and on a shared 2-core machine a second OpenMP thread makes
    # training several times slower (measured 5-7x under load), never faster.
    torch.set_num_threads(1)
    try:
        return _train(arch, data, epochs, seed, lr, batch_size)
    finally:
        torch.set_num_threads(threads)


def _train(arch: str, data: Digits, epochs: int, seed: int, lr: float,
           batch_size: int) -> tuple[Any, dict[str, float]]:
    import torch

    torch.manual_seed(seed)
    model = build(arch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    xt = torch.from_numpy(data.x_train)
    yt = torch.from_numpy(data.y_train)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            j = perm[i:i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xt[j]), yt[j])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = {"train_top1": float((model(xt).argmax(1) == yt).float().mean()) * 100,
               "test_top1": float((model(torch.from_numpy(data.x_test)).argmax(1) ==
                                   torch.from_numpy(data.y_test)).float().mean()) * 100}
    return model, acc
