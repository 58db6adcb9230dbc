"""A user's model for the command line: ``--model package.module:factory``.

The factory is called on every rank as ``factory(group, device)`` with the
expert-parallel process group (None in a single process) and returns a
``ModelBundle``: the model, a batch maker and the loss.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn


class ModelFactoryError(ValueError):
    """``--model package.module:factory`` cannot be loaded or returned something else than a ModelBundle."""


@dataclass(kw_only=True, slots=True)
class ModelBundle:
    """What a model factory returns."""

    model: nn.Module
    """The model, built for this rank (its experts only); called as ``model(inputs)``."""
    batch: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    """``batch(step, rank) -> (inputs, targets)``, on the CPU or the model's device; dim 0 is the batch."""
    loss_fn: Callable[[object, torch.Tensor], torch.Tensor]
    """``loss_fn(model(inputs), targets)`` -> this rank's scalar loss."""
    expert_params: Iterable[str | nn.Parameter] | None = None
    """The expert-local parameters (None: found from the captured graph)."""
    name: str = ""
    """How plans and profiles name the model (default: the factory's reference)."""


def is_factory_reference(model: str) -> bool:
    """Whether ``--model`` names a factory (``package.module:factory``) rather than a built-in config."""
    return ":" in model


def load_factory(reference: str) -> Callable[..., ModelBundle]:
    """The callable ``reference`` (``package.module:factory``) names; ModelFactoryError if there is none."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ModelFactoryError(f"--model {reference!r}: expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelFactoryError(f"--model {reference!r}: cannot import {module_name!r} ({err}); is it on "
                                "PYTHONPATH?") from err
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModelFactoryError(f"--model {reference!r}: {module_name} has no callable {attribute!r}")
    return factory


def build_bundle(reference: str, group, device: torch.device) -> ModelBundle:
    """Call the factory ``reference`` names with ``(group, device)`` and check what it returns."""
    bundle = load_factory(reference)(group, device)
    if not isinstance(bundle, ModelBundle):
        raise ModelFactoryError(
            f"--model {reference!r} returned {type(bundle).__name__}; a factory returns "
            "lancet.ModelBundle(model=..., batch=..., loss_fn=...)"
        )
    if not isinstance(bundle.model, nn.Module) or not callable(bundle.batch) or not callable(bundle.loss_fn):
        raise ModelFactoryError(f"--model {reference!r}: the bundle needs an nn.Module model and callable batch "
                                "and loss_fn")
    if not bundle.name:
        bundle.name = reference
    return bundle
