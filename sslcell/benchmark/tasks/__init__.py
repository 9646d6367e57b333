"""The shipped task kinds: every module in this package registers its kind(s) when imported.

Add a kind by adding a module here that calls :func:`sslcell.benchmark.registry.register`.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
