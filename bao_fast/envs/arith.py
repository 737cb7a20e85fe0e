"""Safe arithmetic over a whitelisted Python-expression grammar (never ``eval``).

Grammar: numeric literals, variable names, unary ``+``/``-``, binary ``+ - * / **`` and parentheses.
Everything else (calls, attributes, subscripts, comparisons, strings, ...) is rejected at parse time.

Bounds, so that no input can hang or exhaust the process: expressions of at most
:data:`MAX_RULE_CHARS` characters and :data:`MAX_NODES` AST nodes; exponents of magnitude at most
:data:`MAX_EXPONENT`; every intermediate value of magnitude at most :data:`MAX_MAGNITUDE` (beyond 2**53
float64 stops representing integers exactly, so answers could not be checked to 1e-6 anyway).
"""

from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Mapping
from functools import lru_cache

import numpy as np

MAX_RULE_CHARS = 256
MAX_NODES = 128
MAX_EXPONENT = 64
MAX_MAGNITUDE = 1e15

_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)
_UNARYOPS = (ast.UAdd, ast.USub)


class RuleError(ValueError):
    """An expression is not allowed by the grammar or cannot be evaluated within the bounds."""


class UndefinedResult(RuleError):
    """The expression is mathematically undefined at this point (division by zero, 0 to a negative power,
    non-real power)."""


def parse_expression(expr: str, variables: frozenset[str] | set[str]) -> ast.Expression:
    """Parse and validate ``expr``; returns its AST. Raises :class:`RuleError` naming the offending part."""
    if not isinstance(expr, str):  # before the cache, which would raise TypeError on an unhashable value
        raise RuleError(f"expression must be a str, got {type(expr).__name__}")
    return _parse(expr, frozenset(variables))


@lru_cache(maxsize=4096)
def _parse(expr: str, variables: frozenset[str]) -> ast.Expression:
    if len(expr) > MAX_RULE_CHARS:
        raise RuleError(f"expression longer than {MAX_RULE_CHARS} characters")
    try:
        with warnings.catch_warnings():  # agent text such as "28and" would print Python's SyntaxWarning
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise RuleError(f"expression {expr!r} is not valid arithmetic: {exc}") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_NODES:
        raise RuleError(f"expression has more than {MAX_NODES} syntax nodes")
    for node in nodes:
        if isinstance(node, ast.Expression):
            continue
        if isinstance(node, ast.BinOp):
            if not isinstance(node.op, _BINOPS):
                raise RuleError(f"operator {type(node.op).__name__} is not allowed (only + - * / **)")
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, _UNARYOPS):
                raise RuleError(f"unary operator {type(node.op).__name__} is not allowed")
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RuleError(f"literal {value!r} is not a real number")
            if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
                raise RuleError(f"literal {value!r} is out of range (|x| <= {MAX_MAGNITUDE:g})")
        elif isinstance(node, ast.Name):
            if node.id not in variables:
                raise RuleError(f"name {node.id!r} is not allowed; variables are {sorted(variables)}")
        elif not isinstance(node, ast.operator | ast.unaryop | ast.expr_context):
            raise RuleError(f"syntax {type(node).__name__} is not allowed in an arithmetic expression")
    return tree


def _checked(value: int | float) -> int | float:
    if isinstance(value, complex):
        raise UndefinedResult("the result is not a real number")
    if isinstance(value, float) and math.isnan(value):
        raise UndefinedResult("the result is undefined")
    if abs(value) > MAX_MAGNITUDE:
        raise RuleError(f"intermediate result exceeds {MAX_MAGNITUDE:g} in magnitude")
    return value


def _power(base: int | float, exp: int | float) -> int | float:
    if abs(exp) > MAX_EXPONENT:
        raise RuleError(f"exponent {exp!r} exceeds {MAX_EXPONENT} in magnitude")
    if base == 0 and exp < 0:
        raise UndefinedResult("zero raised to a negative power")
    if base < 0 and not float(exp).is_integer():
        raise UndefinedResult("negative number raised to a non-integer power")
    # exp * log10|base| = log10|base**exp|: bounds |base| > 1 with exp > 0 and |base| < 1 with exp < 0 alike
    if base != 0 and exp * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE) + 1:
        raise RuleError(f"power exceeds {MAX_MAGNITUDE:g} in magnitude")
    if isinstance(exp, float) and exp.is_integer():
        exp = int(exp)
    return _checked(base**exp)


def _eval(node: ast.AST, env: Mapping[str, int | float]) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body, env)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, env)
        return -value if isinstance(node.op, ast.USub) else value
    assert isinstance(node, ast.BinOp)  # guaranteed by _parse
    left, right = _eval(node.left, env), _eval(node.right, env)
    if isinstance(node.op, ast.Add):
        return _checked(left + right)
    if isinstance(node.op, ast.Sub):
        return _checked(left - right)
    if isinstance(node.op, ast.Mult):
        return _checked(left * right)
    if isinstance(node.op, ast.Div):
        if right == 0:
            raise UndefinedResult("division by zero")
        return _checked(left / right)
    return _power(left, right)


def evaluate(expr: str, env: Mapping[str, int | float]) -> float:
    """Evaluate ``expr`` with variables bound by ``env`` (names -> real numbers); returns a finite float.

    Integer arithmetic stays exact until a division or a negative power. Raises :class:`UndefinedResult`
    (division by zero, ...) or :class:`RuleError` (grammar, bounds).
    """
    for name, value in env.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RuleError(f"variable {name!r} must be a finite real number, got {value!r}")
        if abs(value) > MAX_MAGNITUDE:
            raise RuleError(f"variable {name!r}={value!r} exceeds {MAX_MAGNITUDE:g} in magnitude")
    tree = _parse(expr, frozenset(env))
    return float(_eval(tree, env))


def evaluate_array(tree: ast.Expression, env: Mapping[str, np.ndarray]) -> np.ndarray:
    """Vectorised float64 evaluation of a parsed expression over broadcastable arrays.

    Used to test many hypotheses at once; undefined or out-of-bound entries (the cases where
    :func:`evaluate` raises) come back as NaN.
    """

    def rec(node: ast.AST) -> np.ndarray:
        if isinstance(node, ast.Expression):
            return rec(node.body)
        if isinstance(node, ast.Constant):
            return np.asarray(float(node.value))
        if isinstance(node, ast.Name):
            return np.asarray(env[node.id], dtype=np.float64)
        if isinstance(node, ast.UnaryOp):
            value = rec(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        assert isinstance(node, ast.BinOp)
        left, right = rec(node.left), rec(node.right)
        if isinstance(node.op, ast.Add):
            out = left + right
        elif isinstance(node.op, ast.Sub):
            out = left - right
        elif isinstance(node.op, ast.Mult):
            out = left * right
        elif isinstance(node.op, ast.Div):
            out = np.where(right == 0, np.nan, left / np.where(right == 0, 1.0, right))
        else:
            bad = (np.abs(right) > MAX_EXPONENT) | ((left == 0) & (right < 0))
            bad |= (left < 0) & (right != np.round(right))
            out = np.where(bad, np.nan, np.power(np.where(bad, 1.0, left), np.where(bad, 1.0, right)))
        return np.where(np.abs(out) > MAX_MAGNITUDE, np.nan, out)

    with np.errstate(all="ignore"):
        return rec(tree)


def format_number(value: float) -> str:
    """Shortest text that reads back as ``value``: integral values without a decimal point."""
    if math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))
