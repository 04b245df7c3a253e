"""Pages of the docs site generated at build time: config and CLI reference, benchmarks, layout.

An MkDocs hook (mkdocs.yml `hooks:`): `on_files` adds four virtual pages, written nowhere on disk, so they are
rebuilt from the code on every `mkdocs build` and can never drift from it. Everything is found by introspection:

- reference/config.md: the pydantic models of `schemas.config` (and its submodules, should it become a package);
  the top-level configs are the models no other model uses as a field type; every field is walked through
  `model_fields`, nested models and unions of models (discriminated or not) recursively.
- reference/cli.md: the typer app of the `zooter` console script (pyproject.toml `[project.scripts]`), converted
  to click with `typer.main.get_command` and walked recursively.
- benchmarks.md: benchmarks/results/*.json. A figure is shown only with the commit, date, machine (cores) and load
  it was measured at (see `provenance`); the others are listed as not shown, with what they lack.
- layout.md: every file of the tree (git's tracked and untracked-but-not-ignored files) with the first line of its
  docstring (Python) or leading comment.

`python docs/hooks/generate.py OUT` writes the four pages into the folder OUT, for a look without MkDocs.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
import tomllib
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PAGES = {
    "reference/config.md": "config_page",
    "reference/cli.md": "cli_page",
    "benchmarks.md": "benchmarks_page",
    "layout.md": "layout_page",
}
GENERATED = "<!-- generated at build time by docs/hooks/generate.py: edit the code it reads, not this page -->\n"


# ---------------------------------------------------------------------------------------------------- markdown

_CODE = re.compile(r"(`+)(.+?)\1")


def md(text: str | None) -> str:
    """Prose from docstrings and descriptions, safe in a Markdown table cell: code spans kept as they are; outside
    them `*`, `_`, `<`, `>`, `[` and `|` are escaped (descriptions say `s*` and `KL(a||b)`), newlines become
    spaces."""
    if not text:
        return ""
    text = " ".join(text.split())
    out, pos = [], 0
    for m in _CODE.finditer(text):
        out.append(_escape(text[pos:m.start()]))
        out.append(m.group(0).replace("|", r"\|"))
        pos = m.end()
    out.append(_escape(text[pos:]))
    return "".join(out)


def _escape(s: str) -> str:
    s = s.replace("\\", "\\\\")
    for ch in "*_[|":
        s = s.replace(ch, "\\" + ch)
    return s.replace("<", "&lt;").replace(">", "&gt;")


def code(value: str) -> str:
    """`value` as a code span that survives a table cell."""
    value = str(value).replace("|", r"\|")
    fence = "``" if "`" in value else "`"
    return f"{fence}{value}{fence}" if fence == "`" else f"{fence} {value} {fence}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c or " " for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def first_line(doc: str | None) -> str:
    """The first sentence-line of a docstring (its first paragraph joined, up to the first full stop)."""
    if not doc:
        return ""
    para = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    m = re.search(r"(?<![.])\.\s", para)  # a full stop, not an ellipsis
    return para[: m.start() + 1] if m else para


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------------------------------- config reference

def _models_in(module: types.ModuleType) -> list[type]:
    """Every pydantic model defined in `module` or, when it is a package, in its submodules."""
    from pydantic import BaseModel

    mods = [module]
    if hasattr(module, "__path__"):
        mods += [importlib.import_module(m.name)
                 for m in pkgutil.walk_packages(module.__path__, module.__name__ + ".")]
    found: dict[str, type] = {}
    for mod in mods:
        for obj in vars(mod).values():
            if (inspect.isclass(obj) and issubclass(obj, BaseModel) and obj is not BaseModel
                    and obj.__module__.startswith(module.__name__)):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _nested(tp: Any) -> Iterator[type]:
    """The pydantic models an annotation contains, at any depth (list items, dict values, union members)."""
    from pydantic import BaseModel

    tp = _strip(tp)
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        yield tp
        return
    for arg in typing.get_args(tp):
        if not isinstance(arg, str | int | float | bool | type(None)) or inspect.isclass(arg):
            yield from _nested(arg)


def _type(tp: Any, links: dict[type, str]) -> str:
    """A readable type: `str | None`, `list[ExpertSpec]`, one of the Literal's values."""
    from pydantic import BaseModel

    tp = _strip(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(code(json.dumps(a)) for a in args)
    if _is_union(tp):
        return " \\| ".join(_type(a, links) for a in args)
    if origin in (list, tuple, set, frozenset):
        return f"list[{', '.join(_type(a, links) for a in args if a is not Ellipsis)}]"
    if origin is dict:
        return f"map[{_type(args[0], links)}, {_type(args[1], links)}]" if args else "map"
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{links[tp]})" if tp in links else tp.__name__
    if inspect.isclass(tp):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(tp.__name__,
                                                                                             tp.__name__)
    return md(str(tp).replace("typing.", ""))


def _constraints(field: Any) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "min length", "max_length": "max length",
             "multiple_of": "multiple of"}
    out = []
    for meta in field.metadata:
        for attr, word in words.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{word} {value}")
    return ", ".join(out)


def _default(field: Any) -> str:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined, to_jsonable_python

    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return ""
    if isinstance(value, BaseModel):
        return "its defaults"
    return code(json.dumps(to_jsonable_python(value, fallback=str)))


def _discriminator(field: Any) -> str | None:
    """The discriminator of a union field, from the field itself or an Annotated member (list items)."""
    if isinstance(field.discriminator, str):
        return field.discriminator
    if field.discriminator is not None:
        return getattr(field.discriminator, "discriminator", None) if isinstance(
            getattr(field.discriminator, "discriminator", None), str) else None
    stack = [field.annotation, *field.metadata]
    while stack:
        tp = stack.pop()
        if typing.get_origin(tp) is typing.Annotated:
            for meta in typing.get_args(tp)[1:]:
                d = getattr(meta, "discriminator", None)
                if isinstance(d, str):
                    return d
                if d is not None and isinstance(getattr(d, "discriminator", None), str):
                    return d.discriminator
            stack.append(typing.get_args(tp)[0])
        else:
            stack.extend(a for a in typing.get_args(tp) if not isinstance(a, str | int | float | bool))
    return None


def _tag(model: type, key: str | None) -> str:
    """The value of the discriminator `key` that selects `model` in a union."""
    if key and key in model.model_fields:
        tp = _strip(model.model_fields[key].annotation)
        if typing.get_origin(tp) is typing.Literal:
            return ", ".join(f"{key}: {a}" for a in typing.get_args(tp))
    return model.__name__


def _key(name: str, field: Any) -> str:
    return field.serialization_alias or field.alias or name


def config_page() -> str:
    config = importlib.import_module("schemas.config")
    models = _models_in(config)
    used = {m for model in models for f in model.model_fields.values() for m in _nested(f.annotation)}
    bases = {b for m in models for b in m.__mro__[1:]}  # a model others extend (ModelRef) is documented in them
    roots = [m for m in models if m.model_fields and m not in used and m not in bases]
    # the biggest config first (the label run's), then the others
    size = {m: len(list(_walk_models(m))) for m in roots}
    roots.sort(key=lambda m: (-size[m], m.__name__))

    out = [GENERATED, "# Config reference\n",
           "Every key of a config file, generated from the pydantic models in "
           f"`{config.__name__}` (`model_fields` and their descriptions) each time the site is built. Unknown keys "
           "are errors; the rules that apply to every config file are in [Failures and input rules]"
           "(../failures.md#config-files).\n",
           "Top-level configs: " + ", ".join(f"[{m.__name__}](#{slug(m.__name__)})" for m in roots) + ".\n"]
    links: dict[type, str] = {}
    for root in roots:
        out.append(_model_section(root, root.__name__, 2, links))
    return "\n".join(out)


def _walk_models(model: type, seen: set[type] | None = None) -> Iterator[type]:
    seen = seen if seen is not None else set()
    if model in seen:
        return
    seen.add(model)
    yield model
    for f in model.model_fields.values():
        for m in _nested(f.annotation):
            yield from _walk_models(m, seen)


def _model_section(model: type, path: str, level: int, links: dict[type, str]) -> str:
    """A heading and a table for `model` at YAML path `path`, then one section per nested model not documented yet
    (a model met again links to its first section)."""
    anchor = slug(path)
    links.setdefault(model, anchor)
    doc = model.__doc__ if model.__doc__ and model.__doc__ != _base_doc(model) else ""
    head = f"{'#' * level} `{path}`" if path != model.__name__ else f"{'#' * level} {model.__name__}"
    parts = [f"{head} {{#{anchor}}}\n"]
    if path != model.__name__:
        parts.append(f"Model `{model.__name__}`.\n")
    if doc:
        parts.append(md(inspect.cleandoc(doc)) + "\n")
    rows, children = [], []
    for name, field in model.model_fields.items():
        nested = list(dict.fromkeys(_nested(field.annotation)))
        key = _key(name, field)
        item = "[]" if typing.get_origin(_strip(_first_non_none(field.annotation))) in (list, tuple, set) else ""
        item = "{}" if typing.get_origin(_strip(_first_non_none(field.annotation))) is dict else item
        disc = _discriminator(field) if len(nested) > 1 else None
        for m in nested:
            if m in links:
                continue
            child = f"{path}.{key}{item}" if path != model.__name__ else f"{key}{item}"
            label = f"{child} ({_tag(m, disc)})" if len(nested) > 1 else child
            links[m] = slug(label)
            children.append((m, label))
        typ = _type(field.annotation, links)
        if disc:
            typ += f" (chosen by `{disc}`)"
        rows.append([code(key), typ, _default(field), _constraints(field), md(field.description)])
    parts.append(table(["key", "type", "default", "limits", "description"], rows))
    for m, label in children:
        parts.append(_model_section(m, label, min(level + 1, 4), links))
    return "\n".join(parts)


def _first_non_none(tp: Any) -> Any:
    tp = _strip(tp)
    if _is_union(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _base_doc(model: type) -> str | None:
    """A docstring pydantic or a base class gives every model (not the model's own)."""
    for base in model.__mro__[1:]:
        if base.__doc__:
            return base.__doc__
    return None


# ------------------------------------------------------------------------------------------- CLI reference

def _console_app() -> tuple[str, Any]:
    """The `zooter` console script's module and the typer app in it (the one no other Typer of the module adds)."""
    import typer

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    prog, target = next(iter(scripts.items()))
    module = importlib.import_module(target.split(":")[0])
    apps = [v for v in vars(module).values() if isinstance(v, typer.Typer)]
    added = {id(g.typer_instance) for a in apps for g in a.registered_groups}
    roots = [a for a in apps if id(a) not in added]
    if len(roots) != 1:
        raise RuntimeError(f"{module.__name__}: expected one root typer app, found {len(roots)}")
    return prog, roots[0]


def _context(cmd: Any, name: str, parent: Any = None) -> Any:
    return cmd.context_class(cmd, info_name=name, parent=parent)  # click's, or the copy typer vendors


def cli_page() -> str:
    import typer.main

    prog, app = _console_app()
    root = typer.main.get_command(app)
    ctx = _context(root, prog)
    out = [GENERATED, "# CLI reference\n",
           f"Every command of `{prog}`, generated from its typer app (via click) each time the site is built; "
           f"`{prog} COMMAND --help` prints the same. Streams, `--json` and exit codes are in "
           "[Failures and input rules](../failures.md#streams-json-and-exit-codes).\n"]
    if root.help:
        out.append(_help(root.help) + "\n")
    out.append(_cli_index(root, ctx))
    out.append(f"Options of `{prog}` itself:\n")
    out.extend(_cli_command(root, ctx, 2))
    return "\n".join(out)


def _help(text: str) -> str:
    """A command's help as Markdown paragraphs (typer's markdown mode; `\\b` markers dropped)."""
    text = inspect.cleandoc(text).replace("\b", "")
    return "\n\n".join(md(p) for p in text.split("\n\n") if p.strip())


def _subcommands(cmd: Any, ctx: Any) -> list[tuple[str, Any]]:
    if not hasattr(cmd, "list_commands"):
        return []
    subs = [(n, cmd.get_command(ctx, n)) for n in cmd.list_commands(ctx)]
    return [(n, c) for n, c in subs if c is not None and not c.hidden]


def _cli_index(cmd: Any, ctx: Any) -> str:
    rows = []

    def walk(c: Any, c_ctx: Any) -> None:
        for name, sub in _subcommands(c, c_ctx):
            sub_ctx = _context(sub, name, c_ctx)
            path = sub_ctx.command_path
            rows.append([f"[{code(path)}](#{slug(path)})", md(first_line(sub.help or sub.short_help))])
            walk(sub, sub_ctx)

    walk(cmd, ctx)
    return table(["command", "what it does"], rows)


def _cli_command(cmd: Any, ctx: Any, level: int) -> list[str]:
    out = []
    if ctx.parent is not None:
        path = ctx.command_path
        out.append(f"{'#' * level} `{path}` {{#{slug(path)}}}\n")
        out.append("```\n" + " ".join([path, *cmd.collect_usage_pieces(ctx)]) + "\n```\n")
        if cmd.help:
            out.append(_help(cmd.help) + "\n")
    rows = [r for p in cmd.get_params(ctx) if not getattr(p, "hidden", False) for r in [_param_row(p, ctx)] if r]
    if rows:
        out.append(table(["argument / option", "value", "default, limits", "description"], rows))
    for name, sub in _subcommands(cmd, ctx):
        out.extend(_cli_command(sub, _context(sub, name, ctx), level + 1 if ctx.parent else 2))
    return out


_EXTRA = re.compile(r"\s*\[([^\[\]]*)\]\s*$")


def _param_row(param: Any, ctx: Any) -> list[str] | None:
    """One row from the parameter's own help record (what `--help` prints): names, metavar, help, and the
    `[default: ...; required]` annotations click appends."""
    record = param.get_help_record(ctx)
    if not record or "--help" in getattr(param, "opts", ()):
        return None
    names, help_text = record
    m = re.match(r"^(.*?)(?:\s+(<[^>]*>|[A-Z][A-Z_]*|\[?[A-Z][A-Z_.]*\]?))?$", names)
    names, metavar = (m.group(1), m.group(2) or "") if m else (names, "")
    extra = _EXTRA.search(help_text or "")
    notes = extra.group(1) if extra else ""
    help_text = help_text[: extra.start()] if extra else help_text
    names = ", ".join(code(n.strip()) for n in names.split(",") if n.strip())
    notes = "; ".join("**required**" if n.strip() == "required" else md(n.strip()) for n in notes.split(";")
                      if n.strip())
    return [names, code(metavar.strip("<>")) if metavar else "flag", notes, md(help_text)]


# ------------------------------------------------------------------------------------------------ benchmarks

RESULTS = ROOT / "benchmarks" / "results"
SUMMARY_NAME = "summary.json"
REQUIRED = ("commit", "date", "cores", "load")


def _git(*args: str) -> str | None:
    try:
        run = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout if run.returncode == 0 else None


def _find(obj: Any, keys: tuple[str, ...], depth: int = 3) -> Any:
    """The value of the first of `keys` found breadth-first in `obj` (dicts only, `depth` levels)."""
    level = [obj]
    for _ in range(depth):
        nxt = []
        for d in level:
            if not isinstance(d, dict):
                continue
            for k in keys:
                if k in d and d[k] not in (None, ""):
                    return d[k]
            nxt += [v for v in d.values() if isinstance(v, dict)]
        level = nxt
    return None


def _load(value: Any) -> str | None:
    """A recorded load average: a number, or {load_1m, ...}."""
    if isinstance(value, int | float):
        return f"{value:g}"
    if isinstance(value, dict):
        one = value.get("load_1m", value.get("1m"))
        if isinstance(one, int | float):
            return f"{one:g} (1 min)"
    return None


def _measured(obj: Any, inherit: dict[str, str | None] | None = None) -> dict[str, str | None]:
    """What a JSON document itself records about where and when it was measured: commit and date at its top level
    or in its `setup`/`meta`/`machine` section (a nested run that names its own commit is a group of its own, see
    `_groups`), cores and load anywhere in its first levels. `inherit`: what an enclosing document recorded."""
    head = [obj] + [obj[k] for k in ("setup", "meta", "machine") if isinstance(obj, dict) and isinstance(obj.get(k),
                                                                                                       dict)]
    commit = next((d[k] for d in head for k in ("commit", "git_commit") if isinstance(d.get(k), str)), None)
    date = next((d[k] for d in head for k in ("date", "measured_at", "recorded_at") if isinstance(d.get(k), str)),
                None)
    cores = _find(obj, ("cpus", "cores", "num_cpus", "cpu_count"))
    load = _load(_find(obj, ("load_before", "load", "loadavg", "load_average")))
    inherit = inherit or {}
    return {"commit": commit, "date": date[:10] if date else None,
            "cores": str(cores) if isinstance(cores, int | float) else inherit.get("cores"), "load": load}


def _groups(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested sections that record their own commit (e.g. a `before` run at an earlier commit), with their path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and isinstance(v.get("commit"), str):
                yield path, v
            else:
                yield from _groups(v, path)


def _history(rel: str) -> list[tuple[str, str]]:
    """(commit, date) of every commit that changed `rel`, newest first; [] when the file differs from HEAD or git
    cannot tell (not a repository, a shallow clone without it)."""
    if _git("ls-files", "--error-unmatch", rel) is None or _git("diff", "--quiet", "HEAD", "--", rel) is None:
        return []
    log = _git("log", "--format=%h %cs", "--", rel) or ""
    return [tuple(line.split(" ", 1)) for line in log.splitlines() if " " in line]


def _recorded_in(rel: str, same: typing.Callable[[Any], bool]) -> tuple[str, str] | None:
    """The commit that recorded what the file holds now: walking back from the newest commit of `rel`, the oldest
    one whose version still satisfies `same` (for a whole file: the newest commit; for one entry of a merged file:
    where that entry last changed)."""
    found = None
    for commit, date in _history(rel):
        text = _git("show", f"{commit}:{rel}")
        try:
            if text is None or not same(json.loads(text)):
                break
        except json.JSONDecodeError:
            break
        found = (commit, date)
    return found


def provenance(rel: str, doc: Any, same: typing.Callable[[Any], bool] | None = None) -> dict[str, str | None]:
    """commit, date, cores and load of a result: what the JSON records, the commit and date from git where it
    records none (the commit that wrote it, the file unchanged since)."""
    p = _measured(doc)
    if not (p["commit"] and p["date"]):
        hit = _recorded_in(rel, same or (lambda old: old == doc))
        if hit:
            p["commit"], p["date"] = p["commit"] or hit[0], p["date"] or hit[1]
            p["source"] = "git"
    return p


def _missing(p: dict[str, str | None]) -> list[str]:
    return [k for k in REQUIRED if not p.get(k)]


def _leaves(obj: Any, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(dotted path, number or short string) for the figures of a results document (lists of up to 5 numbers
    joined; longer lists and deeper levels left to the file)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if depth < 4 and not (isinstance(v, dict) and isinstance(v.get("commit"), str)):  # its own group
                yield from _leaves(v, path, depth + 1)
    elif isinstance(obj, list):
        if obj and len(obj) <= 5 and all(isinstance(x, int | float) and not isinstance(x, bool) for x in obj):
            yield prefix, ", ".join(f"{x:g}" for x in obj)
        elif obj and len(obj) <= 3 and all(isinstance(x, dict) for x in obj):
            for i, x in enumerate(obj):
                yield from _leaves(x, f"{prefix}[{i}]", depth + 1)
    elif isinstance(obj, bool) or obj is None:
        return
    elif isinstance(obj, int | float):
        yield prefix, f"{obj:g}"
    elif isinstance(obj, str) and len(obj) <= 60:
        yield prefix, obj


def benchmarks_page() -> str:
    files = sorted(RESULTS.glob("*.json"))
    shown, hidden = [], []
    summary = next((f for f in files if f.name == SUMMARY_NAME), None)
    goal_rows, goal_hidden = [], []
    if summary is not None:
        rel = summary.relative_to(ROOT).as_posix()
        for entry in json.loads(summary.read_text()):
            p = provenance(rel, entry.get("raw", {}), _same_entry(entry))
            if _missing(p):  # the entry's raw figures may leave the machine to the benchmark's own file
                p = _from_sibling(entry, p)
            if _missing(p):
                goal_hidden.append((entry["name"], _missing(p)))
                continue
            value = "-" if entry.get("value") is None else f"{entry['value']:g} {entry.get('unit', '')}".strip()
            met = {True: "yes", False: "**no**"}.get(entry.get("passed"), "-")
            goal_rows.append([md(entry["name"]), value, md(f"{entry.get('goal', '')} {entry.get('unit', '')}"),
                              met, code(p["commit"]), p["date"], p["cores"], p["load"]])
    for f in files:
        if f.name == SUMMARY_NAME:
            continue
        rel = f.relative_to(ROOT).as_posix()
        doc = json.loads(f.read_text())
        p = provenance(rel, doc)
        (hidden if _missing(p) else shown).append((rel, doc, p))
        for path, group in _groups(doc):  # a section measured at another commit: its own provenance
            g = _measured(group, inherit=p)
            g["date"] = g["date"] or (_git("show", "-s", "--format=%cs", g["commit"]) or "").strip() or None
            (hidden if _missing(g) else shown).append((f"{rel} {path}", group, g))

    out = [GENERATED, "# Benchmarks\n",
           "Generated from `benchmarks/results/*.json` each time the site is built. A figure is shown only with "
           "the commit and date it was measured at, the machine (cores) and its load average when the benchmark "
           "started. Commit and date are what the JSON records; where it records none, the commit that wrote the "
           "file (git log; a file changed since its last commit has none). Cores and load come from the JSON "
           "only. Timings compare only within one run: this machine's speed varies between days.\n",
           "`make bench` runs every benchmark and writes these files; `make bench-table` prints the goals.\n",
           "## Goals\n",
           "From `benchmarks/results/summary.json` (one entry per goal; an entry's commit is the one where it last "
           "changed).\n"]
    if goal_rows:
        out.append(table(["goal", "measured", "target", "met", "commit", "date", "cores", "load"], goal_rows))
    else:
        out.append("No goal carries all four.\n")
    if goal_hidden:
        out.append("Not shown: no commit/date recorded, or no machine (cores) or load, for these goals:\n")
        out.append(table(["goal", "missing"], [[md(n), ", ".join(m)] for n, m in goal_hidden]))
    out.append("## Results files\n")
    for name, doc, p in shown:
        out.append(f"### {md(name.removeprefix('benchmarks/results/'))}\n")
        out.append(f"`{name}`: commit {code(p['commit'])}, {p['date']}, {p['cores']} cores, load {p['load']}.\n")
        rows = [[code(k), md(v)] for k, v in _leaves(doc)]
        cap = 80
        out.append(table(["figure", "value"], rows[:cap]))
        if len(rows) > cap:
            out.append(f"… and {len(rows) - cap} more in the file.\n")
    out.append("## Not shown\n")
    if hidden:
        out.append("Not shown: no commit/date recorded, or no machine (cores) or load:\n")
        out.append(table(["file", "missing", "recorded"], [
            [code(rel), ", ".join(_missing(p)), ", ".join(f"{k} {p[k]}" for k in REQUIRED if p.get(k)) or "nothing"]
            for rel, _, p in hidden]))
    else:
        out.append("Every results file carries all four.\n")
    return "\n".join(out)


def _same_entry(entry: dict) -> typing.Callable[[Any], bool]:
    def same(doc: Any) -> bool:
        return isinstance(doc, list) and any(e == entry for e in doc if isinstance(e, dict))
    return same


def _from_sibling(entry: dict, p: dict[str, str | None]) -> dict[str, str | None]:
    """Cores and load for a goal whose raw figures lack them, from the benchmark's own results file (named by the
    goal's first word), and only when that file was written in the same commit as the entry."""
    stem = re.split(r"[^a-z0-9]+", entry["name"].lower())[0]
    f = RESULTS / f"{stem}.json"
    if not f.exists() or not p.get("commit"):
        return p
    rel = f.relative_to(ROOT).as_posix()
    q = provenance(rel, json.loads(f.read_text()))
    if q.get("commit") != p["commit"]:
        return p
    return {**p, "cores": p.get("cores") or q.get("cores"), "load": p.get("load") or q.get("load")}


# ---------------------------------------------------------------------------------------------------- layout

SKIP_DIRS = {"docs"}  # the site's own pages are in its navigation
DATA = (".json", ".jsonl", ".parquet", ".csv", ".bin")


def _tree() -> list[str]:
    listed = _git("ls-files", "--cached", "--others", "--exclude-standard")
    if listed is not None:
        return sorted(p for p in listed.splitlines() if (ROOT / p).is_file())
    return sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ROOT).parts))


def _describe(path: Path) -> str:
    """The first line of a module's docstring, or of a file's leading `#` comment."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""
    if path.suffix == ".py":
        try:
            return first_line(ast.get_docstring(ast.parse(text)))
        except SyntaxError:
            return ""
    lines = text.splitlines()
    if lines and lines[0].startswith("#!"):
        lines = lines[1:]
    comment = []
    for line in lines:
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    return first_line("\n".join(comment))


def layout_page() -> str:
    files = _tree()
    groups: dict[str, list[str]] = {}
    for f in files:
        top = f.split("/", 1)[0] if "/" in f else ""
        if top in SKIP_DIRS:
            continue
        groups.setdefault(top, []).append(f)
    out = [GENERATED, "# Layout\n",
           "Every file of the tree with the first line of its docstring (Python) or leading comment, generated "
           "from the checkout each time the site is built. Data folders are summarised. The layers import "
           "downwards only: flows → tasks → cluster → schemas (`tests/test_layering.py`).\n"]
    top_rows = [[code(f), md(_describe(ROOT / f))] for f in groups.pop("", [])]
    out.append("## Top level\n")
    out.append(table(["file", "what it is"], top_rows + [[code(d + "/"), md(_describe_dir(d))] for d in groups]))
    for d, members in groups.items():
        out.append(f"## {d}/\n")
        rows, data = [], {}
        for f in members:
            if f.endswith(DATA):  # data files: one row per folder
                data.setdefault(f.rsplit("/", 1)[0] + "/", []).append(f)
            else:
                rows.append([code(f), md(_describe(ROOT / f))])
        rows += [[code(folder), f"{len(fs)} data files"] for folder, fs in data.items()]
        out.append(table(["file", "what it is"], rows))
    return "\n".join(out)


def _describe_dir(d: str) -> str:
    init = ROOT / d / "__init__.py"
    text = _describe(init) if init.exists() else ""
    return text or FOLDERS.get(d, "")


# what a folder is, where its __init__.py has no docstring (or it has none)
FOLDERS = {"cluster": "Ray and the model backends.", "schemas": "Artifact schemas, config models, store, errors.",
           "tasks": "One step per file.", "tests": "pytest; mirrors the tree.",
           "benchmarks": "Scripts that measure and write benchmarks/results/*.json.",
           "examples": "Configs and small query sets that the demo and the studies run.", ".ci": "CI's script."}


# ------------------------------------------------------------------------------------------------ the hook

def _render(name: str) -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return globals()[name]()


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for uri, fn in PAGES.items():
        files.append(File.generated(config, uri, content=_render(fn)))
    return files


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs-generated")
    for uri, fn in PAGES.items():
        (target / uri).parent.mkdir(parents=True, exist_ok=True)
        (target / uri).write_text(_render(fn), encoding="utf-8")
        print(target / uri)
