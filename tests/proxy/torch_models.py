"""torch modules for the tests; factory strings point here (``tests.proxy.torch_models:...``).

Importing this module imports torch: only torch-backend tests and builders do.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import nn

from tests.proxy.models import classifier_io, classifier_weights

# The factory classifier: what ``make_classifier`` builds without a weights file.
FACTORY_FEATURES = 4
FACTORY_CLASSES = 3
FACTORY_SEED = 7


class TorchClassifier(nn.Module):
    """softmax(x @ weight + bias) and its argmax, as tests/proxy/models.py describes."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[0], weight.shape[1])
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight.T)))
            self.linear.bias.copy_(torch.from_numpy(bias))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.linear(x), dim=1)
        return probs, torch.argmax(probs, dim=1)


def make_classifier() -> nn.Module:
    """Factory with declared io (``mirrorgate_io``) and seeded weights."""
    weights = classifier_weights(FACTORY_FEATURES, FACTORY_CLASSES, FACTORY_SEED)
    module = TorchClassifier(weights.weight, weights.bias)
    module.mirrorgate_io = classifier_io(FACTORY_FEATURES, FACTORY_CLASSES)
    return module


def make_undeclared_classifier() -> nn.Module:
    """The same classifier without a declaration: convention names apply."""
    weights = classifier_weights(FACTORY_FEATURES, FACTORY_CLASSES, FACTORY_SEED)
    return TorchClassifier(weights.weight, weights.bias)


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def make_identity() -> nn.Module:
    return Identity()


class DictOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"double": x * 2, "negated": -x}


def make_dict_outputs() -> nn.Module:
    return DictOutputs()


# A model that blocks until the test lets it go: proves the event loop keeps running
# while a model runs. Module-level because factories take no arguments.
GATE_ENTERED = threading.Event()
GATE_RELEASE = threading.Event()
GATE_RELEASED_BY_EVENT: list[bool] = []


class Gated(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        GATE_ENTERED.set()
        # The timeout only keeps a broken build from hanging the suite forever.
        GATE_RELEASED_BY_EVENT.append(GATE_RELEASE.wait(timeout=60))
        return x + 1


def make_gated() -> nn.Module:
    return Gated()


def make_not_a_module() -> object:
    return {"weights": [1, 2, 3]}


def make_failing() -> nn.Module:
    raise RuntimeError("factory exploded on purpose")


class InPlace(nn.Module):
    """Adds one to its input in place: must not reach the caller's array."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.add_(1.0)
        return x * 1.0


def make_in_place() -> nn.Module:
    return InPlace()
