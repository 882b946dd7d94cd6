"""Split a torch classifier into its features module (image → [N, d]) and its linear head.

Family rules. timm models follow one protocol: ``forward_head(forward_features(x),
pre_logits=True)`` is exactly the classifier's input — the pooled vector after everything the
head does before its last Linear: ConvNeXt's head LayerNorm, a ViT/DeiT/BEiT/EVA's class token or
pooled tokens after ``norm``/``fc_norm``, Swin's and MLP-Mixer's pooled tokens, RegNet's and
EfficientNet/MobileNet's pooled (and, for MobileNetV3, ``conv_head``-projected) vector — and
``get_classifier()`` is that Linear (or a 1×1 conv, or LeViT's BatchNorm+Linear, folded; two heads
over the same vector are averaged as the network averages them; RepViT's heads are fused by their
own ``fuse()``; MetaFormer's MLP head keeps its hidden layer in the features, as VGG's fc7 is).
torchvision models: the last
Linear (``fc``, the end of ``classifier``, ViT's ``heads``, Swin's ``head``) is the head and
everything before it is features. Families whose logits are no single affine function of one
vector are refused with the reason (``REFUSED``), and ``split_error``/``check_split`` prove every
split on real numbers before an export is written.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from affeq_rt.errors import AffeqError

if TYPE_CHECKING:  # pragma: no cover
    import torch


# timm classes whose logits are not one affine function of one pooled vector, and why.
REFUSED: dict[str, tuple[str, str]] = {  # class name: (reason, fix)
    "VisionTransformerDistilled": (
        "its logits average two heads over two different tokens (class and distillation)",
        "use the non-distilled model (e.g. deit_tiny_patch16_224)"),
    "PoolingVisionTransformer": (
        "PiT's distilled logits average two heads over two different tokens",
        "use a non-distilled PiT (e.g. pit_ti_224)"),
    "VOLO": ("VOLO adds 0.5·max over its tokens' auxiliary logits to the class-token logits, "
             "which is not linear in one vector", "pick another model"),
    "CrossVit": ("CrossViT averages heads over branches of different widths",
                 "pick another model"),
}


def _fold_norm_linear(head: Any) -> torch.nn.Linear | None:
    """LeViT's ``NormLinear`` (BatchNorm1d then Linear, eval mode) as one Linear, or None."""
    import torch

    bn, lin = getattr(head, "bn", None), getattr(head, "linear", None)
    if not (isinstance(bn, torch.nn.BatchNorm1d) and isinstance(lin, torch.nn.Linear)
            and len(list(head.children())) == 2 + int(hasattr(head, "drop"))):
        return None
    out = torch.nn.Linear(lin.in_features, lin.out_features, device=lin.weight.device)
    if lin.weight.is_meta:
        return out
    with torch.no_grad():  # y = W((x − μ)·s + β) + b, s = γ/√(σ² + ε): fold in float64
        s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = lin.weight.double()
        b = lin.bias.double() if lin.bias is not None else torch.zeros(lin.out_features,
                                                                       dtype=torch.float64)
        out.weight.copy_((w * s).float())
        out.bias.copy_((b + w @ (bn.bias.double() - bn.running_mean.double() * s)).float())
    return out.eval()


def _average(heads: list[torch.nn.Linear]) -> torch.nn.Linear:
    """One Linear computing the mean of ``heads`` over the same input (exact: linearity)."""
    import torch

    first = heads[0]
    out = torch.nn.Linear(first.in_features, first.out_features, device=first.weight.device)
    if first.weight.is_meta:
        return out
    with torch.no_grad():
        out.weight.copy_(torch.stack([h.weight.double() for h in heads]).mean(0).float())
        out.bias.copy_(torch.stack([
            h.bias.double() if h.bias is not None else torch.zeros(h.out_features,
                                                                   dtype=torch.float64)
            for h in heads]).mean(0).float())
    return out.eval()


def _is_mlp_head(head: Any) -> bool:
    """timm MetaFormer's ``MlpHead``: fc1 → act → norm → dropout → fc2 (Linear)."""
    import torch

    return type(head).__name__ == "MlpHead" and all(hasattr(head, a) for a in
                                                     ("fc1", "act", "norm")) \
        and isinstance(getattr(head, "fc2", None), torch.nn.Linear)


def _inner_linear(head: Any) -> Any:
    """The Linear inside a timm head module, where one is the whole classifier: ``ClassifierHead``
    (``.fc`` after pooling), a ``.linear`` beside dropout only (CPUBone), or a module with
    ``fuse()`` (RepViT's BatchNorm+Linear heads, distilled pair averaged) folded by timm itself;
    else None."""
    import torch

    if type(head).__name__ == "ClassifierHead" and \
            isinstance(getattr(head, "fc", None), (torch.nn.Linear, torch.nn.Conv2d)):
        return head.fc
    lin = getattr(head, "linear", None)  # CPUBone's LinearLayer without norm/activation
    if isinstance(lin, torch.nn.Linear) and all(
            c is lin or isinstance(c, (torch.nn.Dropout, torch.nn.Identity))
            for c in head.children()):
        return lin
    if callable(getattr(head, "fuse", None)) and not isinstance(head, torch.nn.Linear):
        if next(head.parameters()).is_meta:
            return None
        fused = copy.deepcopy(head).fuse()
        if isinstance(fused, torch.nn.Linear):
            return fused.eval()
    return None


def as_linear(head: Any, where: str) -> torch.nn.Linear:
    """``head`` as a ``Linear``: a 1×1 ``Conv2d`` is converted, BatchNorm1d+Linear folded, a tuple
    of heads over the same vector averaged; AffeqError for anything else."""
    import torch

    if isinstance(head, (tuple, list)) and head:
        return _average([as_linear(h, where) for h in head])
    if isinstance(head, torch.nn.Linear):
        return head
    folded = _fold_norm_linear(head)
    if folded is not None:
        return folded
    inner = _inner_linear(head)
    if inner is not None:
        return as_linear(inner, where)
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
    raise AffeqError(f"{where} is {type(head).__name__}, not a linear classifier, so the network "
                     "cannot be split exactly into features and one linear layer",
                     "use a model whose classifier is one Linear (or 1x1 conv)")


def find_linear_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """(copy of ``model`` with its last Linear replaced by Identity, that Linear) for torchvision
    models: the head is ``fc``, ``classifier``, ``head`` (Swin), or the end of a ``classifier`` or
    ``heads`` (ViT) Sequential."""
    import torch

    feats = copy.deepcopy(model)
    if isinstance(getattr(feats, "fc", None), torch.nn.Linear):
        head = model.fc
        feats.fc = torch.nn.Identity()
    elif isinstance(getattr(feats, "classifier", None), torch.nn.Linear):
        head = model.classifier
        feats.classifier = torch.nn.Identity()
    elif isinstance(getattr(feats, "head", None), torch.nn.Linear):
        head = model.head
        feats.head = torch.nn.Identity()
    else:
        for attr in ("classifier", "heads"):
            seq = getattr(feats, attr, None)
            if isinstance(seq, torch.nn.Sequential) and isinstance(seq[-1], torch.nn.Linear):
                head = getattr(model, attr)[-1]
                seq[-1] = torch.nn.Identity()
                break
        else:
            raise AffeqError(f"cannot find a linear classifier at the end of "
                             f"{type(model).__name__} (its last layer is no Linear, e.g. "
                             "SqueezeNet's conv+ReLU+pool), so it cannot be split exactly",
                             "use a model whose classifier is one Linear layer")
    return feats, head


def split_model(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """(features module: image → [N, d], linear head) for timm-style or torchvision models.

    timm-style: ``forward_head(forward_features(x), pre_logits=True)`` and ``get_classifier()``
    (the demo's own nets follow this protocol). torchvision: the last Linear (``fc``, or the end of
    ``classifier``) is the head; everything before it, ReLU/Dropout of fc7 included, is features.
    """
    import torch

    if all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier")):
        cls = type(model).__name__
        refused = REFUSED.get(cls)
        if refused is not None and (cls != "PoolingVisionTransformer"
                                    or getattr(model, "head_dist", None) is not None):
            raise AffeqError(f"{cls} cannot be split into features and one linear layer: "
                             f"{refused[0]}", refused[1])
        clf = model.get_classifier()
        tail = None
        if _is_mlp_head(clf):  # MetaFormer's MLP head: like VGG, its hidden layer is features
            tail = torch.nn.Sequential(clf.fc1, clf.act, clf.norm)
            clf = clf.fc2
        head = as_linear(clf, f"{cls}.get_classifier()")

        class _TimmFeatures(torch.nn.Module):
            def __init__(self, m: torch.nn.Module, tail: torch.nn.Module | None) -> None:
                super().__init__()
                self.m = m
                self.tail = tail

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x = self.m.forward_head(self.m.forward_features(x), pre_logits=True).flatten(1)
                return x if self.tail is None else self.tail(x)

        return _TimmFeatures(model, tail).eval(), head
    feats, head = find_linear_head(model)

    class _Flat(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(x).flatten(1)

    return _Flat(feats).eval(), head


def split_error(logits: torch.Tensor, split_logits: torch.Tensor) -> float:
    """max|head(features(x)) − model(x)| / max|model(x)| (both computed by the caller in torch,
    eval mode); inf when the shapes differ. Float32 reorderings give ≈1e-7; a wrong split (a
    missing head norm, the wrong token, a dropped term) is off by ≥1e-1."""
    if tuple(split_logits.shape) != tuple(logits.shape):
        return float("inf")
    ref = logits.double()
    return float((split_logits.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def check_split(name: str, logits: torch.Tensor, split_logits: torch.Tensor,
                tolerance: float) -> float:
    """``split_error``, or AffeqError when above ``tolerance``: the split is not the network (a
    family rule that does not hold)."""
    err = split_error(logits, split_logits)
    if not err <= tolerance:
        raise AffeqError(f"{name} is not its classifier applied to its pre-logits (relative "
                         f"error {err:.3g} > {tolerance:g}), so it cannot be split exactly",
                         "pick another model; the export was not written")
    return err
