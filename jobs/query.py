"""Query the lake: every table as a Polars LazyFrame, and SQL over all of them.

Three guarantees for the query prompt (``fiberlake query``):

* **Every table is there.** A table nothing was written to yet reads as empty, with its declared
  schema (lakes are created with every table; older lakes are tolerated).
* **Queries stay inside the lake.** :func:`check_query` reads the SQL before Polars does and refuses
  anything but one ``SELECT``, table functions (``read_csv('/etc/passwd')``, ``read_parquet`` ...),
  quoted paths and any table name that is not one of the lake's tables, a ``WITH`` name, or a file
  the user named with ``--table NAME=PATH``.
* **Time travel by table.** ``--as-of`` takes a time (every table as it was then), a version (each
  table at its newest version not above it) or ``TABLE@VERSION`` / ``TABLE@TIME`` for one table;
  see :func:`parse_as_of`. Every refusal is a sentence that says which versions can be read.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
from deltalake.exceptions import DeltaError

from fiberlake.schemas.tables import ARRAY_COLUMNS, SCHEMAS, TABLE_DESCRIPTIONS
from fiberlake.storage.layout import Lake
from fiberlake.storage.tables import TableStore, TableVersions


class QueryRefused(ValueError):
    """A query the prompt does not run (it would leave the lake, or change something)."""


class AsOfError(ValueError):
    """An ``--as-of`` value that names no readable state of the lake."""


# --- --as-of ---------------------------------------------------------------------------------------
When = int | dt.datetime


@dataclass(frozen=True)
class AsOf:
    """A parsed ``--as-of``: a value for every table, and values for named tables.

    Parameters
    ----------
    default : int or datetime, optional
        For every table not named in ``tables``: a time (the table as it was then) or a version
        (the table at its newest version not above it).
    tables : mapping of str to int or datetime
        ``TABLE@WHEN`` items: that table at exactly that version, or as it was at that time.
    text : str
        The value as written, for messages.
    """

    default: When | None = None
    tables: Mapping[str, When] = field(default_factory=dict)
    text: str = ""


_VERSION = re.compile(r"^[+-]?\d+$")


def _parse_when(text: str, whole: str) -> When:
    if _VERSION.match(text):
        return int(text)
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise AsOfError(f"--as-of {whole}: {text!r} is neither a table version (0, 1, ...) nor an ISO 8601 time "
                        f"such as 2026-11-21T18:00:00 (UTC unless a zone is given)") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def parse_as_of(value: AsOf | When | str | None) -> AsOf | None:
    """An ``--as-of`` value as an :class:`AsOf` (None: the latest state).

    Accepted: an int (a version for every table), a datetime (naive means UTC), or text
    ``ITEM[,ITEM...]`` where each item is ``N``, ``TIME``, ``TABLE@N`` or ``TABLE@TIME``, with at
    most one item without a table name.

    Raises
    ------
    AsOfError
        For text that is none of these, or a table the lake does not have.
    """
    if value is None or isinstance(value, AsOf):
        return value
    if isinstance(value, int):
        return AsOf(default=value, text=str(value))
    if isinstance(value, dt.datetime):
        when = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        return AsOf(default=when, text=when.isoformat())
    whole = str(value).strip()
    default: When | None = None
    tables: dict[str, When] = {}
    for item in filter(None, (part.strip() for part in whole.split(","))):
        name, at, when = item.rpartition("@")
        if not at:
            if default is not None:
                raise AsOfError(f"--as-of {whole}: give at most one version or time without a table name "
                                f"(name the others, e.g. spectra@3)")
            default = _parse_when(when, whole)
        elif name not in SCHEMAS:
            raise AsOfError(f"--as-of {whole}: there is no table {name!r}; tables: {', '.join(SCHEMAS)}")
        elif name in tables:
            raise AsOfError(f"--as-of {whole}: table {name} is given twice")
        else:
            tables[name] = _parse_when(when, whole)
    if default is None and not tables:
        raise AsOfError("--as-of is empty; give a version, a time, or TABLE@VERSION")
    return AsOf(default, tables, whole)


_EMPTY = -1
"""Resolved version of a table that did not exist at the asked time: read as empty."""


def _fmt_ms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="seconds")


def _check_readable(history: TableVersions, version: int, asked: str) -> int:
    if version < history.first or version > history.latest:
        raise AsOfError(f"--as-of {asked}: table {history.name} has no version {version}; it has {history.span()}")
    if version < history.readable_from:
        raise AsOfError(f"--as-of {asked}: version {version} of table {history.name} refers to data files that "
                        f"'fiberlake vacuum' removed (it keeps only what versions younger than its retention need); "
                        f"it can read {history.span()}")
    return version


def _at_time(history: TableVersions, when: dt.datetime, asked: str) -> int:
    version = history.at_time(when.timestamp() * 1000)
    if version is None:
        return _EMPTY
    if version < history.readable_from:
        since = _fmt_ms(history.time_of(history.readable_from))
        raise AsOfError(f"--as-of {asked}: table {history.name} as it was then refers to data files that "
                        f"'fiberlake vacuum' removed; it can be read as of {since} or later "
                        f"({history.span()})")
    return version


def resolve_as_of(store: TableStore, as_of: AsOf | When | str | None) -> dict[str, int | None]:
    """The version of every table that ``as_of`` asks for.

    Returns
    -------
    dict of str to int or None
        Table name to a version, None for the latest, or -1 for a table that did not exist
        then (read as empty).

    Raises
    ------
    AsOfError
        A sentence saying what can be read instead: negative or missing versions, a time before
        the lake existed, versions whose files a vacuum removed.
    """
    spec = parse_as_of(as_of)
    if spec is None:
        return {name: None for name in SCHEMAS}
    histories = {name: store.versions(name) for name in SCHEMAS if store.exists(name)}
    _check_lake_times(spec, histories)
    if isinstance(spec.default, int):
        _check_default_version(spec, histories)
    out: dict[str, int | None] = {}
    for name in SCHEMAS:
        when = spec.tables.get(name, spec.default)
        history = histories.get(name)
        if when is None:
            out[name] = None if history else _EMPTY
        elif history is None:
            if name in spec.tables:
                raise AsOfError(f"--as-of {spec.text}: table {name} has no versions yet (nothing was ever "
                                f"written to it)")
            out[name] = _EMPTY
        elif isinstance(when, dt.datetime):
            out[name] = _at_time(history, when, spec.text)
        elif name in spec.tables:
            out[name] = _check_readable(history, when, spec.text)
        else:
            out[name] = _check_readable(history, min(when, history.latest), spec.text)
    return out


def _check_lake_times(spec: AsOf, histories: Mapping[str, TableVersions]) -> None:
    times = [w for w in [spec.default, *spec.tables.values()] if isinstance(w, dt.datetime)]
    if not times or not histories:
        return
    born = min(h.created_ms for h in histories.values())
    for when in times:
        if when.timestamp() * 1000 < born:
            raise AsOfError(f"--as-of {spec.text}: {when.isoformat()} is before the lake existed (its first "
                            f"commit was at {_fmt_ms(born)}); give that time or a later one")


def _check_default_version(spec: AsOf, histories: Mapping[str, TableVersions]) -> None:
    version = spec.default
    assert isinstance(version, int)
    if version < 0:
        raise AsOfError(f"--as-of {spec.text}: versions count from 0 (every table's first commit is version 0)")
    if histories and version > max(h.latest for h in histories.values()):
        newest = max(histories.values(), key=lambda h: h.latest)
        raise AsOfError(f"--as-of {spec.text}: no table has version {version}; the newest is version "
                        f"{newest.latest} of table {newest.name} ('fiberlake tables' lists every table's versions)")


# --- tables as LazyFrames ----------------------------------------------------------------------------
def _empty(name: str) -> pl.LazyFrame:
    return pl.LazyFrame(schema=pl.from_arrow(SCHEMAS[name].empty_table()).schema)


def _nwave(lake: Lake) -> int | None:
    if not lake.describe():
        return None
    from fiberlake.schemas.instrument import get_instrument

    inst = get_instrument(lake.instrument)
    return inst.wave_grid(inst.arms[0].name)[2]


def scan_tables(lake: Lake, *, as_of: AsOf | When | str | None = None, arrays: bool = True) -> dict[str, pl.LazyFrame]:
    """Every table of ``lake`` as a Polars LazyFrame.

    Parameters
    ----------
    lake : Lake
        The lake.
    as_of : AsOf, int, datetime or str, optional
        Time travel (:func:`parse_as_of`). A time reads every table as it was at that moment, a
        consistent view of the whole lake; an integer N reads each table at its newest version
        not above N; ``TABLE@N`` one table at exactly version N. Default: latest.
    arrays : bool
        Present per-wavelength list columns as fixed-size ``pl.Array`` (the instrument's ``nwave``).

    Returns
    -------
    dict of str to polars.LazyFrame
        Keyed by table name; every table of the schema, empty (with its schema) where nothing
        was written yet or the table did not exist at the asked time.

    Raises
    ------
    AsOfError
        If ``as_of`` names no readable state (a sentence saying what can be read).
    """
    store = TableStore(lake.root / "tables")
    versions = resolve_as_of(store, as_of)
    nwave = _nwave(lake) if arrays else None
    frames: dict[str, pl.LazyFrame] = {}
    for name, schema in SCHEMAS.items():
        version = versions[name]
        lf = _empty(name) if version == _EMPTY else store.scan(name, version=version)
        if nwave is not None:
            casts = [pl.col(c).cast(pl.Array(pl.from_arrow(schema.empty_table()).schema[c].inner, nwave))
                     for c in ARRAY_COLUMNS if c in schema.names]
            if casts:
                lf = lf.with_columns(casts)
        frames[name] = lf
    return frames


# --- views -----------------------------------------------------------------------------------------------
_SPECTRUM_KEY = ("night", "expid", "camera", "fiber", "extraction")


def _on(left: str, right: str, columns: Iterable[str]) -> str:
    return " AND ".join(f"{right}.{c} = {left}.{c}" for c in columns)


def _labels_target_sql() -> str:
    """``labels_target``: the exposures of a night combined per target and method (mean probabilities)."""
    from fiberlake.schemas.tables import LABEL_CLASSES

    cols = [f"p_{c.lower()}" for c in LABEL_CLASSES]
    greatest = "GREATEST(" + ", ".join(cols) + ")"
    case = "CASE " + " ".join(f"WHEN {p} >= {greatest} THEN '{c}'" for p, c in zip(cols, LABEL_CLASSES)) + " END"
    means = ", ".join(f"AVG({p}) AS {p}" for p in cols)
    inner = (f"SELECT night, targetid, method, model_id, COUNT(*) AS n_exp, MAX(snr_r) AS max_snr_r, {means} "
             "FROM labels WHERE class IS NOT NULL GROUP BY night, targetid, method, model_id")
    return f"SELECT t.*, {case} AS class FROM ({inner}) AS t"


VIEWS: dict[str, tuple[str, str]] = {
    "spectra_full": (
        "spectra with their fiber map (ra, dec, mag), metrics, reduction marker and raw frame (exposures), "
        "joined on the full key",
        "SELECT s.*, f.ra, f.dec, f.mag, m.snr_eq15, m.der_snr, m.median_snr, m.median_flux, m.frac_masked, "
        "m.wave_rms, m.wave_nlines, m.trace_rms, m.trace_offset, m.sky_chi2, r.file_version, r.calib_night, "
        "r.calib_id, r.config_hash, r.seconds, e.exptime, e.mjd_obs, e.date_obs, e.file_sha256, e.raw_path "
        "FROM spectra s "
        f"LEFT JOIN fibermap f ON {_on('s', 'f', ('night', 'expid', 'spectrograph', 'fiber', 'targetid'))} "
        f"LEFT JOIN metrics m ON {_on('s', 'm', _SPECTRUM_KEY + ('spectrograph', 'targetid'))} "
        f"LEFT JOIN reductions r ON {_on('s', 'r', ('night', 'expid', 'camera', 'extraction'))} "
        f"LEFT JOIN exposures e ON {_on('s', 'e', ('night', 'expid', 'camera'))} AND e.file_version = r.file_version",
    ),
    "metrics_full": (
        "metrics with their fiber map (ra, dec, mag) and raw frame (exptime, mjd_obs): S/N against magnitude "
        "without reading a pixel",
        "SELECT m.*, f.ra, f.dec, f.mag, r.file_version, r.calib_night, r.seconds, e.exptime, e.mjd_obs, e.obstype "
        "FROM metrics m "
        f"LEFT JOIN fibermap f ON {_on('m', 'f', ('night', 'expid', 'spectrograph', 'fiber', 'targetid'))} "
        f"LEFT JOIN reductions r ON {_on('m', 'r', ('night', 'expid', 'camera', 'extraction'))} "
        f"LEFT JOIN exposures e ON {_on('m', 'e', ('night', 'expid', 'camera'))} AND e.file_version = r.file_version",
    ),
    "joined_full": (
        "flux-calibrated spectra (arms joined) with their fiber map (ra, dec, mag)",
        "SELECT j.*, f.ra, f.dec, f.mag FROM joined j "
        f"LEFT JOIN fibermap f ON {_on('j', 'f', ('night', 'expid', 'spectrograph', 'fiber', 'targetid'))}",
    ),
    "frames_full": (
        "raw frames (exposures) with their typing (frames: header type, pixel type, confidence, type used)",
        "SELECT e.*, t.type_pixels, t.confidence, t.flips_agreeing, t.type_agree, t.type_used, t.routed_by, "
        "t.type_flag, t.untypable, t.model_id FROM exposures e "
        f"LEFT JOIN frames t ON {_on('e', 't', ('night', 'expid', 'camera', 'file_version'))}",
    ),
    "labels_target": (
        "stellar class per target, night and method: the class probabilities of its labelled exposures "
        "averaged (n_exp of them), the class their largest",
        _labels_target_sql(),
    ),
}
"""Named SQL views users would otherwise write every time: name to (what it holds, its SELECT).

They are registered beside the tables in every query (``SELECT * FROM spectra_full WHERE ...``),
read the tables as of the same ``--as-of``, and cost nothing until used; Polars pushes a query's
column choice and filters into them, so ``SELECT targetid, snr_eq15 FROM spectra_full`` reads no
flux."""


def register_views(ctx: pl.SQLContext) -> dict[str, pl.LazyFrame]:
    """Register :data:`VIEWS` in ``ctx`` (which holds the tables) and return them as LazyFrames."""
    views = {}
    for name, (_, text) in VIEWS.items():
        views[name] = ctx.execute(text, eager=False)
        ctx.register(name, views[name])
    return views


def user_tables(specs: Iterable[str]) -> dict[str, pl.LazyFrame]:
    """Files a user names for one query: ``NAME=PATH`` with a ``.parquet``, ``.csv`` or ``.arrow``/``.ipc`` file.

    Raises
    ------
    QueryRefused
        For a malformed item, a name that is a lake table, or a file that is not there.
    """
    readers = {".parquet": pl.scan_parquet, ".csv": pl.scan_csv, ".arrow": pl.scan_ipc, ".ipc": pl.scan_ipc}
    out: dict[str, pl.LazyFrame] = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        name = name.strip()
        if not eq or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name) or not path:
            raise QueryRefused(f"--table {spec!r} is not NAME=PATH (NAME: letters, digits, _)")
        if name.lower() in SCHEMAS or name.lower() in VIEWS or name.lower() in {n.lower() for n in out}:
            raise QueryRefused(f"--table {spec!r}: {name} is already a table; choose another name")
        reader = readers.get(Path(path).suffix.lower())
        if reader is None:
            raise QueryRefused(f"--table {spec!r}: the file must end in .parquet, .csv, .arrow or .ipc")
        if not Path(path).is_file():
            raise QueryRefused(f"--table {spec!r}: there is no file {path}")
        out[name] = reader(path)
    return out


def sql(lake: Lake, query: str, *, as_of: AsOf | When | str | None = None,
        extra: Mapping[str, pl.LazyFrame] | None = None) -> pl.DataFrame:
    """Run one SQL ``SELECT`` over every table and view (:data:`VIEWS`) of ``lake`` (Polars SQL), and nothing outside it.

    Parameters
    ----------
    lake : Lake
        The lake.
    query : str
        One ``SELECT`` (or ``WITH ... SELECT``) statement; see :func:`check_query`.
    as_of : AsOf, int, datetime or str, optional
        Time travel (:func:`parse_as_of`).
    extra : mapping of str to polars.LazyFrame, optional
        More frames the query may name (``--table NAME=PATH``, :func:`user_tables`).

    Raises
    ------
    QueryRefused
        If the query reads files, names a table that is not there, or is not a ``SELECT``.
    AsOfError
        If ``as_of`` names no readable state.

    Examples
    --------
    >>> sql(Lake.open("lake"), "SELECT objtype, median(snr_eq15) FROM metrics GROUP BY objtype")  # doctest: +SKIP
    """
    frames = {**scan_tables(lake, as_of=as_of, arrays=False), **(extra or {})}
    ctx = pl.SQLContext(frames=frames, eager=False)
    views = register_views(ctx)
    check_query(query, [*frames, *views])
    try:
        return ctx.execute(query).collect()
    except FileNotFoundError as err:
        raise LookupError(_missing_file(lake, err, as_of)) from None
    except DeltaError:
        raise LookupError(f"a table's log no longer holds the state asked for (--as-of {as_of}); 'fiberlake tables' "
                          f"lists the versions each table can read") from None


_PREDICATE_STOP = ("SELECT", "FROM", "WHERE", "GROUP", "HAVING", "ORDER", "LIMIT", "OFFSET", "UNION", "EXCEPT",
                   "INTERSECT", "WINDOW", "QUALIFY", "FETCH", "JOIN", "WITH", "INTO")


def check_predicate(predicate: str) -> None:
    """Refuse a ``WHERE`` predicate that is more than one boolean expression.

    Subqueries in parentheses are allowed (``targetid IN (SELECT targetid FROM coadds WHERE mag < 16)``);
    outside parentheses the predicate may not close a parenthesis it did not open, end the statement
    or start another clause (``1=1 UNION SELECT ...``, ``true ORDER BY 1``). The whole query it becomes
    is then checked by :func:`check_query` as any other.

    Raises
    ------
    QueryRefused
        With one sentence saying why.
    """
    tokens = _tokens(predicate)
    if not tokens:
        raise QueryRefused("the --where predicate is empty; give a condition such as \"night = '2026-11-21'\"")
    depth = 0
    for tok in tokens:
        depth += {"(": 1, ")": -1}.get(tok.text, 0)
        if depth < 0:
            raise QueryRefused(f"the --where predicate closes a parenthesis it did not open: {predicate!r}")
        if tok.text == ";":
            raise QueryRefused("the --where predicate is one condition, without ';'")
        if depth == 0 and tok.is_word(*_PREDICATE_STOP):
            raise QueryRefused(f"the --where predicate is one condition (a WHERE clause), not {tok.text.upper()} ...; "
                               f"put subqueries in parentheses")
    if depth:
        raise QueryRefused(f"the --where predicate has a parenthesis that is never closed: {predicate!r}")


def select_where(lake: Lake, source: str, predicate: str, columns: Iterable[str], *,
                 as_of: AsOf | When | str | None = None) -> pl.DataFrame:
    """``SELECT columns FROM source WHERE (predicate)`` through the checked path of :func:`sql`.

    Parameters
    ----------
    lake : Lake
    source : str
        A table or view (:data:`VIEWS`).
    predicate : str
        The user's condition, SQL; see :func:`check_predicate`.
    columns : iterable of str
        Columns to return (names of ``source``).
    as_of : optional
        Time travel (:func:`parse_as_of`).

    Raises
    ------
    QueryRefused
        For a predicate that is not one condition, reads outside the lake, or is not valid SQL
        over ``source`` (one sentence, with Polars' reason).
    """
    if source not in SCHEMAS and source not in VIEWS:
        raise LookupError(f"there is no table or view {source!r}")
    check_predicate(predicate)
    query = f"SELECT {', '.join(columns)} FROM {source} WHERE ({predicate})"
    try:
        return sql(lake, query, as_of=as_of)
    except pl.exceptions.PolarsError as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise QueryRefused(f"--where {predicate!r} is not a valid condition on {source}: {reason}") from None


def _missing_file(lake: Lake, err: FileNotFoundError, as_of: AsOf | When | str | None) -> str:
    """A sentence for a data file that a table version refers to but that is gone."""
    match = re.search(r"[\w.=-]+\.parquet", str(err))
    gone = match.group() if match else "?"
    store = TableStore(lake.root / "tables")
    for name, version in resolve_as_of(store, as_of).items():
        if version == _EMPTY or not any(uri.endswith(gone) for uri in store.delta(name, version).file_uris()):
            continue
        history = store.versions(name)
        if (history.latest if version is None else version) < history.readable_from:
            return (f"table {name} refers to a data file that 'fiberlake vacuum' removed (it keeps only what "
                    f"versions younger than its retention need); it can read {history.span()}")
        return (f"table {name} refers to a data file that is missing ({gone}); no 'fiberlake vacuum' removed it, "
                f"so the table's folder was changed from outside fiberlake")
    return f"a data file the query needs is gone ({gone})"


# --- the query guard ------------------------------------------------------------------------------------
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>--[^\n]*)
  | (?P<block>/\*)
  | (?P<estring>[eE]'(?:[^'\\]|\\.|'')*')
  | (?P<string>(?:[nNxXbB]|[uU]&)?'(?:[^']|'')*')
  | (?P<dollar>\$(?:[^\W\d]\w*)?\$)
  | (?P<param>\$\d+)
  | (?P<qident>"(?:[^"]|"")*"|`(?:[^`]|``)*`)
  | (?P<ident>(?:[^\W\d]|[#@])[\w$#@]*)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<punct>[(),;.])
  | (?P<op>.)
""", re.X | re.S)


@dataclass(frozen=True)
class _Tok:
    kind: str   # ident, qident, string, number, punct, op
    text: str

    @property
    def name(self) -> str:
        """Identifier value (unquoted), lower case."""
        if self.kind == "qident":
            return self.text[1:-1].replace(self.text[0] * 2, self.text[0]).lower()
        return self.text.lower()

    def is_word(self, *words: str) -> bool:
        return self.kind == "ident" and self.text.upper() in words

    @property
    def is_name(self) -> bool:
        return self.kind in ("ident", "qident")


def _skip_block(query: str, start: int) -> int:
    depth, i = 0, start
    while i < len(query):
        if query.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif query.startswith("*/", i):
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    raise QueryRefused("the query has a /* comment that is never closed")


def _tokens(query: str) -> list[_Tok]:
    """Polars SQL's tokens (its parser's rules for strings, quoted names and nested comments)."""
    out: list[_Tok] = []
    i = 0
    while i < len(query):
        match = _TOKEN.match(query, i)
        kind = match.lastgroup
        if kind == "block":
            i = _skip_block(query, i)
            continue
        if kind == "dollar":
            end = query.find(match.group(), match.end())
            if end < 0:
                raise QueryRefused(f"the query has a {match.group()} string that is never closed")
            out.append(_Tok("string", query[i:end + len(match.group())]))
            i = end + len(match.group())
            continue
        if kind == "op" and match.group() in "'\"`":
            raise QueryRefused(f"the query has a {match.group()} quote that is never closed")
        if kind not in ("space", "comment"):
            out.append(_Tok({"estring": "string"}.get(kind, kind), match.group()))
        i = match.end()
    return out


_FILE_FUNCTION = re.compile(r"^(read|scan|write|sink)_\w+$")
_STATEMENTS = ("SELECT", "WITH", "EXPLAIN", "SHOW", "VALUES")
_FROM_SYNTAX_CALLS = ("EXTRACT", "SUBSTRING", "TRIM", "OVERLAY", "POSITION")
_END_OF_FROM = ("WHERE", "GROUP", "HAVING", "ORDER", "LIMIT", "OFFSET", "UNION", "EXCEPT", "INTERSECT",
                "WINDOW", "QUALIFY", "FETCH", "SELECT")
_NO_FILES = "fiberlake query reads only the lake's tables (and files named with --table NAME=PATH)"


def check_query(query: str, tables: Iterable[str]) -> None:
    """Refuse a query that is not one ``SELECT`` over ``tables``.

    Polars SQL can read any file the process can (``SELECT * FROM read_csv('/etc/passwd')``);
    the query prompt must not. The query is tokenised as Polars does, then refused if it is not
    one ``SELECT``/``WITH``/``EXPLAIN``/``SHOW TABLES`` statement, if it calls a file function
    (``read_*``, ``scan_*``) anywhere, or if a ``FROM``/``JOIN`` names anything but a table of
    ``tables``, a ``WITH`` name or a subquery (a table function, a quoted path, a qualified name).

    Raises
    ------
    QueryRefused
        With one sentence saying why and what is possible.
    """
    tokens = _tokens(query)
    while tokens and tokens[-1].text == ";":
        tokens.pop()
    _check_statement(tokens)
    for i, tok in enumerate(tokens[:-1]):
        if tok.is_name and tokens[i + 1].text == "(" and _FILE_FUNCTION.match(tok.name):
            raise QueryRefused(f"{tok.text}(...) reads files outside the lake; {_NO_FILES}")
    known = {name.lower() for name in tables} | _with_names(tokens)
    for i in _table_positions(tokens):
        _check_table_reference(tokens, i, known, sorted(tables))


def _check_statement(tokens: list[_Tok]) -> None:
    if not tokens:
        raise QueryRefused("the query is empty; give one SELECT statement")
    if any(tok.text == ";" for tok in tokens):
        raise QueryRefused("give one statement at a time (the query has a ';' inside)")
    first = tokens[0]
    if first.is_word("DESCRIBE", "DESC"):
        raise QueryRefused("Polars SQL has no DESCRIBE; 'fiberlake tables NAME' prints a table's columns and "
                           "what they mean")
    if first.text != "(" and not first.is_word(*_STATEMENTS):
        raise QueryRefused(f"fiberlake query runs SELECT statements only (or WITH ... SELECT), not {first.text.upper()}; "
                           f"it never changes the lake")
    if first.is_word("SHOW") and not (len(tokens) == 2 and tokens[1].is_word("TABLES")):
        raise QueryRefused("of the SHOW statements, fiberlake query runs SHOW TABLES only ('fiberlake tables' "
                           "prints more)")


def _with_names(tokens: list[_Tok]) -> set[str]:
    """Names defined by ``WITH name [(columns)] AS [NOT] [MATERIALIZED] (...)``."""
    names = set()
    for i, tok in enumerate(tokens):
        if not tok.is_name or i == 0 or not (tokens[i - 1].is_word("WITH", "RECURSIVE") or tokens[i - 1].text == ","):
            continue
        j = i + 1
        if j < len(tokens) and tokens[j].text == "(":
            j = _closing(tokens, j) + 1
        if j < len(tokens) and tokens[j].is_word("AS"):
            j += 1
            while j < len(tokens) and tokens[j].is_word("NOT", "MATERIALIZED"):
                j += 1
            if j < len(tokens) and tokens[j].text == "(":
                names.add(tok.name)
    return names


def _closing(tokens: list[_Tok], open_at: int) -> int:
    depth = 0
    for j in range(open_at, len(tokens)):
        depth += {"(": 1, ")": -1}.get(tokens[j].text, 0)
        if depth == 0:
            return j
    return len(tokens) - 1


def _table_positions(tokens: list[_Tok]) -> list[int]:
    """Indices of the tokens that start a table reference: after FROM, JOIN, or a comma of a FROM list."""
    # one entry per open parenthesis: (whether FROM there is a function's syntax, whether in a FROM list)
    stack: list[list[bool]] = [[False, False]]
    positions = []
    for i, tok in enumerate(tokens):
        frame = stack[-1]
        if tok.text == "(":
            call = i > 0 and tokens[i - 1].is_word(*_FROM_SYNTAX_CALLS)
            stack.append([call, False])
        elif tok.text == ")":
            if len(stack) > 1:
                stack.pop()
        elif tok.is_word("FROM") and not frame[0] and not (i > 0 and tokens[i - 1].is_word("DISTINCT")):
            frame[1] = True
            positions.append(i + 1)
        elif tok.is_word("JOIN") and not frame[0]:
            frame[1] = True
            positions.append(i + 1)
        elif tok.text == "," and frame[1]:
            positions.append(i + 1)
        elif tok.is_word(*_END_OF_FROM):
            frame[1] = False
    return [i for i in positions if i < len(tokens)]


def _check_table_reference(tokens: list[_Tok], i: int, known: set[str], tables: list[str]) -> None:
    tok = tokens[i]
    while tok.is_word("LATERAL", "ONLY") and i + 1 < len(tokens):
        i += 1
        tok = tokens[i]
    nxt = tokens[i + 1].text if i + 1 < len(tokens) else ""
    if tok.kind == "string":
        raise QueryRefused(f"{tok.text} is a quoted path, not a table; {_NO_FILES}")
    if not tok.is_name:
        return  # a subquery "(", or a syntax error Polars will report
    if nxt == "(":
        if tok.is_word("UNNEST"):
            return
        raise QueryRefused(f"{tok.text}(...) is a table function; {_NO_FILES}")
    if nxt == ".":
        raise QueryRefused(f"{tok.text}.{tokens[i + 2].text if i + 2 < len(tokens) else ''} is not a table name; "
                           f"tables: {', '.join(tables)}")
    if tok.name not in known:
        raise QueryRefused(f"there is no table {tok.text} in the lake; tables: {', '.join(tables)} "
                           f"('fiberlake tables' describes them)")


# --- output ------------------------------------------------------------------------------------------------
def encode_nested(frame: pl.DataFrame) -> pl.DataFrame:
    """Replace list, array and struct columns by their JSON text (``[1.0,2.5,null]``), for CSV.

    NaN and null elements are written ``null``; a null list stays an empty field.
    """
    nested = [c for c, dtype in frame.schema.items() if isinstance(dtype, (pl.List, pl.Array, pl.Struct))]
    if not nested:
        return frame
    return frame.with_columns([
        pl.when(pl.col(c).is_null()).then(None)
        .otherwise(pl.struct(pl.col(c).alias("v")).struct.json_encode().str.slice(5).str.strip_suffix("}"))
        .alias(c)
        for c in nested
    ])


# --- fiberlake tables --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableSummary:
    """One line of ``fiberlake tables``."""

    name: str
    rows: int
    versions: str
    description: str


def table_summaries(lake: Lake) -> list[TableSummary]:
    """Every table with its row count, its readable versions and what it holds."""
    store = TableStore(lake.root / "tables")
    out = []
    for name in SCHEMAS:
        if store.exists(name):
            rows = store.scan(name).select(pl.len()).collect().item()
            versions = store.versions(name).span()
        else:
            rows, versions = 0, "none yet (read as empty)"
        out.append(TableSummary(name, rows, versions, TABLE_DESCRIPTIONS[name]))
    return out


def _type_name(dtype: pa.DataType) -> str:
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
        return f"list<{_type_name(dtype.value_type)}>"
    return {"float": "float32", "double": "float64", "timestamp[us, tz=UTC]": "timestamp (UTC)"}.get(str(dtype), str(dtype))


def table_columns(name: str) -> list[tuple[str, str, str]]:
    """``(column, type, description)`` of every column of table ``name``.

    Raises
    ------
    LookupError
        If there is no such table.
    """
    if name not in SCHEMAS:
        raise LookupError(f"there is no table {name!r}; tables: {', '.join(SCHEMAS)}")
    return [(f.name, _type_name(f.type), (f.metadata or {}).get(b"description", b"").decode())
            for f in SCHEMAS[name]]


def format_summaries(summaries: list[TableSummary]) -> str:
    """``fiberlake tables``: one line per table, then the views every query can name."""
    width = max(len(s.name) for s in summaries)
    lines = [f"{'table':{width}s} {'rows':>9s}  versions / what it holds"]
    for s in summaries:
        lines.append(f"{s.name:{width}s} {s.rows:9d}  {s.versions}")
        lines.append(f"{'':{width}s} {'':9s}  {s.description}")
    lines += ["", "views (SELECT ... FROM NAME; the README shows their SQL):"]
    lines += [f"  {name}: {doc}" for name, (doc, _) in VIEWS.items()]
    return "\n".join(lines)


def format_columns(name: str) -> str:
    """``fiberlake tables NAME``: the table's description, then one line per column."""
    columns = table_columns(name)
    w_name = max(len(c[0]) for c in columns)
    w_type = max(len(c[1]) for c in columns)
    lines = [f"{name}: {TABLE_DESCRIPTIONS[name]}", ""]
    lines += [f"  {col:{w_name}s}  {typ:{w_type}s}  {doc}" for col, typ, doc in columns]
    return "\n".join(lines)
