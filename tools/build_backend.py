"""
The PEP 517 build backend of vsc: setuptools', except that an editable install
(``pip install -e .``, PEP 660) is always the *compat* kind.

Why: ``twistd vsc-server`` and ``twistd vsc-card`` are found through the
``twisted/plugins/`` directory of this checkout, which Twisted looks for in
every ``sys.path`` entry. setuptools' default editable mode maps the packages
through an import hook and hides that directory, so twistd said "Unknown
command: vsc-server" (issue 13); the compat mode puts the checkout itself on
``sys.path``. An explicit ``--config-settings editable_mode=...`` still wins.
"""

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 - every hook but build_editable is setuptools' own


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    settings = dict(config_settings or {})
    settings.setdefault("editable_mode", "compat")
    return _setuptools.build_editable(wheel_directory, settings, metadata_directory)
