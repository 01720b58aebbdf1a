"""Conditions over a record's fields: the language of the `filter` transform and of a
processor's `where:`, e.g. `status >= 400 and path.startswith('/api')`.

A condition is one Python expression evaluated with simpleeval (no imports, no dunder
attributes): comparisons, `and/or/not`, `in`, arithmetic, string methods, `len`, `int`,
`float`, `str`, `abs`, `min`, `max`, `round`, lists/tuples/sets/dicts. Each field of the
record is a name. A record for which it fails (a name that is not a field, `None >= 500`,
`None.startswith(...)`) is a record error naming the field, never silently kept or
dropped.

`Condition.rows(rows)` evaluates it record by record. `Condition.mask(table)` evaluates it
over Arrow columns: the common forms (comparisons, `in` a literal list, `is None`, `and`,
`or`, `not`, `+ - * /`, `startswith`/`endswith`) compile to Arrow compute kernels. Nulls
propagate there, so a record whose answer depends on a null (`bytes is not None and bytes >
0` with bytes null) gets no columnar answer and is evaluated by the row rules instead, as
is every record of a condition that does not compile or whose kernels refuse the column
types: the answer is the row evaluation's in every case, only faster where it can be.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import simpleeval

FUNCTIONS: dict[str, Callable[..., Any]] = {
    "int": int, "float": float, "str": str, "bool": bool, "len": len, "abs": abs, "min": min, "max": max,
    "round": round,
}


def parse(expr: str) -> ast.Expr:
    """The parsed expression, or ValueError with a message fit for `validate`."""
    text = expr.strip()
    if not text:
        raise ValueError("the expression is empty")
    if "\n" in text:  # a YAML block scalar: the lines are one expression
        text = f"(\n{text}\n)"
    try:
        tree = ast.parse(text, mode="exec")
    except SyntaxError as exc:
        where = f" at column {exc.offset}" if exc.offset else ""
        raise ValueError(f"syntax error in {expr!r}{where}: {exc.msg}") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        raise ValueError(f"{expr!r} is not one expression (a condition such as \"status >= 500\")")
    return tree.body[0]


def names(node: ast.AST) -> list[str]:
    """The names an expression reads (the record's fields it uses), in order."""
    bound = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    read = [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
    return [n for n in dict.fromkeys(read) if n not in bound and n not in FUNCTIONS
            and n not in ("list", "tuple", "dict", "set")]


class Condition:
    """A parsed condition (ValueError from the constructor if it does not parse)."""

    def __init__(self, expression: str, label: str | None = None) -> None:
        self.expression = expression
        self.label = label or repr(expression)  # how error messages name it, e.g. "keep 'status >= 500'"
        self.parsed = parse(expression)
        self.names = names(self.parsed)
        self._evaluator = simpleeval.EvalWithCompoundTypes(functions=dict(FUNCTIONS))
        try:
            self._columnar: Callable[[pa.Table], Any] | None = _compile(self.parsed.value)
        except _NotColumnar:
            self._columnar = None

    def rows(self, rows: list[dict]) -> tuple[list[bool], dict[int, tuple[str, str | None]]]:
        """Per record, whether the condition holds; and per record it fails on, the
        message and the field to name."""
        evaluator, expr, parsed = self._evaluator, self.expression, self.parsed
        answers: list[bool] = []
        failed: dict[int, tuple[str, str | None]] = {}
        for i, row in enumerate(rows):
            evaluator.names = row
            try:
                answers.append(bool(evaluator.eval(expr, previously_parsed=parsed)))
            except Exception as exc:  # the expression on this record's data: a record error
                answers.append(False)
                failed[i] = self.explain(row, exc)
        return answers, failed

    def mask(self, table: pa.Table) -> tuple[pa.Array, dict[int, tuple[str, str | None]]]:
        """`rows` over an Arrow table: a boolean mask (false where it failed) and the failures."""
        answer = None
        if self._columnar is not None:
            try:
                answer = self._columnar(table)
            except (pa.ArrowException, TypeError, KeyError, OverflowError, ValueError):
                answer = None  # types the kernels refuse (or a field that is not there): the row rules say
            if isinstance(answer, pa.ChunkedArray):
                answer = answer.combine_chunks()
            if answer is not None and (not isinstance(answer, pa.Array) or answer.type != pa.bool_()):
                answer = None
        if answer is None:
            answers, failed = self.rows(table.to_pylist())
            return pa.array(answers, pa.bool_()), failed
        if answer.null_count == 0:
            return answer, {}
        unsure = pc.indices_nonzero(pc.is_null(answer))
        answers, failures = self.rows(table.take(unsure).to_pylist())
        failed = {}
        fixed = answer.to_pylist()
        for i, position in enumerate(unsure.to_pylist()):
            fixed[position] = answers[i]
            if i in failures:
                failed[position] = failures[i]
        return pa.array(fixed, pa.bool_()), failed

    def explain(self, row: dict, exc: Exception) -> tuple[str, str | None]:
        """What went wrong on `row`, and the field to name."""
        what = self.label
        if isinstance(exc, simpleeval.NameNotDefined):
            return f"cannot evaluate {what}: the record has no field {exc.name!r}", exc.name
        if isinstance(exc, simpleeval.InvalidExpression):  # its message repeats the expression
            reason = re.sub(r"\s*(?:in|for) expression '.*'$", "", str(exc), flags=re.S)
        else:
            reason = f"{type(exc).__name__}: {exc}"
        if len(reason) > 200:
            reason = reason[:200] + "…"
        missing = [n for n in self.names if n not in row]
        if missing:
            return f"cannot evaluate {what}: the record has no field {missing[0]!r} ({reason})", missing[0]
        nulls = [n for n in self.names if row.get(n) is None]
        if nulls:
            return f"cannot evaluate {what}: field {nulls[0]!r} is null ({reason})", nulls[0]
        field = self.names[0] if len(self.names) == 1 else None
        return f"cannot evaluate {what} ({reason})", field


# -- to Arrow kernels -------------------------------------------------------------------------


class _NotColumnar(Exception):
    """A form the columnar path does not take (the row rules evaluate it)."""


_COMPARE = {ast.Eq: pc.equal, ast.NotEq: pc.not_equal, ast.Lt: pc.less, ast.LtE: pc.less_equal,
            ast.Gt: pc.greater, ast.GtE: pc.greater_equal}
# Null-propagating (not Kleene) logic, so that an answer that depends on a null is unsure.
_BOOL = {ast.And: pc.and_, ast.Or: pc.or_}
_ARITHMETIC = {ast.Add: pc.add_checked, ast.Sub: pc.subtract_checked, ast.Mult: pc.multiply_checked}


def _compile(node: ast.AST) -> Callable[[pa.Table], Any]:
    """A function of a table giving the node's value (an Arrow array or a Python constant)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (bool, int, float, str)):
        value = node.value
        return lambda table: value
    if isinstance(node, ast.Name) and node.id not in FUNCTIONS:
        name = node.id
        return lambda table: table.column(name)
    if isinstance(node, ast.BoolOp) and type(node.op) in _BOOL:
        combine, parts = _BOOL[type(node.op)], [_compile(v) for v in node.values]

        def boolean(table: pa.Table) -> Any:
            result = _truth(parts[0](table))
            for part in parts[1:]:
                result = combine(result, _truth(part(table)))
            return result
        return boolean
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        inner = _compile(node.operand)
        return lambda table: pc.invert(_truth(inner(table)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _compile(node.operand)
        return lambda table: pc.negate_checked(inner(table))
    if isinstance(node, ast.BinOp) and (type(node.op) in _ARITHMETIC or isinstance(node.op, ast.Div)):
        left, right = _compile(node.left), _compile(node.right)
        if isinstance(node.op, ast.Div):  # Python's / is true division, and refuses a zero divisor
            def divide(table: pa.Table) -> Any:
                return pc.divide_checked(pc.cast(_array(left(table), table), pa.float64()),
                                         pc.cast(_array(right(table), table), pa.float64()))
            return divide
        kernel = _ARITHMETIC[type(node.op)]
        return lambda table: _numeric(kernel, left(table), right(table))
    if isinstance(node, ast.Compare):
        return _compare(node)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("startswith", "endswith") \
            and len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        target, text = _compile(node.func.value), node.args[0].value
        kernel = pc.starts_with if node.func.attr == "startswith" else pc.ends_with
        return lambda table: kernel(_strings(target(table)), pattern=text)
    raise _NotColumnar(ast.dump(node))


def _compare(node: ast.Compare) -> Callable[[pa.Table], Any]:
    """`a < b <= c` is `a < b and b <= c`; `x in (...)`, `x is None`, `x is not None`."""
    steps = []
    left = _compile(node.left)
    for i, (op, comparator) in enumerate(zip(node.ops, node.comparators)):
        if isinstance(op, (ast.Is, ast.IsNot)):
            if not (isinstance(comparator, ast.Constant) and comparator.value is None):
                raise _NotColumnar("is")
            side, negate = left, isinstance(op, ast.IsNot)
            steps.append(lambda table, side=side, negate=negate: _is_null(side(table), negate))
        elif isinstance(op, (ast.In, ast.NotIn)):
            if not isinstance(comparator, (ast.Tuple, ast.List, ast.Set)) or not all(
                    isinstance(e, ast.Constant) and isinstance(e.value, (int, float, str)) and not isinstance(e.value, bool)
                    for e in comparator.elts):
                raise _NotColumnar("in")
            values = [e.value for e in comparator.elts]
            side, negate = left, isinstance(op, ast.NotIn)
            steps.append(lambda table, side=side, values=values, negate=negate: _member(side(table), values, negate))
        elif type(op) in _COMPARE:
            right = _compile(comparator)
            kernel = _COMPARE[type(op)]
            steps.append(lambda table, a=left, b=right, kernel=kernel: _comparison(kernel, a(table), b(table)))
        else:
            raise _NotColumnar(type(op).__name__)
        if i + 1 < len(node.ops):  # a chain: the comparator is the next step's left side
            left = _compile(comparator)

    def compare(table: pa.Table) -> Any:
        result = steps[0](table)
        for step in steps[1:]:
            result = pc.and_(result, step(table))
        return result
    return compare


def _array(value: Any, table: pa.Table) -> Any:
    return value if isinstance(value, (pa.Array, pa.ChunkedArray)) else pa.repeat(pa.scalar(value), table.num_rows)


def _is_array(value: Any) -> bool:
    return isinstance(value, (pa.Array, pa.ChunkedArray))


def _kind(value: Any) -> str:
    """'number', 'string', 'boolean' or 'other', of a column or a constant."""
    if _is_array(value):
        t = value.type
        if pa.types.is_boolean(t):
            return "boolean"
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            return "number"
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "string"
        return "other"
    if isinstance(value, bool):
        return "boolean"
    return "number" if isinstance(value, (int, float)) else "string" if isinstance(value, str) else "other"


def _comparison(kernel: Callable, a: Any, b: Any) -> Any:
    """Only like with like, where Python and Arrow agree (strings compare by code point in
    both, as UTF-8 bytes do); anything else (a timestamp with a number, text with a
    number, which Python may refuse or call unequal) goes to the row rules."""
    if not (_is_array(a) or _is_array(b)):
        return pa.scalar(kernel(pa.scalar(a), pa.scalar(b)).as_py())
    ka, kb = _kind(a), _kind(b)
    if ka != kb or ka == "other":
        raise TypeError("unlike types")
    return kernel(a, b)


def _numeric(kernel: Callable, a: Any, b: Any) -> Any:
    if _kind(a) != "number" or _kind(b) != "number":  # str + str, bools: the row rules
        raise TypeError("not numbers")
    return kernel(a, b)


def _strings(value: Any) -> Any:
    if _kind(value) != "string" or not _is_array(value):
        raise TypeError("not text")
    return value


def _member(value: Any, values: list, negate: bool) -> Any:
    kind = _kind(value)
    if not _is_array(value) or any(_kind(v) != kind for v in values) or kind not in ("number", "string"):
        raise TypeError("unlike types")
    # is_in with nulls kept null: an answer that depends on a null is unsure.
    found = pc.if_else(pc.is_null(value), pa.scalar(None, pa.bool_()),
                       pc.is_in(value, value_set=pa.array(values, value.type if kind == "string" else None)))
    return pc.invert(found) if negate else found


def _is_null(value: Any, negate: bool) -> Any:
    if not _is_array(value):
        raise TypeError("a constant")
    return pc.is_valid(value) if negate else pc.is_null(value)


def _truth(value: Any) -> Any:
    """A boolean column as it is; anything else (Python truthiness of numbers, text) is
    the row rules' to judge."""
    if _is_array(value) and pa.types.is_boolean(value.type):
        return value
    raise TypeError("not a boolean")

