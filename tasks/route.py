"""route: send new queries to experts with the store's champion router.

Every record comes back as written, with `expert` (the chosen expert's name) and `probs` (expert -> probability)
added: all fields of every record (the union over the whole file, not the first record's), values and types as
read by `tasks.records` (CSV cells stay text). A first pass checks the whole input and the output location before
the router runs; the second routes in batches, so files larger than memory stream through. The output is written
to a temporary file beside the target (created with the usual permissions, or the replaced file's) and renamed
into place when complete; an error, Ctrl-C, SIGTERM or SIGHUP removes it.
"""

from __future__ import annotations

import csv
import json
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from schemas.artifacts import CHAMPION_PATH, ROUTER_JSON, router_file
from schemas.errors import ArtifactError, ConfigError, InputError
from schemas.evaluation import Champion, EvalReport, read_champion, read_report
from schemas.store import Store
from tasks.outputs import check_output, local_root, output_kind, write_file
from tasks.records import SUFFIXES, Record, batches, check_file, is_text, schema, visible

ADDED = ("expert", "probs")  # the fields routing adds


class Routes(Protocol):
    """What `route_file` needs of a router (cluster/router.py `Router`)."""

    experts: list[str]

    def probs(self, texts: list[str]) -> np.ndarray:
        """(len(texts), len(experts)) probabilities."""
        ...


@dataclass(frozen=True)
class Fallback:
    """Safety on unfamiliar queries: a query whose top router probability is below `below` goes to expert index
    `expert` (the best single expert by training reward) instead of the router's pick. A router is least sure on
    queries unlike its training queries, and there the best single expert is the safe choice."""

    below: float
    expert: int


def choose(probs: np.ndarray, costs: np.ndarray | None, lam: float, fallback: Fallback | None = None) -> np.ndarray:
    """Per-row expert index: argmax_i(p_i - lam * cost_i / max(cost)). Costs are scaled by the largest so that
    `lam` means the same for any cost unit: at lam = 1 the most expensive expert must be 1.0 more probable than a
    free one to be chosen. `costs` None or `lam` 0: the plain argmax (ties go to the first expert, as argmax).
    `fallback`: rows whose top probability is below `fallback.below` take `fallback.expert` instead."""
    pick = _cost_argmax(probs, costs, lam)
    if fallback is None or fallback.below <= 0:
        return pick
    if not (0 <= fallback.expert < probs.shape[1]) or not 0 < fallback.below <= 1:
        raise ConfigError(f"fallback {fallback}: need an expert index below {probs.shape[1]} and a threshold in "
                          "(0, 1] (routing.fallback_below)")
    return np.where(probs.max(axis=1) < fallback.below, fallback.expert, pick)


def _cost_argmax(probs: np.ndarray, costs: np.ndarray | None, lam: float) -> np.ndarray:
    if costs is None or lam == 0:
        return probs.argmax(axis=1)
    costs = np.asarray(costs, dtype=float)
    if costs.shape != (probs.shape[1],) or not np.isfinite(costs).all() or (costs < 0).any():
        raise ConfigError(f"expert costs {costs.tolist()}: need one finite cost >= 0 per expert "
                          f"({probs.shape[1]} experts)")
    if lam < 0 or not np.isfinite(lam):
        raise ConfigError(f"lambda {lam}: must be a finite number >= 0")
    top = costs.max()
    return probs.argmax(axis=1) if top == 0 else (probs - lam * costs / top).argmax(axis=1)


def lambda_max(costs: np.ndarray) -> float | None:
    """A lambda at which every query goes to a cheapest expert (probabilities differ by at most 1, so a cost gap of
    g / max cost outweighs them once lambda * g > max cost); None when all experts cost the same."""
    scaled = np.unique(np.asarray(costs, dtype=float) / max(float(np.max(costs)), 1e-300))
    return None if len(scaled) < 2 else 1.01 / float(np.diff(scaled).min())


def load_router(store: Store, router_fp: str) -> Routes:
    """A router from the store, loaded for inference (torch + transformers: imported only here)."""
    from cluster.router import Router

    return Router.from_store(store, router_fp)


class RoutingPolicy:
    """How the store's champion routes, read once: its router, experts, costs, lambda and fallback. `zooter route`,
    `zooter calibrate` and the gateway all route through one, so a promotion between two reads can never pair one
    champion's costs with another's router. `lam`/`fallback_below` override what the champion's evaluation recorded
    from its config (None: keep it). The router itself loads on first use (`router()`), once."""

    def __init__(self, store: Store, champion: Champion, report: EvalReport, lam: float | None = None,
                 fallback_below: float | None = None, loader: Callable[[Store, str], Routes] = load_router):
        self.store, self.champion, self.report, self._loader = store, champion, report, loader
        self.lam = report.lam if lam is None else lam
        if not (np.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError(f"lambda {self.lam}: must be a finite number >= 0")
        if self.lam > 0 and report.costs is None:
            raise ConfigError(f"lambda {self.lam}: the champion's evaluation {report.evaluation} has no expert costs; "
                              "set `cost` on every expert (`routing.costs` in a `zooter train` config) and rerun")
        below = report.fallback_below if fallback_below is None else fallback_below
        self.fallback = Fallback(below, report.experts.index(report.best_single)) if below > 0 else None
        self._router: Routes | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, store: Store, lam: float | None = None, fallback_below: float | None = None,
             loader: Callable[[Store, str], Routes] = load_router) -> RoutingPolicy:
        """The store's champion policy: champion.json and its evaluation read once each; a champion whose router
        is gone is one error naming it and the repair."""
        champ = read_champion(store)
        if champ is None:
            raise ArtifactError(f"{store.uri(CHAMPION_PATH)}: the store has no champion router; train one first")
        return cls.of(store, champ, lam, fallback_below, loader)

    @classmethod
    def of(cls, store: Store, champ: Champion, lam: float | None = None, fallback_below: float | None = None,
           loader: Callable[[Store, str], Routes] = load_router) -> RoutingPolicy:
        """The policy of a champion record already read (the gateway reads champion.json to see if it changed)."""
        if not store.exists(router_file(champ.router_fp, ROUTER_JSON)):
            raise ArtifactError(f"{store.uri(CHAMPION_PATH)} names router {champ.router_fp}, which is not in the store "
                                f"({store.uri(router_file(champ.router_fp, ROUTER_JSON))} is missing); run `zooter "
                                "run` or `zooter train` again to publish a router, or restore that folder")
        return cls(store, champ, read_report(store, champ.evaluation), lam, fallback_below, loader)

    @property
    def router_fp(self) -> str:
        return self.champion.router_fp

    @property
    def experts(self) -> list[str]:
        return self.report.experts

    @property
    def costs(self) -> np.ndarray | None:
        """Cost of one call per expert, in the router's expert order (None: the evaluation has none)."""
        return None if self.report.costs is None else np.array([self.report.costs[e] for e in self.experts])

    def router(self) -> Routes:
        """The champion's router, loaded on first use (thread-safe) and checked against the evaluation's experts."""
        with self._lock:
            if self._router is None:
                router = self._loader(self.store, self.router_fp)
                if list(router.experts) != self.experts:
                    raise ArtifactError(f"router {self.router_fp} routes to {list(router.experts)}, its evaluation "
                                        f"names {self.experts}")
                self._router = router
            return self._router

    def choose(self, probs: np.ndarray, lam: float | None = None) -> np.ndarray:
        """Per-row expert index under this policy (`choose`); `lam` overrides the policy's for one call."""
        lam = self.lam if lam is None else lam
        return choose(probs, self.costs if lam else None, lam, self.fallback)


def champion(store: Store) -> Routes:
    """The store's champion router, loaded for inference."""
    return RoutingPolicy.load(store).router()


def route_file(router: RoutingPolicy | Routes | Callable[[], Routes], src: str | Path, text_field: str,
               dst: str | Path, batch_size: int = 256, overwrite: bool = False, costs: np.ndarray | None = None,
               lam: float = 0.0, fallback: Fallback | None = None) -> int:
    """Route every record of `src` into `dst`; returns the number of records routed. An input field named
    `expert` or `probs` is an error unless `overwrite`. `router`: a RoutingPolicy (`zooter route`: the champion's
    router, costs, lambda and fallback), or a router or a router loader with `costs`, `lam` and `fallback` given
    here (`choose`). A router is loaded only once the input and output have passed their checks, so a bad file never
    waits for a model load. `probs` stay the router's."""
    if isinstance(router, RoutingPolicy):
        load, pick = router.router, router.choose
    else:
        load = router if not hasattr(router, "probs") else (lambda: router)
        pick = partial(choose, costs=costs, lam=lam, fallback=fallback)
    src, dst = Path(src), Path(dst)
    check_file(src, "input file")
    store = router.store if isinstance(router, RoutingPolicy) else None
    check_output(dst, output_kind(dst, SUFFIXES), replace=True, inputs=[src], store_root=local_root(store))

    def write(tmp: Path) -> int:
        fields, n = _scan(src, text_field, dst.suffix == ".parquet", batch_size, overwrite)
        routes = load()
        with _writer(tmp, dst.suffix, fields, routes.experts) as put, \
                tqdm(total=n, desc=f"route {src.name}", unit="q") as bar:
            for batch in batches(src, batch_size):
                probs = routes.probs([rec[text_field] for _, rec in batch])
                put([rec | {"expert": routes.experts[int(i)],
                            "probs": dict(zip(routes.experts, map(float, p), strict=True))}
                     for (_, rec), p, i in zip(batch, probs, pick(probs), strict=True)])
                bar.update(len(batch))
        return n

    counted: list[int] = []
    with _signals_raise():  # complete output or none, the folders made for it removed
        write_file(dst, lambda tmp: counted.append(write(tmp)))
    return counted[0]


@contextmanager
def _signals_raise() -> Iterator[None]:
    """While routing, SIGINT raises KeyboardInterrupt and SIGTERM/SIGHUP raise SystemExit(128 + signal), so the
    cleanup in `route_file` runs instead of the process dying with a temp file left (ignored signals stay so)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for s, handler in old.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _scan(src: Path, text_field: str, typed: bool, batch_size: int, overwrite: bool) -> tuple[pa.Schema, int]:
    """Check every record; returns the output's input fields and the record count. The fields' types are the file's
    (Parquet), text (CSV) or, for JSONL, inferred over the whole file when `typed` (a Parquet output), else null."""
    fixed = schema(src)
    if fixed is not None:  # Parquet, CSV: the fields are the file's
        clash = [f for f in ADDED if f in fixed.names]
        if clash and not overwrite:
            raise InputError(f"{src}: field {clash[0]!r} already exists; routing adds 'expert' and 'probs' "
                             "(--overwrite replaces them)")
        if text_field not in fixed.names:
            raise InputError(f"{src}: no field {text_field!r} (fields: {', '.join(fixed.names)}) (--text-field)")
        if not (is_text(t := fixed.field(text_field).type) or pa.types.is_null(t)):  # all-null: a row error below
            raise InputError(f"{src}: field {text_field!r} is {t}, not text (--text-field)")
    types: dict[str, pa.DataType] = {}
    n = 0
    for batch in batches(src, batch_size):
        for line, rec in batch:
            text = rec.get(text_field)
            if not isinstance(text, str) or not visible(text):
                raise InputError(f"{src}:{line}: field {text_field!r} must be a non-empty string with a visible "
                                 f"character, got {text!r:.40} (--text-field)")
            if fixed is None and not overwrite and (clash := [f for f in ADDED if f in rec]):
                raise InputError(f"{src}:{line}: field {clash[0]!r} already exists; routing adds 'expert' and "
                                 "'probs' (--overwrite replaces them)")
        n += len(batch)
        if fixed is None:
            for f in dict.fromkeys(k for _, rec in batch for k in rec):
                if f not in ADDED:
                    types[f] = _column_type(src, f, types.get(f, pa.null()), batch) if typed else pa.null()
    fields = fixed if fixed is not None else pa.schema(list(types.items()))
    return pa.schema([f for f in fields if f.name not in ADDED]), n


def _unify(field: str, a: pa.DataType, b: pa.DataType) -> pa.DataType:
    return pa.unify_schemas([pa.schema([(field, a)]), pa.schema([(field, b)])],
                            promote_options="permissive").field(0).type


def _column_type(src: Path, field: str, before: pa.DataType, batch: list[Record]) -> pa.DataType:
    """The one Parquet type that holds `field` of the lines before and of `batch` (ints and floats: double; null
    fits anything); a value that fits no such type is an error at its line."""
    values = [rec.get(field) for _, rec in batch]
    try:
        return _unify(field, before, pa.array(values).type)
    except (pa.ArrowException, OverflowError):
        pass
    for i, (line, _) in enumerate(batch):  # find the first line that does not fit the lines above it
        try:
            _unify(field, before, pa.array(values[: i + 1]).type)
        except (pa.ArrowException, OverflowError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f"{src}:{line}: field {field!r} does not fit one Parquet column with the lines above "
                             f"({reason}); a .jsonl output keeps mixed types") from None
    raise AssertionError("pa.array failed on the whole batch but on no prefix of it")


def _cell(v: object) -> str:
    """A CSV cell: text as is, null empty, anything else as JSON (numbers, true/false, lists, objects)."""
    return "" if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)


@contextmanager
def _writer(path: Path, suffix: str, fields: pa.Schema, experts: list[str]) -> Iterator:
    """write(records) for the output type; the header or schema is written first, so an empty input gives a valid
    empty file of its format."""
    if suffix == ".parquet":
        out = pa.schema([*fields, ("expert", pa.string()),
                         ("probs", pa.struct([(e, pa.float64()) for e in experts]))])
        with pq.ParquetWriter(path, out) as w:
            yield lambda recs: w.write_table(pa.Table.from_pylist(recs, schema=out))
        return
    with open(path, "w", encoding="utf-8", newline="") as f:
        if suffix == ".jsonl":
            yield lambda recs: f.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in recs)
            return
        names = [*fields.names, *ADDED]
        w = csv.writer(f)  # "\r\n" lines (RFC 4180): then a field holding "\r" or "\n" is quoted
        w.writerow(names)
        yield lambda recs: w.writerows([_cell(r.get(k)) for k in names] for r in recs)
