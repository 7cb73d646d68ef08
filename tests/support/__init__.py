"""Helpers shared by the tests (and reused by scripts/bench/): real servers, stubs, the stack.

Imported as ``support.<module>``: pytest puts tests/ on sys.path (rootdir conftest, no
``__init__.py`` in tests/), scripts do the same explicitly.
"""
