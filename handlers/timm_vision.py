"""timm image classifiers (the demo's efficientnet_lite0 is timm's ``tf_efficientnet_lite0``).

The architecture comes from timm's builder by name (``timm.create_model``, nothing downloaded);
preprocessing from the model's own pretrained configuration (``timm.data.resolve_data_config``
and ``create_transform``: resize, centre crop, interpolation, mean/std as its weights were trained)
and category names from timm's ImageNet table for the model's label set — no hand-copied constants.
The trained parameters are the archive's state dict, in timm's key names. Decoding, batching and
top-k answers are the torchvision family's (handlers.vision).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config
from torch import nn
from torchvision import transforms

from handlers.image_classification import ImageClassifier
from handlers.settings import Setting
from handlers.torchserve_wire import TorchServeHandler
from handlers.vision import VisionHandler


def architecture_name(raw: object) -> str:
    name = str(raw)
    if name not in timm.list_models():
        raise ValueError(f"expected a timm model name such as tf_efficientnet_lite0, got {name!r}")
    return name


class TimmVisionHandler(VisionHandler):
    settings = {
        **ImageClassifier.settings,
        "architecture": Setting("tf_efficientnet_lite0", architecture_name),
    }

    def load_network(self, model_dir: Path, serialized_file: str | None, settings: dict) -> nn.Module:
        model = timm.create_model(settings["architecture"], pretrained=False)
        self.transform = create_transform(**resolve_data_config({}, model=model))
        resize = next(step for step in self.transform.transforms if isinstance(step, transforms.Resize))
        self.resize_short_side = resize.size if isinstance(resize.size, int) else min(resize.size)
        self.decode_short_side = self.resize_short_side
        subset = infer_imagenet_subset(model)
        if subset is None:
            raise ValueError(f"timm's {settings['architecture']} has no ImageNet label set: its categories are unknown")
        self.categories = list(ImageNetInfo(subset).label_descriptions())
        state = torch.load(model_dir / (serialized_file or "model.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model.eval().to(memory_format=torch.channels_last)


handle = TorchServeHandler(TimmVisionHandler)
