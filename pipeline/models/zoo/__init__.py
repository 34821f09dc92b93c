"""The zoo: one module per network family, each registering its builders with
`pipeline.models.backbones.register_backbone`. Importing the package imports every module in
it, so adding a network is one module here and one YAML in conf/model/."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
