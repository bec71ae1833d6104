"""Sphinx configuration of the conec-trio documentation (``nox -s docs``)."""

project = "conec-trio"
author = "the conec-trio authors"
copyright = "the conec-trio authors"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.intersphinx"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Cross-references to Trio's and Python's own types are links when their inventories can be
# fetched; offline, the build goes on without them (and without a warning).
intersphinx_mapping: dict[str, tuple[str, None]] = {}
suppress_warnings = ["myst.xref_missing"]

html_theme = "alabaster"
html_title = "conec-trio"
