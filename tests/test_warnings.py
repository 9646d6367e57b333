"""sslcell's own warnings are SSLCellWarning: users filter them by category, the CLI prints them as its lines."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

import sslcell
from sslcell._warn import warn_user
from sslcell.errors import SSLCellWarning

PACKAGE = Path(sslcell.__file__).parent
LIBRARY_CATEGORIES = {"DeprecationWarning", "FutureWarning"}  # API moves, not the user's data


def _warn_calls():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "warn"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "warnings"):
                yield path, node


def test_every_warning_about_the_users_input_is_an_sslcell_warning():
    calls = list(_warn_calls())
    assert len(calls) > 10  # the scan sees the package's calls
    for path, node in calls:
        category = node.args[1] if len(node.args) > 1 else next(
            (k.value for k in node.keywords if k.arg == "category"), None)
        name = ast.unparse(category) if category is not None else "UserWarning (default)"
        if path.name == "_warn.py":
            continue  # warn_user passes its own category, SSLCellWarning by default
        assert name == "SSLCellWarning" or name in LIBRARY_CATEGORIES, f"{path.name}:{node.lineno} warns {name}"


def test_warn_user_warns_sslcell_warnings_filterable_by_category():
    with pytest.warns(SSLCellWarning, match="look"):
        warn_user("look")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=SSLCellWarning)
        warn_user("silenced")
    assert issubclass(SSLCellWarning, UserWarning)  # filters on UserWarning still catch them
