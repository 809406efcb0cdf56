"""``FunctionRef``: an endpoint function named by module and name, without importing it.

A caller that must not depend on the site's code (the campaign runner ships ``run_shard``)
hands a transport a ``FunctionRef`` instead of the function. It travels as a call to
``operator.attrgetter(name)(importlib.import_module(module))``, so the worker that unpickles
it gets the real function; transports see the same ``__module__``/``__name__`` (the operator's
registered function ids are found by them) and ``inspect.signature`` sees the declared
parameters (``GlobusTransport`` fills ``auth`` by name). Calling one here is a mistake: it
says so.
"""

from __future__ import annotations

import importlib
import inspect
import operator
from typing import Any


class _Module:
    """Pickles as ``importlib.import_module(name)``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return importlib.import_module, (self.name,)


class FunctionRef:
    """A module-level function at a site, by ``module`` and ``name``; ``params`` are its
    parameter names (all positional-or-keyword, the last ones defaulting to None)."""

    def __init__(self, module: str, name: str, params: tuple[str, ...],
                 optional: tuple[str, ...] = ()) -> None:
        self.__module__ = module
        self.__name__ = name
        self.__qualname__ = name
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        self.__signature__ = inspect.Signature(
            [inspect.Parameter(p, kind) for p in params]
            + [inspect.Parameter(p, kind, default=None) for p in optional])

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return operator.attrgetter(self.__name__), (_Module(self.__module__),)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{self!r} runs at a site: submit it through a transport")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FunctionRef) and (self.__module__, self.__name__) == (
            other.__module__, other.__name__)

    def __hash__(self) -> int:
        return hash((self.__module__, self.__name__))

    def __repr__(self) -> str:
        return f"FunctionRef({self.__module__}.{self.__name__})"


RUN_SHARD = FunctionRef("fabric.endpoint.campaign_shard", "run_shard", ("shard",), ("auth",))
"""The campaign shard function (``fabric.endpoint.campaign_shard.run_shard``)."""
