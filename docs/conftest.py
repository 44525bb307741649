"""pytest in docs/: the pages' code runs as doctests (``--doctest-glob=*.md`` in setup.cfg); the
build scripts and the build's output are not tests."""
collect_ignore = ['conf.py', 'make_figures.py']
collect_ignore_glob = ['_build/*', '_generated/*', '_templates/*', '_changelog_fragments/*']
