"""`expand(cases)`: one unittest method per case, as `parameterized.expand` makes them (the vendored suites' only use of
that package, which the project does not depend on)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from typing import Any


def _case_name(function: Callable, index: int, case: tuple) -> str:
    first = str(case[0]) if case else ""
    suffix = "".join(c if c.isalnum() else "_" for c in first)
    return f"{function.__name__}_{index}_{suffix}" if suffix else f"{function.__name__}_{index}"


def expand(cases: Iterable[Any]) -> Callable[[Callable], None]:
    """Decorate a test method: the class gets `test_NAME_<index>_<first argument>` for each case (a tuple of
    arguments, or one argument) in its place, as `parameterized.expand` names them."""
    cases = [case if isinstance(case, tuple) else (case,) for case in cases]

    def decorate(function: Callable) -> None:
        namespace = sys._getframe(1).f_locals  # the class body being defined
        for index, case in enumerate(cases):

            @functools.wraps(function)
            def test(self, _case=case):
                return function(self, *_case)

            name = _case_name(function, index, case)
            test.__name__ = test.__qualname__ = name
            namespace[name] = test

    return decorate
