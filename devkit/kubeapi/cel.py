"""CEL as the API server evaluates it (cel-python), shared by the JWT claim rules (oidc.py) and the
ValidatingAdmissionPolicies (admission.py): compilation, the few functions of the server's string
library that standard CEL lacks, evaluation errors as exceptions, results as plain Python."""

from __future__ import annotations

import re
from typing import Any


class CelCompileError(ValueError):
    """The expression does not compile; the message is the parser's."""


class CelEvalError(ValueError):
    """The expression could not be evaluated (a missing key, a wrong type, ...)."""


def _extensions() -> dict[str, Any]:
    """k8s ext strings functions that claim mappings and policies use and standard CEL lacks."""
    from celpy import celtypes

    def split(s: Any, sep: Any) -> Any:
        return celtypes.ListType([celtypes.StringType(x) for x in str(s).split(str(sep))])

    def lower_ascii(s: Any) -> Any:
        return celtypes.StringType("".join(c.lower() if c.isascii() else c for c in str(s)))

    def index(container: Any, key: Any) -> Any:
        # An error in the container (a missing field before [..]) is the answer, as in cel-go; celpy
        # would report a confusing missing overload instead.
        if isinstance(container, CELEvalError):
            return container
        try:
            return container[key]
        except KeyError:
            return CELEvalError(f"no such key: {key}", KeyError, None)
        except IndexError:
            return CELEvalError(f"index out of bounds: {key}", IndexError, None)

    from celpy.evaluation import CELEvalError

    return {"split": split, "lowerAscii": lower_ascii, "_[_]": index}


def to_cel(value: Any) -> Any:
    """A JSON-like Python value (or an already converted CEL value) as a CEL value."""
    import celpy
    from celpy import celtypes

    if isinstance(value, (celtypes.MapType, celtypes.ListType, celtypes.StringType, celtypes.BoolType,
                          celtypes.IntType, celtypes.DoubleType)):
        return value
    return celpy.json_to_cel(value)


class Expression:
    """One compiled CEL expression."""

    def __init__(self, text: str) -> None:
        import celpy

        self.text = text
        env = celpy.Environment()
        try:
            self.program = env.program(env.compile(text), functions=_extensions())
        except Exception as exc:  # celpy raises its own parse errors
            raise CelCompileError(str(exc)) from None

    def evaluate_cel(self, **variables: Any) -> Any:
        """The result as a CEL value (to feed into another expression); raises CelEvalError."""
        try:
            result = self.program.evaluate({k: to_cel(v) for k, v in variables.items()})
        except Exception as exc:
            if type(exc).__module__.startswith("celpy") or isinstance(exc, (TypeError, KeyError, ValueError)):
                raise CelEvalError(_describe(exc)) from None
            raise
        if isinstance(result, Exception):  # celpy returns some evaluation errors as values
            raise CelEvalError(_describe(result))
        return result

    def __call__(self, **variables: Any) -> Any:
        return plain(self.evaluate_cel(**variables))


def _describe(exc: BaseException) -> str:
    """The error as cel-go words the common ones (a missing field or key: `no such key: NAME`)."""
    args = getattr(exc, "args", ())
    text = args[0] if args and isinstance(args[0], str) else str(exc)
    member = re.match(r"^no such member in mapping: '(.*)'$", text)
    return f"no such key: {member[1]}" if member else text


def plain(value: Any) -> Any:
    """A CEL value as plain Python (celpy's types subclass the builtins, but its BoolType is an int)."""
    from celpy import celtypes

    if isinstance(value, (bool, celtypes.BoolType)):
        return bool(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value
