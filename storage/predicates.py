"""Table predicates built from typed, validated key values, never from raw text.

A Delta ``replace`` deletes every row its predicate matches, so a predicate spliced from a value
a file supplied (``night = 'x' OR true OR night = ''``) can delete a whole table. Every predicate
of the lake is built here: each column name must be a plain identifier, and each value is checked
by its column's rule before it is written as a literal:

========================  =================================================================
column                    accepted values
========================  =================================================================
``night``                 a real calendar date ``YYYY-MM-DD``
``camera``                an arm letter and a spectrograph number (``b1``, ``r16``)
``expid``                 an integer from 0 to 2**63 - 1
any other integer value   an integer from -2**63 to 2**63 - 1 (never a bool)
any other string value    a plain identifier: letters, digits and ``._:+-``, at most 128
========================  =================================================================

Anything else raises :class:`ValueError` with one sentence; nothing is escaped or quoted away,
because nothing that needs escaping is accepted.

Examples
--------
>>> key_predicate({"night": "2026-11-21", "expid": 7})
"night = '2026-11-21' AND expid = 7"
>>> keys_predicate([{"night": "2026-11-21", "camera": "b1", "expid": 7},
...                 {"night": "2026-11-21", "camera": "b1", "expid": 5}])
"(night = '2026-11-21' AND camera = 'b1' AND expid IN (5, 7))"
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from fiberlake.schemas.header import INT64_MAX, check_camera, check_expid, check_int, check_night, check_token

KeyValue = str | int
COLUMN_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")

_RULES: dict[str, Callable[[object], KeyValue]] = {
    "night": check_night,
    "camera": check_camera,
    "expid": check_expid,
}


def literal(column: str, value: object) -> str:
    """SQL literal of ``value`` for ``column``, after checking it by the column's rule.

    Raises
    ------
    ValueError
        If the column name is not a plain lower-case identifier or the value breaks its rule.
    """
    if not isinstance(column, str) or not COLUMN_PATTERN.match(column):
        raise ValueError(f"column name {str(column)[:40]!r} is not a plain lower-case identifier")
    rule = _RULES.get(column)
    if rule is not None:
        value = rule(value)
    elif isinstance(value, str):
        value = check_token(value, column)
    else:
        value = check_int(value, column, -INT64_MAX - 1, INT64_MAX)
    return f"'{value}'" if isinstance(value, str) else str(int(value))


def key_predicate(keys: Mapping[str, KeyValue]) -> str:
    """Predicate selecting the rows whose columns equal ``keys`` (joined with AND).

    Parameters
    ----------
    keys : mapping of str to str or int
        Column name to value, e.g. ``{"night": "2026-11-21", "expid": 7}``.

    Raises
    ------
    ValueError
        If ``keys`` is empty or any column or value is refused (see the module docstring).
    """
    if not keys:
        raise ValueError("a key predicate needs at least one column (an empty one would match every row)")
    return " AND ".join(f"{column} = {literal(column, value)}" for column, value in keys.items())


def keys_predicate(keys: Iterable[Mapping[str, KeyValue]]) -> str:
    """Predicate selecting the rows equal to any of ``keys`` (OR of groups).

    Every mapping must name the same columns, in the same order. Keys that agree on all columns
    but the last are grouped into one ``last IN (...)`` term.

    Raises
    ------
    ValueError
        If ``keys`` is empty, the mappings name different columns, or any value is refused.
    """
    keys = list(keys)
    if not keys:
        raise ValueError("a key predicate needs at least one key (an empty one would match every row)")
    columns = tuple(keys[0])
    if not columns:
        raise ValueError("a key predicate needs at least one column (an empty one would match every row)")
    groups: dict[tuple[str, ...], set[str]] = {}
    for key in keys:
        if tuple(key) != columns:
            raise ValueError(f"every key must name the columns {list(columns)}, in that order; one names {list(key)}")
        head = tuple(f"{c} = {literal(c, key[c])}" for c in columns[:-1])
        groups.setdefault(head, set()).add(literal(columns[-1], key[columns[-1]]))
    last = columns[-1]
    terms = []
    for head, values in sorted(groups.items()):
        tail = f"{last} = {next(iter(values))}" if len(values) == 1 else \
            f"{last} IN ({', '.join(sorted(values, key=_order))})"
        terms.append("(" + " AND ".join(head + (tail,)) + ")")
    return " OR ".join(terms)


def _order(text: str) -> tuple:
    return (0, int(text), "") if not text.startswith("'") else (1, 0, text)
