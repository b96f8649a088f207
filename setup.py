"""Map one import root, ``dramaturg``, over the project's fixed layout.

Generated protobuf stubs sit beside their ``.proto`` files under ``proto/dramaturg`` (protoc names
their imports ``dramaturg.<service>.v1``), the cross-cutting runtime is ``shared/`` and the services
are ``services/``. pyproject.toml cannot find packages under several mapped roots, so this does.
"""

from setuptools import find_packages, setup

ROOTS = {
    "dramaturg": "proto/dramaturg",
    "dramaturg.shared": "shared",
    "dramaturg.services": "services",
}

packages: list[str] = []
for name, folder in ROOTS.items():
    packages.append(name)
    packages.extend(f"{name}.{sub}" for sub in find_packages(folder))

setup(packages=packages, package_dir=ROOTS)
