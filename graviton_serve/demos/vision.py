"""ResNet/DenseNet weights for archives: torchvision's pretrained weights in real use, random
weights for the offline demo (no ImageNet weights can be had without the network).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from graviton_serve.demos import SEED
from graviton_serve.progress import say
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
