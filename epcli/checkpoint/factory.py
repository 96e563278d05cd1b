"""Model factories named by the user (``module:function``): the only way user code builds a model.

A checkpoint never names code to import; the user does, explicitly, for models
with a custom ``forward`` whose architecture no spec can describe. The factory's
module is looked up in the working directory first, as ``python -m`` does, because
that is where users run ``epcli ... --model mymodels:build`` from. Importing and calling
both go through :func:`~epcli.checkpoint.user_code.user_code`.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable

from torch import nn

from epcli.checkpoint.user_code import user_code
from epcli.errors import CheckpointError, UsageError

__all__ = ["ModelFactory", "build_from_factory", "factory_name", "resolve_factory"]

ModelFactory = str | Callable[[], nn.Module]

_SPEC = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")


def resolve_factory(factory: ModelFactory) -> Callable[[], nn.Module]:
    """A callable given as is, or ``"package.module:function"`` imported (because the user named it)."""
    if callable(factory):
        return factory
    if not isinstance(factory, str) or not (match := _SPEC.match(factory)):
        raise UsageError(
            f"model factory {factory!r} must be 'module:function', e.g. 'mypkg.models:build', naming a function "
            "that takes no arguments and returns the model"
        )
    module_name, attribute = match["module"], match["attr"]
    _search_working_directory()
    with user_code(f"model factory {factory!r}", f"importing module {module_name!r}"):
        try:
            target: object = importlib.import_module(module_name)
        except Exception as e:  # the user's module may fail in any way while importing
            raise CheckpointError(
                f"model factory {factory!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); "
                f"it is looked up in the working directory ({os.getcwd()}) and on PYTHONPATH: run epcli from the "
                "directory that holds it, or add that directory to PYTHONPATH"
            ) from e
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise CheckpointError(f"model factory {factory!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise CheckpointError(
            f"model factory {factory!r}: {attribute!r} is not callable (type {type(target).__name__})"
        )
    return target


def _search_working_directory() -> None:
    """Put the working directory first on ``sys.path`` (once), as ``python -m`` and ``python -c`` do.

    A console script's ``sys.path[0]`` is its own ``bin`` directory, so without this
    ``--model mymodels:build`` fails in the very directory that holds ``mymodels.py``.
    It happens only when the user names a factory, never for files alone.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def factory_name(factory: ModelFactory) -> str:
    """How messages name a factory: the ``module:function`` the user gave, or a callable's qualified name."""
    return factory if isinstance(factory, str) else getattr(factory, "__qualname__", repr(factory))


def build_from_factory(factory: ModelFactory) -> nn.Module:
    """Call the factory and check that it returned an ``nn.Module``."""
    make = resolve_factory(factory)
    name = factory_name(factory)
    with user_code(f"model factory {name!r}", "building the model"):
        try:
            model = make()
        except Exception as e:
            raise CheckpointError(f"model factory {name!r} raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise CheckpointError(
            f"model factory {name!r} returned an object of type {type(model).__name__}, not a torch.nn.Module"
        )
    return model
