"""Fixtures shared by every test module.

``stack``: the real local stack on free ports (see tests/support/stack.py); mark its users
``@pytest.mark.stack``.
"""

from support.stack import stack

__all__ = ["stack"]
