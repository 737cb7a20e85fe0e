"""The procedural grammar of Function-gym rules, by difficulty level.

A rule is a template over the slots ``p, q, r, s`` (a permutation of the variables ``a, b, c, d``, so
every rule uses all four) and integer coefficients ``k1, k2, ...``. Levels:

1. signed sums with small coefficients (``2*a - b + 3*c - d``);
2. one product term (``a*b - 2*c + d``, ``a*b*c - d``);
3. products of sums (``(a + 2*b) * (c - d)``, ``a*b - 3*c*d``);
4. division (``(a*b - c) / d``, ``a / b + 2*c*d``);
5. UserRL-like with powers and division (``(a - b)**2 + 3*c / d``, ``a**2*b / c - d``, ``a**b + c*d``,
   ``a*(b + c) / d``, ``(a + b)*c - d / 2``).

The grammar is public so that the scripted teacher can enumerate it as its hypothesis space.
"""

from __future__ import annotations

import ast
import copy
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from bao_fast.envs.arith import evaluate_array, parse_expression

VARIABLES: tuple[str, ...] = ("a", "b", "c", "d")
SLOTS: tuple[str, ...] = ("p", "q", "r", "s")
SIGNED: tuple[int, ...] = (-3, -2, -1, 1, 2, 3)
PERMUTATIONS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(4)))


@dataclass(frozen=True)
class RuleTemplate:
    """A family of rules: ``pattern`` over slots p, q, r, s and coefficients k1..kn drawn from ``coefs``.

    ``permute`` False keeps p, q, r, s = a, b, c, d (for patterns symmetric under permutation up to
    their coefficients, e.g. the linear one).
    """

    level: int
    pattern: str
    num_coefs: int = 0
    coefs: tuple[int, ...] = SIGNED
    permute: bool = True

    @cached_property
    def tree(self) -> ast.Expression:
        names = set(SLOTS) | {f"k{i + 1}" for i in range(self.num_coefs)}
        return parse_expression(self.pattern, names)

    def perms(self) -> tuple[tuple[int, ...], ...]:
        return PERMUTATIONS if self.permute else (PERMUTATIONS[0],)

    def instances(self) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
        """All (permutation, coefficients) pairs of this family."""
        return itertools.product(self.perms(), itertools.product(self.coefs, repeat=self.num_coefs))

    def sample(self, rng: random.Random) -> tuple[tuple[int, ...], tuple[int, ...]]:
        perm = rng.choice(self.perms())
        return perm, tuple(rng.choice(self.coefs) for _ in range(self.num_coefs))

    def render(self, perm: tuple[int, ...], coefs: tuple[int, ...]) -> str:
        """The concrete rule text over a, b, c, d, with ``1*x`` and ``+ -k*x`` simplified."""
        mapping: dict[str, ast.expr] = {slot: ast.Name(VARIABLES[i], ast.Load()) for slot, i in zip(SLOTS, perm)}
        mapping.update({f"k{i + 1}": ast.Constant(k) for i, k in enumerate(coefs)})
        tree = _Simplify().visit(_Substitute(mapping).visit(copy.deepcopy(self.tree)))
        return ast.unparse(ast.fix_missing_locations(tree))

    def evaluate_all(self, points: np.ndarray) -> np.ndarray:
        """Values of every instance (in :meth:`instances` order) at ``points`` float64[C, 4] -> [H, C]."""
        perms = np.asarray(self.perms(), dtype=np.int64)  # [P, 4]
        coefs = np.asarray(list(itertools.product(self.coefs, repeat=self.num_coefs)), dtype=np.float64)
        coefs = coefs.reshape(len(coefs), self.num_coefs)  # [K, n]
        env: dict[str, np.ndarray] = {}
        for j, slot in enumerate(SLOTS):
            env[slot] = points[:, perms[:, j]].T[:, None, :]  # [P, 1, C]
        for i in range(self.num_coefs):
            env[f"k{i + 1}"] = coefs[None, :, i, None]  # [1, K, 1]
        out = np.broadcast_to(evaluate_array(self.tree, env), (len(perms), len(coefs), points.shape[0]))
        return out.reshape(-1, points.shape[0])


class _Substitute(ast.NodeTransformer):
    def __init__(self, mapping: dict[str, ast.expr]) -> None:
        self.mapping = mapping

    def visit_Name(self, node: ast.Name) -> ast.expr:
        return copy.copy(self.mapping[node.id])


def _negated(node: ast.expr) -> ast.expr | None:
    """``-node`` written without a leading minus, when the leftmost factor of the product/quotient
    ``node`` is a negative literal or a unary minus; None otherwise."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return node.operand
    if isinstance(node, ast.Constant) and node.value < 0:
        return ast.Constant(-node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult | ast.Div):
        inner = _negated(node.left)
        if inner is not None:
            return ast.BinOp(inner, node.op, node.right)
    return None


class _Simplify(ast.NodeTransformer):
    """``1*x -> x``, ``-1*x -> -x``, ``y + -k*x -> y - k*x``, ``y - -k*x -> y + k*x``."""

    def visit_BinOp(self, node: ast.BinOp) -> ast.expr:
        self.generic_visit(node)
        if isinstance(node.op, ast.Mult) and isinstance(node.left, ast.Constant) and node.left.value in (1, -1):
            return node.right if node.left.value == 1 else ast.UnaryOp(ast.USub(), node.right)
        if isinstance(node.op, ast.Add | ast.Sub) and (negated := _negated(node.right)) is not None:
            return ast.BinOp(node.left, ast.Sub() if isinstance(node.op, ast.Add) else ast.Add(), negated)
        return node


TEMPLATES: tuple[RuleTemplate, ...] = (
    RuleTemplate(1, "k1*p + k2*q + k3*r + k4*s", 4, permute=False),
    RuleTemplate(2, "p*q + k1*r + k2*s", 2),
    RuleTemplate(2, "k1*p*q + r + k2*s", 2),
    RuleTemplate(2, "p*q*r + k1*s", 1),
    RuleTemplate(3, "(p + k1*q) * (r + k2*s)", 2),
    RuleTemplate(3, "p*q + k1*r*s", 1),
    RuleTemplate(3, "p*(q + r) + k1*s", 1),
    RuleTemplate(3, "p*(q - r) + k1*s", 1),
    RuleTemplate(4, "(p*q + k1*r) / s", 1),
    RuleTemplate(4, "p*q / (r + s)", 0),
    RuleTemplate(4, "(p + k1*q) / r + k2*s", 2),
    RuleTemplate(4, "p / q + k1*r*s", 1),
    RuleTemplate(5, "p**2 + k1*q*r + k2*s", 2),
    RuleTemplate(5, "(p + k1*q)**2 + k2*r / s", 2),
    RuleTemplate(5, "p**2*q / r + k1*s", 1),
    RuleTemplate(5, "p**2 + q**2 + k1*r*s", 1),
    RuleTemplate(5, "(p - q)**2 + k1*r / s", 1),
    # the shapes of UserRL's published examples: variable exponents, a quotient of a product, halves
    RuleTemplate(5, "p**q + k1*r*s", 1),
    RuleTemplate(5, "(p + q)**r + k1*s", 1),
    RuleTemplate(5, "p*(q + r) / s", 0),
    RuleTemplate(5, "(p + k1*q)*r + k2*s / 2", 2, coefs=(-3, -1, 1, 3)),
)
LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5)


def templates_for(level: int) -> tuple[RuleTemplate, ...]:
    """The templates of one difficulty level (1..5)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return tuple(t for t in TEMPLATES if t.level == level)
