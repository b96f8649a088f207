"""Which services exist: each service package registers itself once, as a ``dramaturg.services`` entry point.

A service package (``services/<name>/__init__.py``) exports one :class:`ServiceEntry` named
``SERVICE``: its name, settings class, factory and training recipes as ``"module:attribute"``
strings, so importing the package (and listing the services) stays cheap — torch, transformers and
pyannote load only when a service is built or a recipe runs. ``pyproject.toml`` names that object
under ``[project.entry-points."dramaturg.services"]``; the CLI (``serve``, ``train``, ``up``,
``demo``), the model-service base class and the contract test all read this registry, and
``shared/`` never imports a service by name.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "dramaturg.services"

# Services the platform plans but has not built yet: `dramaturg serve tts` says so instead of
# "unknown service". A name leaves this tuple when its package registers itself.
PLANNED: tuple[str, ...] = ()


class ServiceNotBuilt(RuntimeError):
    """Raised for a service that is planned (see README: status) but not built yet."""


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise ValueError(f"{target!r} must look like 'package.module:attribute'")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class ServiceEntry:
    """One service, as its package declares it. Targets are ``"package.module:attribute"``.

    ``factory`` builds the service from its settings; ``settings`` is the settings class (read from
    defaults ← YAML ← environment); ``recipes`` the training recipes (name → Recipe), empty for the
    gateway; ``extra`` the pip extra its image installs (``services/Dockerfile``'s build argument);
    ``demo_config`` the train config (relative to the package folder) ``make demo`` runs when the
    model store has no model for the service — small, so a newcomer's first demo stays short;
    ``tiny_model`` a function ``(folder, home=None, *, seed=0)`` that writes an untrained tiny model
    the service loads (the model-service contract test and smoke checks serve it); ``evaluate`` the
    service's evaluation command, ``main(argv) -> int`` (``dramaturg eval <service> ARGS``).
    """

    name: str
    factory: str
    settings: str
    recipes: str = ""
    extra: str = ""
    description: str = ""
    demo_config: str = ""
    tiny_model: str = ""
    evaluate: str = ""

    @property
    def is_model_service(self) -> bool:
        return bool(self.recipes)

    def load_factory(self) -> Any:
        return _resolve(self.factory)

    def load_settings_class(self) -> Any:
        return _resolve(self.settings)

    def load_evaluate(self) -> Any:
        if not self.evaluate:
            raise ServiceNotBuilt(f"the {self.name} service names no evaluation command (.evaluate)")
        return _resolve(self.evaluate)

    def load_tiny_model_writer(self) -> Any:
        if not self.tiny_model:
            raise ServiceNotBuilt(f"the {self.name} service names no tiny model (ServiceEntry.tiny_model)")
        return _resolve(self.tiny_model)

    @property
    def package(self) -> str:
        """The service's package (``dramaturg.services.<name>``), from where its factory lives."""
        return self.factory.partition(":")[0].rsplit(".", 1)[0]

    def resource(self, relative: str) -> Path:
        """A file shipped in the service's package (presets, demo config), without importing its code."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"service package {self.package} is not installed")
        return Path(next(iter(spec.submodule_search_locations))) / relative


@cache
def registered() -> dict[str, ServiceEntry]:
    """Every installed service, by name (sorted: the gateway, then the model services)."""
    found: dict[str, ServiceEntry] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        entry = ep.load()
        if not isinstance(entry, ServiceEntry):
            raise TypeError(f"entry point {ep.name} = {ep.value} is not a ServiceEntry")
        if entry.name != ep.name:
            raise ValueError(f"entry point {ep.name} registers a service named {entry.name!r}")
        found[entry.name] = entry
    return dict(sorted(found.items(), key=lambda kv: (kv[1].is_model_service, kv[0])))


def known_names() -> list[str]:
    """Built and planned services (what ``dramaturg serve`` accepts as a name)."""
    return sorted({*registered(), *PLANNED})


def built_services() -> list[str]:
    return list(registered())


def model_services() -> list[str]:
    return [name for name, entry in registered().items() if entry.is_model_service]


def get(name: str) -> ServiceEntry:
    """The entry of ``name``; :class:`ServiceNotBuilt` for a planned one, KeyError for an unknown one."""
    entries = registered()
    if name in entries:
        return entries[name]
    if name in PLANNED:
        raise ServiceNotBuilt(f"the {name} service is not built yet (see README: status)")
    raise KeyError(f"unknown service {name!r}; known: {', '.join(known_names())}")


def recipes_path(name: str) -> str:
    """Where ``name``'s training recipes live (``"module:attribute"``)."""
    entry = get(name)
    if not entry.recipes:
        raise ServiceNotBuilt(f"the {name} service has no training recipes")
    return entry.recipes
