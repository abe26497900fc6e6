"""The public names are what `__all__` says, and each of them exists."""

import importlib

import pytest


@pytest.mark.parametrize("module", ["loopwatch", "loopwatch.testing"])
def test_all_names_exist_and_public_names_are_all_listed(module):
    mod = importlib.import_module(module)
    assert isinstance(mod.__all__, tuple)
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert missing == []
    defined_here = {name for name, value in vars(mod).items()
                    if not name.startswith("_") and getattr(value, "__module__", None) == module}
    assert defined_here <= set(mod.__all__), defined_here - set(mod.__all__)


def test_the_package_exports_the_api_the_readme_uses():
    import loopwatch

    for name in ("instrument", "watch", "BlockEvent", "OffloadEvent", "Handle", "Options", "OptionError"):
        assert name in loopwatch.__all__
