"""Split a torch classifier into its features module (image → [N, d]) and its linear head."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from affeq_rt.errors import AffeqError

if TYPE_CHECKING:  # pragma: no cover
    import torch


def as_linear(head: Any, where: str) -> torch.nn.Linear:
    """``head`` as a ``Linear`` (a 1×1 ``Conv2d`` is converted); AffeqError for anything else."""
    import torch

    if isinstance(head, torch.nn.Linear):
        return head
    if isinstance(head, torch.nn.Conv2d) and tuple(head.kernel_size) == (1, 1) and head.groups == 1:
        lin = torch.nn.Linear(head.in_channels, head.out_channels, bias=head.bias is not None,
                              device=head.weight.device)
        if head.weight.is_meta:  # shapes only (registry checks)
            return lin
        with torch.no_grad():
            lin.weight.copy_(head.weight.flatten(1))
            if head.bias is not None:
                lin.bias.copy_(head.bias)
        return lin.eval()
    raise AffeqError(f"{where} is {type(head).__name__}, not a linear classifier",
                     "give the model a Linear (or 1x1 conv) classifier")


def find_linear_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """(copy of ``model`` with its last Linear replaced by Identity, that Linear) for torchvision
    models: the head is ``fc``, ``classifier``, or the end of a ``classifier`` Sequential."""
    import torch

    feats = copy.deepcopy(model)
    if isinstance(getattr(feats, "fc", None), torch.nn.Linear):
        head = model.fc
        feats.fc = torch.nn.Identity()
    elif isinstance(getattr(feats, "classifier", None), torch.nn.Linear):
        head = model.classifier
        feats.classifier = torch.nn.Identity()
    elif isinstance(getattr(feats, "classifier", None), torch.nn.Sequential) \
            and isinstance(feats.classifier[-1], torch.nn.Linear):
        head = model.classifier[-1]
        feats.classifier[-1] = torch.nn.Identity()
    else:
        raise AffeqError(f"cannot find the classifier of {type(model).__name__}",
                         "expose forward_features/forward_head/get_classifier, "
                         "or a Linear fc/classifier")
    return feats, head


def split_model(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """(features module: image → [N, d], linear head) for timm-style or torchvision models.

    timm-style: ``forward_head(forward_features(x), pre_logits=True)`` and ``get_classifier()``
    (the demo's own nets follow this protocol). torchvision: the last Linear (``fc``, or the end of
    ``classifier``) is the head; everything before it, ReLU/Dropout of fc7 included, is features.
    """
    import torch

    if all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier")):
        head = as_linear(model.get_classifier(), "get_classifier()")

        class _TimmFeatures(torch.nn.Module):
            def __init__(self, m: torch.nn.Module) -> None:
                super().__init__()
                self.m = m

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.m.forward_head(self.m.forward_features(x), pre_logits=True).flatten(1)

        return _TimmFeatures(model).eval(), head
    feats, head = find_linear_head(model)

    class _Flat(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(x).flatten(1)

    return _Flat(feats).eval(), head
