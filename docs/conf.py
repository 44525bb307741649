"""Sphinx configuration of the spikingjelly-cf documentation.

Build from the repository root (scripts/test.sh does, with -W: a warning fails the build)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Pages are MyST Markdown; the API reference is generated from the docstrings (autodoc,
autosummary, NumPy style through napoleon); the figures are drawn by docs/make_figures.py at
the start of every build, from the package and from the committed results in
benchmarks/results/.
"""
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)   # the package of this checkout (and docs/make_figures.py below)
sys.path.insert(0, HERE)

import spikingjelly_cf  # noqa: E402

project = 'spikingjelly-cf'
author = 'the spikingjelly-cf developers'
copyright = '2026, the spikingjelly-cf developers'
version = release = spikingjelly_cf.__version__

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx.ext.viewcode',
]
try:                      # a nicety (a copy button on code blocks), not a requirement
    import sphinx_copybutton  # noqa: F401
    extensions.append('sphinx_copybutton')
    copybutton_prompt_text = r'>>> |\.\.\. |\$ '
    copybutton_prompt_is_regexp = True
except ImportError:
    pass

try:                      # MathJax served from the build itself, so pages read offline too
    importlib.import_module('sphinx-mathjax-offline')
    extensions.append('sphinx-mathjax-offline')
except ImportError:       # else MathJax from its CDN (the math shows as TeX source offline)
    pass

source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
root_doc = 'index'
exclude_patterns = [
    '_build', '_generated/README*', 'Thumbs.db', '.DS_Store',
    '_changelog_fragments',   # folded into CHANGELOG.rst at release time
    'architecture.md',        # included by contributing.md
]
templates_path = ['_templates']

# -- MyST ----------------------------------------------------------------------------------------
myst_enable_extensions = ['dollarmath', 'colon_fence', 'deflist']
myst_heading_anchors = 3

# -- API reference -------------------------------------------------------------------------------
autosummary_generate = True
autosummary_ignore_module_all = False       # a module's __all__ is its public API
autodoc_default_options = {'members': True, 'show-inheritance': True}
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
autodoc_preserve_defaults = True
autoclass_content = 'class'
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_custom_sections = ['Shape']     # the house style's shape section ([T, N, *])
# nn.Module's own members are not ours to document
autodoc_inherit_docstrings = False

# -- HTML ----------------------------------------------------------------------------------------
html_theme = 'pydata_sphinx_theme'
html_title = f'spikingjelly-cf {release}'
html_static_path = ['_static']
html_css_files = ['custom.css']
html_show_sourcelink = False
html_theme_options = {
    'navigation_with_keys': False,
    'show_toc_level': 2,
    'navbar_align': 'left',
    'header_links_before_dropdown': 5,
    'footer_start': ['copyright'],
    'footer_end': ['sphinx-version'],
    'secondary_sidebar_items': ['page-toc'],
}
html_context = {'default_mode': 'light'}
# the left sidebar lists a section's pages: only the user guide and the API have sections
html_sidebars = {'*': [], 'api': ['sidebar-nav-bs'], 'guide/*': ['sidebar-nav-bs'],
                 '_generated/api/*': ['sidebar-nav-bs']}


def _constant_doc(app, what, name, obj, options, lines):
    """A re-exported constant (``functional.E_SOP`` is ``functional.energy.E_SOP``) has no doc
    comment where it is documented, and autodoc would show its type's docstring ("Convert a
    string or number to a floating point number"): show the ``#:`` comment of the module that
    defines it instead, or nothing."""
    if what != 'data' or not lines:
        return
    type_doc = type(obj).__doc__ or ''
    if not all(line.strip() in type_doc for line in lines):
        return
    import importlib
    import pkgutil
    from sphinx.pycode import ModuleAnalyzer
    attr = name.rsplit('.', 1)[-1]
    lines[:] = []
    modules = ['spikingjelly_cf'] + [m.name for m in pkgutil.walk_packages(
        spikingjelly_cf.__path__, 'spikingjelly_cf.') if '._' not in m.name]
    for modname in modules:
        try:
            module = importlib.import_module(modname)
            if getattr(module, attr, None) is not obj:
                continue
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except Exception:  # noqa: BLE001 - a module that does not import here has no say
            continue
        if ('', attr) in docs:
            lines[:] = list(docs[('', attr)])
            return


def _make_figures(app):
    import make_figures
    make_figures.main(os.path.join(HERE, '_generated', 'figures'))


def setup(app):
    app.connect('builder-inited', _make_figures)
    app.connect('autodoc-process-docstring', _constant_doc)
