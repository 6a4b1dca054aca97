"""A pytest plugin that runs timm's own model tests on crossvit_fast (not collected by the default run).

It points timm's registered crossvit entrypoints at crossvit_fast before timm's ``tests/test_models.py`` (from a
pytorch-image-models checkout) collects its models:

* ``CROSSVIT_FAST_TIMM_SUITE=models``: ``timm.create_model("crossvit_*")`` builds crossvit_fast's ``CrossViT``;
* ``CROSSVIT_FAST_TIMM_SUITE=optimize``: it builds timm's ``CrossVit`` and returns ``crossvit_fast.optimize(model)``;
* unset or ``timm``: nothing is patched (timm's models, the baseline).

Run, in an environment with timm and torchvision::

    CROSSVIT_FAST_TIMM_SUITE=models PYTHONPATH=$PWD:$PWD/tests python -m pytest -p timm_suite_plugin -c /dev/null \\
        PATH/TO/pytorch-image-models/tests/test_models.py \\
        -k "(crossvit_tiny_240 or crossvit_9_240 or crossvit_9_dagger_240) and not pretrained"
"""

import functools
import os

import timm.models._registry as _registry

import crossvit_fast
from crossvit_fast.config import env

_MODE = env("CROSSVIT_FAST_TIMM_SUITE").lower()
if _MODE not in ("timm", "models", "optimize"):
    raise ValueError(f"CROSSVIT_FAST_TIMM_SUITE must be 'timm', 'models' or 'optimize', got {_MODE!r}")


def _optimized(timm_fn, **kwargs):
    return crossvit_fast.optimize(timm_fn(**kwargs))


if _MODE != "timm":
    for _name in crossvit_fast.list_models():
        _timm_fn = _registry._model_entrypoints.get(_name)
        if _timm_fn is None:
            continue
        if _MODE == "models":
            _registry._model_entrypoints[_name] = functools.partial(crossvit_fast.create_model, _name)
        else:
            _registry._model_entrypoints[_name] = functools.partial(_optimized, _timm_fn)


def pytest_report_header(config):
    return f"crossvit_fast timm suite: crossvit entrypoints -> {_MODE}"
