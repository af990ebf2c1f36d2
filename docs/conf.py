"""Sphinx configuration: ``sphinx-build -W -b html docs docs/_build/html``."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.util import logging

import flask_statemanager
from flask_statemanager.config import SETTINGS

project = "flask-statemanager"
copyright = "flask-statemanager contributors"
release = flask_statemanager.__version__
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc"]
# No intersphinx: the docs build without network access.
nitpicky = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = f"flask-statemanager {release}"
html_theme_options = {"description": "Typed, versioned application state for Flask."}
pygments_style = "sphinx"

_logger = logging.getLogger(__name__)
_DATA_RE = re.compile(
    r"^\.\. data:: (STATEMANAGER_\w+)\n(?:\n|   .*\n)*?   Default: ``(.*?)``", re.MULTILINE
)


def _check_configuration_page(app: Sphinx) -> None:
    """Fail the build (with ``-W``) when configuration.rst and SETTINGS drift apart."""
    text = (Path(app.srcdir) / "configuration.rst").read_text(encoding="utf-8")
    documented = {key: default for key, default in _DATA_RE.findall(text)}
    for key, default, _ in SETTINGS:
        if key not in documented:
            _logger.warning("configuration.rst: %s (in config.SETTINGS) is not documented", key)
        elif ast.literal_eval(documented[key]) != default:
            _logger.warning(
                "configuration.rst: %s default is ``%s`` but config.SETTINGS has %r",
                key,
                documented[key],
                default,
            )
    for key in documented.keys() - {key for key, _, _ in SETTINGS}:
        _logger.warning("configuration.rst: %s is documented but not in config.SETTINGS", key)


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", _check_configuration_page)
    return {"parallel_read_safe": True}
