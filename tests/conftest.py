"""Fixtures shared by every test module.

``stack``: the real local stack on free ports (see tests/stack.py); mark its users
``@pytest.mark.stack``.
"""

from stack import stack

__all__ = ["stack"]
