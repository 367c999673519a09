"""Verifier for the built-in countdown task: reach the target with the given numbers.

A problem gives numbers (``numbers`` column) and a ``target``. The response's answer is the
arithmetic expression just before its first ``=`` (``"3 * 5 + 4 = 19"`` -> ``3 * 5 + 4``), or, when it
has no ``=``, the expression that ends its first line. It earns 1.0 when it

* uses every given number exactly once (the same multiset: ``[6, 6, 4]`` needs two 6s and one 4),
  and no other number;
* uses only ``+``, ``-``, ``*`` (``×`` and the minus sign ``−`` are read as ``*`` and ``-``) and
  parentheses, with the usual precedence; no unary minus, no division, no digit concatenation;
* evaluates to ``target``.

What the response claims after ``=`` is not read, so only one expression is ever judged: listing
many attempts earns nothing beyond the first. Expressions are parsed here (never ``eval``); the
numbers are checked before anything is computed, so a response cannot make the verifier compute
with numbers of its own choosing.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

MAX_EXPRESSION_CHARS = 200
_EXPR_CHARS = frozenset("0123456789+-*() \t")
_TOKEN = re.compile(r"\s*(\d+|[+\-*()])")


class _Invalid(ValueError):
    pass


def extract_expression(text: str) -> str | None:
    """The expression a response answers with (see the module docstring), or ``None``."""
    text = text.replace("\u00d7", "*").replace("\u2212", "-").lstrip()
    head = text.split("=", 1)[0] if "=" in text else text.split("\n", 1)[0]
    start = len(head)
    while start > 0 and head[start - 1] in _EXPR_CHARS:  # the run of expression characters that ends it
        start -= 1
    expr = head[start:].strip().lstrip(")").strip()
    return expr or None


def _tokens(expr: str) -> list[str]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            if expr[pos:].strip():
                raise _Invalid(f"unexpected {expr[pos]!r}")
            break
        out.append(m.group(1))
        pos = m.end()
    return out


def _parse(tokens: list[str]):
    """Recursive descent over ``expr := term (('+'|'-') term)*``, ``term := atom ('*' atom)*``,
    ``atom := INT | '(' expr ')'``; returns a nested tuple tree."""
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise _Invalid("unexpected end")
        pos += 1
        return tokens[pos - 1]

    def expr(depth: int):
        node = term(depth)
        while peek() in ("+", "-"):
            node = (take(), node, term(depth))
        return node

    def term(depth: int):
        node = atom(depth)
        while peek() == "*":
            take()
            node = ("*", node, atom(depth))
        return node

    def atom(depth: int):
        tok = take()
        if tok == "(":
            if depth > 16:
                raise _Invalid("nested too deeply")
            node = expr(depth + 1)
            if take() != ")":
                raise _Invalid("unbalanced parentheses")
            return node
        if tok.isdigit():
            if len(tok) > 1 and tok[0] == "0":
                raise _Invalid(f"leading zero in {tok}")
            return int(tok)
        raise _Invalid(f"unexpected {tok!r}")

    tree = expr(0)
    if pos != len(tokens):
        raise _Invalid(f"unexpected {tokens[pos]!r}")
    return tree


def _leaves(node) -> list[int]:
    return [node] if isinstance(node, int) else _leaves(node[1]) + _leaves(node[2])


def _value(node) -> int:
    if isinstance(node, int):
        return node
    op, left, right = node
    a, b = _value(left), _value(right)
    return a + b if op == "+" else a - b if op == "-" else a * b


def evaluate(expr: str) -> int:
    """The value of an expression of non-negative integers, + - * and parentheses; ``ValueError`` if malformed."""
    return _value(_parse(_tokens(expr)))


def check_expression(expr: str, numbers: list[int], target: int) -> bool:
    """Whether ``expr`` uses exactly ``numbers`` (each once) with + - * and parentheses and equals ``target``."""
    if len(expr) > MAX_EXPRESSION_CHARS:
        return False
    try:
        tree = _parse(_tokens(expr))
    except _Invalid:
        return False
    if Counter(_leaves(tree)) != Counter(int(n) for n in numbers):
        return False
    return _value(tree) == int(target)


def countdown_reward(
    prompts: list[str], completions: list[str], numbers: list[list[int]], target: list[int], **_: Any
) -> list[float]:
    """1.0 when the completion's expression reaches ``target`` with exactly ``numbers``, else 0.0."""
    out = []
    for completion, nums, goal in zip(completions, numbers, target):
        expr = extract_expression(completion)
        out.append(1.0 if expr is not None and check_expression(expr, nums, goal) else 0.0)
    return out
