"""Filter registry: a ``type`` name -> a Filter class. Built-ins are listed in
``filters.BUILTIN``; third-party packages register through the ``floodwall.filters`` entry-point
group, so a policy ships as its own package."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Collection, Iterable, Mapping
from importlib.metadata import entry_points

from pydantic import ValidationError

from proxy.api import Deps, Filter, FilterParams, Phase
from proxy.config import ConfigError, FilterConfig, _format_validation

ENTRY_POINT_GROUP = "floodwall.filters"


def _load(target: str) -> type[Filter]:
    module, _, attr = target.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    if not (isinstance(obj, type) and issubclass(obj, Filter)):
        raise TypeError(f"{target} is not a proxy.api.Filter subclass")
    return obj


def class_problem(cls: type[Filter]) -> str | None:
    """What makes a Filter class unusable, found at start rather than at its first request."""
    if not (isinstance(cls.Params, type) and issubclass(cls.Params, FilterParams)):
        # A plain pydantic model ignores unknown keys: a misspelt param would pass unnoticed.
        return f"{cls.__name__}.Params must subclass proxy.api.FilterParams"
    for phase in Phase:  # the hooks the chain awaits; on_complete may be a plain def
        hook = "on_" + phase.value
        if not inspect.iscoroutinefunction(getattr(cls, hook)):
            return f"{cls.__name__}.{hook} must be an `async def` (the chain awaits it)"
    return None


def available() -> dict[str, str]:
    """type name -> 'module:Class' for every filter that can be configured."""
    from filters import BUILTIN

    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            raise ConfigError(
                f"an installed package registers filter type {ep.name!r} ({ep.value}, entry "
                f"point group {ENTRY_POINT_GROUP}), a built-in's name: rename it in that "
                "package's entry points"
            )
        found[ep.name] = ep.value
    return found


def build_filters(
    configs: list[FilterConfig],
    deps: Deps,
    extra: Mapping[str, type[Filter]] | None = None,
    *,
    index: int = 0,
) -> list[Filter]:
    """Instantiates the configured filters in order; any problem is a ConfigError naming the
    filter (``index``: the first one's position in the config, for its name)."""
    known = available()
    out: list[Filter] = []
    for i, fc in enumerate(configs, index):
        where = f"filters[{i}] ({fc.name})"
        if extra and fc.type in extra:
            cls = extra[fc.type]
        elif fc.type in known:
            try:
                cls = _load(known[fc.type])
            except Exception as e:
                raise ConfigError(f"{where}: cannot load type {fc.type!r}: {e}") from None
        else:
            raise ConfigError(f"{where}: unknown type {fc.type!r} (known: {sorted(known)})")
        problem = class_problem(cls)
        if problem is not None:
            raise ConfigError(f"{where}: type {fc.type!r}: {problem}")
        try:
            params = cls.Params.model_validate(fc.params)
        except ValidationError as e:
            raise ConfigError(f"{where}: {_format_validation(e, 'params')}") from None
        try:
            f = cls(params, deps)
        except ValueError as e:  # params that only make sense together, or with the config
            raise ConfigError(f"{where}: {e}") from None
        except Exception as e:
            # A bug in the filter's constructor: named, with its type, not a bare traceback.
            raise ConfigError(f"{where}: cannot build: {type(e).__name__}: {e}") from e
        f.name = fc.name
        out.append(f)
    return out


def check_route_refs(filters: Iterable[Filter], routes: Collection[str]) -> None:
    """Each route a filter's params name (``Filter.route_refs``) must be configured: a typo
    would leave the route without the policy, silently."""
    for i, f in enumerate(filters):
        unknown = sorted(set(f.route_refs()) - set(routes))
        if unknown:
            raise ConfigError(
                f"filters[{i}] ({f.name}): params name unknown route(s) {', '.join(unknown)} "
                f"(routes: {', '.join(sorted(routes))})"
            )
