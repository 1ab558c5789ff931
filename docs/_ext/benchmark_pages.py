"""The benchmarks page's tables and plots, made from the committed results when the site is built.

A page asks for a result file by name::

    ```{benchmark} bench-2026-11-30.json
    :show: table, provenance
    :command: python -m centerkern bench --no-compile --repeats 20 --sweeps B K
    ```

and gets what that file holds as docutils nodes: tables, plots (PNG files written under
``docs/_generated/benchmarks/``, which Sphinx copies into the built site's ``_images``) and a
provenance line (where, when and with what it was measured, and the command that measures it
again). Nothing on the page is copied by hand from a result, so the page cannot drift from the
files in ``benchmarks/results/``. A result is named by the commit it measured, which newer files
record (``commit``) and older ones are given by git (the commit that added the file), and by
its date.

- The argument names one file of ``benchmarks/results/``, or several of one kind: the kinds that
  compare runs (``bench`` goals, ``first-call``, ``data-parallel``) put them side by side.
- The kind is read from the file name's prefix (``bench-``, ``first-call-``, ...; ``:kind:``
  overrides it), and decides which parts there are; ``:show:`` picks some of them, in its order
  (by default every part the file has data for, provenance last).
- ``:command:`` gives the command that measured the file where the file does not record one;
  without it, the command is rebuilt from the parameters the file records.

A missing or malformed file, an unknown kind or part, is a warning naming the file (the site is
built with warnings as errors). Each file is a dependency of the page that shows it, so editing a
result rebuilds the page. Where the ``python -m centerkern bench`` code already formats or plots
something (the size labels, the goals, the sweeps' plot), it is imported rather than repeated.
"""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from centerkern._cli import bench as _bench
from centerkern._cli import alternatives  # what python -m centerkern bench measures, names and plots

logger = logging.getLogger(__name__)

RESULTS = Path("benchmarks") / "results"  # relative to the repository root, the parent of docs/
GENERATED = Path("_generated") / "benchmarks"  # relative to docs/ (git-ignored)
DASH = "–"  # a figure the file does not have
PLOT_DPI = 100  # sharp enough on the page, and a few tenths of a second per plot


class BenchmarkFileError(Exception):
    """A result file that cannot be shown; the message names the file and says why."""


# --------------------------------------------------------------------------- what a page gets


@dataclass(frozen=True)
class Result:
    """One result file as read from ``benchmarks/results/``."""

    path: Path
    data: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def shown_path(self) -> str:
        return (RESULTS / self.path.name).as_posix()

    def label(self, kind: str) -> str:
        """The file's name without its kind and extension (``2026-12-04-b``): a column's title
        where several runs stand side by side."""
        return self.path.stem.removeprefix(f"{kind}-")

    @property
    def day(self) -> str:
        return str(self.data.get("date", ""))[:10] or "an unrecorded date"

    @property
    def commit(self) -> Commit | None:
        """The commit the file records (``centerkern._cli.reports.provenance``), or else the commit
        that added the file to the repository; None where neither is known."""
        recorded = self.data.get("commit")
        if recorded:
            return Commit(str(recorded), recorded=True, uncommitted=bool(self.data.get("uncommitted_changes")))
        added = _commit_that_added(self.path)
        return Commit(added, recorded=False) if added else None


@dataclass(frozen=True)
class Commit:
    """A result's commit: recorded in the file by the run, or the commit that added the file."""

    name: str  # an abbreviated hash
    recorded: bool
    uncommitted: bool = False

    def __str__(self) -> str:
        return self.name + (" with uncommitted changes" if self.uncommitted else "")


@functools.cache
def _commit_that_added(path: Path) -> str | None:
    """The commit that added ``path`` to the repository (a result is committed with, or right
    after, the code it measured); None outside a git checkout."""
    try:
        log = subprocess.run(["git", "log", "--diff-filter=A", "--format=%h", "--", path.name], cwd=path.parent,
                             capture_output=True, text=True, check=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return log[-1] if log else None  # the first time it was added


def measured_at(result: Result) -> str:
    """The code a result measured, as a column's title: its commit, or its date where no commit
    is known."""
    commit = result.commit
    return str(commit) if commit else f"measured {result.day}"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def measured_at_note(results: list[Result]) -> str:
    """What the commits in the columns' titles are: "measured at commit X on DATE"."""
    said = []
    for result in results:
        commit = result.commit
        if commit is None:
            said.append(f"{result.name}: measured on {result.day}, at a commit it does not record")
        elif commit.recorded:
            said.append(f"measured at commit {commit} on {result.day}")
        else:
            said.append(f"measured at commit {commit} on {result.day} (the commit that added {result.name})")
    return "; ".join(said)


@dataclass
class Page:
    """What a formatter may use besides the results: where plots go, and the directive's options."""

    srcdir: Path
    kind: Kind
    command: str | None

    def figure(self, filename: str, draw: Callable[[Path], None], caption: str,
               sources: Iterable[Path]) -> nodes.figure:
        """A figure showing the PNG that ``draw(path)`` writes, drawn again only when it is older
        than what it is drawn from (the result files and the code that draws it)."""
        path = self.srcdir / GENERATED / filename
        if not _is_fresh(path, [*sources, Path(__file__), Path(_bench.__file__)]):
            path.parent.mkdir(parents=True, exist_ok=True)
            draw(path)
        # a path starting with "/" is relative to the source directory: Sphinx's image collector
        # then copies the file into the built site's _images, as for any image of the sources
        image = nodes.image(uri="/" + path.relative_to(self.srcdir).as_posix(), alt=caption)
        image["width"] = "100%"
        figure = nodes.figure("", image, classes=["benchmark-plot"])
        figure += nodes.caption("", caption)
        return figure


def _is_fresh(output: Path, sources: Iterable[Path]) -> bool:
    if not output.exists():
        return False
    made = output.stat().st_mtime
    return all(source.stat().st_mtime <= made for source in sources if source.exists())


Formatter = Callable[[list[Result], Page], list[nodes.Node]]


@dataclass(frozen=True)
class Kind:
    """A kind of result file: the parts a page can show of it, and the command that measures it."""

    name: str  # the file name's prefix
    parts: dict[str, Formatter]  # in the order shown when ``:show:`` is not given
    command: Callable[[Result], str]  # rebuilt from the parameters a file records


# --------------------------------------------------------------------------- docutils helpers


Cell = str | nodes.Node | list


@dataclass(frozen=True)
class Spanning:
    """A row of one cell across the whole table: the title of the rows below it."""

    content: Cell


def _inline(content: Cell) -> list[nodes.Node]:
    if isinstance(content, nodes.Node):
        return [content]
    if isinstance(content, list):
        return [node for part in content for node in _inline(part)]
    return [nodes.Text(content)]


def paragraph(*content: Cell) -> nodes.paragraph:
    return nodes.paragraph("", "", *_inline(list(content)))


def code(text: str) -> nodes.literal:
    return nodes.literal(text, text)


def strong(text: str) -> nodes.strong:
    return nodes.strong(text, text)


def table(header: list[Cell], rows: list[list[Cell] | Spanning], caption: str | None = None) -> nodes.table:
    """A table of the given cells (text or inline nodes), its columns as wide as their content;
    a ``Spanning`` row is one cell across every column.

    A table of figures is read at the page's width (about 900 pixels, no sideways scrolling):
    a formatter keeps it to about seven columns, and splits what has more."""
    node = nodes.table(classes=["benchmark-table", "colwidths-auto"])
    if caption:
        node += nodes.title(caption, caption)
    group = nodes.tgroup(cols=len(header))
    node += group
    group.extend(nodes.colspec(colwidth=1) for _ in header)
    head = nodes.thead()
    head += _row(header)
    body = nodes.tbody()
    body.extend(_spanning_row(row, len(header)) if isinstance(row, Spanning) else _row(row) for row in rows)
    group += head
    group += body
    return node


def _spanning_row(row: Spanning, columns: int) -> nodes.row:
    entry = nodes.entry(morecols=columns - 1)
    entry += paragraph(row.content)
    return nodes.row("", entry, classes=["benchmark-group"])


def _row(cells: list[Cell]) -> nodes.row:
    row = nodes.row()
    for cell in cells:
        entry = nodes.entry()
        entry += paragraph(cell)
        row += entry
    return row


# --------------------------------------------------------------------------- numbers as text


def figure_text(value: float | None) -> str:
    """About three significant figures, thousands separated: 4.6, 33.0, 2,397."""
    if value is None:
        return DASH
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:#.2g}"  # two significant figures, trailing zero kept: 0.30


def microseconds(seconds: float | None) -> str:
    return DASH if seconds is None else figure_text(seconds * 1e6)


def milliseconds(ms: float | None) -> str:
    return DASH if ms is None else f"{figure_text(ms)} ms"


def duration(seconds: float) -> str:
    """Seconds for what takes seconds, milliseconds for what takes less than a tenth."""
    return f"{figure_text(seconds)} s" if seconds >= 0.1 else f"{figure_text(seconds * 1e3)} ms"


def times(ratio: float | None) -> str:
    return DASH if ratio is None else f"{ratio:.2f}x"


def faster_or_slower(ours: float, theirs: float) -> str:
    """How ``ours`` compares with ``theirs`` (times: smaller is faster), as a reader says it."""
    if ours <= theirs:
        return f"{theirs / ours:.2g}x faster" if theirs / ours < 10 else f"{theirs / ours:.0f}x faster"
    return f"{ours / theirs:.2g}x slower" if ours / theirs < 10 else f"{ours / theirs:.0f}x slower"


def at_most(seconds: float) -> str:
    return f"≤ {seconds:g} s" if seconds >= 0.1 else f"≤ {seconds * 1e3:g} ms"


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def ratio_or_none(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


# --------------------------------------------------------------------------- provenance


# the package versions a report may record, as their projects spell them
VERSION_NAMES = {"centerkern": "centerkern", "python": "Python", "numpy": "NumPy", "numba": "Numba",
                 "torch": "torch", "jax": "JAX", "tensorflow": "TensorFlow", "numpy_groupies": "numpy-groupies",
                 "cupy": "CuPy"}


def recorded_versions(data: dict) -> dict:
    """The versions a report records: under ``versions`` (``centerkern._cli.reports.provenance``),
    or at its top level (older reports)."""
    versions = data.get("versions")
    if isinstance(versions, dict):
        return {name: version for name, version in versions.items() if version}
    return {name: data[name] for name in VERSION_NAMES if data.get(name)}


def when(data: dict) -> str:
    date = data.get("date")
    if not date:
        return "date not recorded"
    day, _, time = str(date).partition("T")
    return f"{day} {time[:5]} UTC" if time else day


def where(data: dict) -> str:
    """The machine as the report records it: architecture, platform, CPUs, GPU."""
    described = []
    for key in ("machine", "platform"):
        if data.get(key) and data[key] not in described:
            described.append(data[key])
    if not described:
        described.append("machine not recorded")
    described.append(f"{data['cpus']} CPUs" if data.get("cpus") else "CPU count not recorded")
    if data.get("gpu"):
        capability = data.get("compute_capability")
        described.append(data["gpu"] + (f" (compute capability {'.'.join(map(str, capability))})"
                                        if capability else ""))
    threads = data.get("threads")
    if isinstance(threads, dict):
        layer = f" ({threads['numba threading layer']})" if threads.get("numba threading layer") else ""
        described.append(f"Numba {threads.get('numba')} threads{layer}"
                         + (f", torch {threads['torch']} threads" if threads.get("torch") else ""))
    return ", ".join(map(str, described))


def with_what(data: dict) -> str:
    versions = recorded_versions(data)
    named = [f"{VERSION_NAMES.get(name, name)} {version}" for name, version in versions.items()]
    if not versions:
        return "versions not recorded"
    missing = " (no package versions recorded)" if set(versions) <= {"python"} else ""
    unknown = "" if "centerkern" in versions or missing else " (centerkern's version not recorded)"
    return ", ".join(named) + missing + unknown


def reproduce(result: Result, page: Page) -> list[Cell]:
    """The command that measures the file again: recorded in the file, given by the page, or rebuilt."""
    if result.data.get("command"):
        return [code(result.data["command"])]
    if page.command:
        return [code(page.command)]
    # older files record their parameters but not the command line: it is rebuilt from them
    return [code(page.kind.command(result))]


def which_commit(result: Result) -> list[Cell]:
    commit = result.commit
    if commit is None:
        return [strong("commit"), " not recorded; "]
    if commit.recorded:
        return [strong("commit"), " ", code(commit.name), " with uncommitted changes; " if commit.uncommitted else "; "]
    return [strong("added in commit"), " ", code(commit.name), " (the file records no commit); "]


def provenance(results: list[Result], page: Page) -> list[nodes.Node]:
    return [nodes.paragraph("", "", *_inline([
        strong("Measured"), f" {when(result.data)} on {where(result.data)}; ",
        *which_commit(result),
        strong("versions"), f" {with_what(result.data)}; ",
        strong("reproduce"), " ", *reproduce(result, page), "; ",
        strong("data"), " ", code(result.shown_path), ".",
    ]), classes=["benchmark-provenance"]) for result in results]


# --------------------------------------------------------------------------- bench-*.json


# what older reports called the bandwidth floor: the goals and the sweeps' plot read it as today's
# floor, the tables show it under its own name (it may have been measured otherwise)
OLD_FLOOR_NAMES = ("memcpy floor",)
OURS = "centerkern numba"
BENCH_COLUMNS = {  # implementation: its column, in this order; others follow under their own name
    OURS: "centerkern",
    "centerkern numba, grad_out=": "with grad_out=",
    "torch eager": "torch eager",
    "torch.compile": "torch.compile",
    "jax jit": "JAX jit",
    "tensorflow tf.function": "TF function",
    "numpy sort + reduceat": "sort+reduceat",
    "numpy-groupies": "numpy-groupies",
    "np.subtract.at": "np.subtract.at",
    "numba serial loop": "numba serial",
    "centerkern numpy (reference)": "numpy reference",
}


def current_floor_name(report: dict) -> dict:
    """The report with its floor under today's name, so that today's code reads older reports."""
    floor = alternatives.FLOOR

    def renamed(medians: dict) -> dict:
        return {floor if name in OLD_FLOOR_NAMES else name: seconds for name, seconds in medians.items()}

    def measured(point: dict) -> dict:
        return {**point, "median_seconds": {operation: renamed(medians)
                                            for operation, medians in point["median_seconds"].items()}}

    return {**report,
            "sizes": {name: measured(size) for name, size in report["sizes"].items()},
            "sweeps": {variable: [measured(point) for point in points]
                       for variable, points in report.get("sweeps", {}).items()}}


def measured_implementations(report: dict) -> set[str]:
    return {name for size in report["sizes"].values() for medians in size["median_seconds"].values()
            for name in medians}


def floor_name(report: dict) -> str:
    """What the report calls the bandwidth floor (older reports named it otherwise)."""
    present = measured_implementations(report)
    return next((name for name in (alternatives.FLOOR, *OLD_FLOOR_NAMES) if name in present), alternatives.FLOOR)


def bench_implementations(report: dict) -> list[str]:
    """Every implementation with a figure in the report: the usual columns first, the floor last."""
    floor = floor_name(report)
    present = measured_implementations(report)
    known = [name for name in BENCH_COLUMNS if name in present]
    return known + sorted(present - set(known) - {floor}) + [floor]


# the bench's tables, each narrow enough to be read at the page's width: centerkern beside torch
# eager and the floor with the two ratios the text cites, then the other peers by family, each
# table with centerkern's column to read them against
FIRST_TABLE = (OURS, "centerkern numba, grad_out=", alternatives.TORCH)
PEER_FAMILIES = (
    ("the compiled frameworks", ("torch.compile", "jax jit", "tensorflow tf.function")),
    ("NumPy and a plain Numba loop", ("numpy sort + reduceat", "numpy-groupies", "np.subtract.at",
                                      "numba serial loop", "centerkern numpy (reference)")),
)
PEERS_PER_TABLE = 5  # beside the size's operation and centerkern: seven columns at most


def bench_table(results: list[Result], page: Page) -> list[nodes.Node]:
    shown = []
    for result in results:
        shown += [*_bench_medians(result.data), _absent_note(result.data)]
    return shown


def _bench_medians(report: dict) -> list[nodes.table]:
    """The medians as tables of at most seven columns: the first with the ratios, then the peers."""
    floor, torch = floor_name(report), alternatives.TORCH
    names = bench_implementations(report)
    first = [name for name in FIRST_TABLE if name in names]
    header = ["operation", *(BENCH_COLUMNS.get(name, name) for name in first),
              "floor" if floor == alternatives.FLOOR else floor, "centerkern / floor", "torch eager / centerkern"]

    def first_row(operation: str, medians: dict) -> list[Cell]:
        return [operation, *(microseconds(medians.get(name)) for name in [*first, floor]),
                times(ratio_or_none(medians.get(OURS), medians.get(floor))),
                times(ratio_or_none(medians.get(torch), medians.get(OURS)))]

    shown = [table(header, _rows_by_size(report, first_row, lambda medians: True),
                   caption="median µs per call: centerkern, torch eager and the bandwidth floor")]
    for title, peers in _peer_tables(names, {*first, floor}):
        def peer_row(operation: str, medians: dict, peers=peers) -> list[Cell]:
            return [operation, *(microseconds(medians.get(name)) for name in (OURS, *peers))]

        rows = _rows_by_size(report, peer_row, lambda medians, peers=peers: any(name in medians for name in peers))
        if rows:
            shown.append(table(["operation", BENCH_COLUMNS[OURS], *(BENCH_COLUMNS.get(name, name) for name in peers)],
                               rows, caption=f"median µs per call: centerkern and {title}"))
    return shown


def _peer_tables(names: list[str], shown: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The peers not in the first table, by family, at most ``PEERS_PER_TABLE`` to a table."""
    left = [name for name in names if name not in shown and name != OURS]
    grouped = [(title, tuple(name for name in family if name in left)) for title, family in PEER_FAMILIES]
    known = {name for _, family in grouped for name in family}
    grouped.append(("the other implementations", tuple(name for name in left if name not in known)))
    return [(title, family[start:start + PEERS_PER_TABLE]) for title, family in grouped
            for start in range(0, len(family), PEERS_PER_TABLE)]


def _rows_by_size(report: dict, make_row: Callable[[str, dict], list[Cell]],
                  keep: Callable[[dict], bool]) -> list[list[Cell] | Spanning]:
    """A row per operation, under a row naming the size (B, D, K), for the sizes with a row."""
    rows: list[list[Cell] | Spanning] = []
    for size_name, size in report["sizes"].items():
        kept = [make_row(operation, medians) for operation, medians in size["median_seconds"].items() if keep(medians)]
        if kept:
            rows += [Spanning(strong(_size_label(size_name, size))), *kept]
    return rows


def _size_label(name: str, size: dict) -> str:
    return _bench.Size(name, size["B"], size["D"], size["K"], size.get("hot_share", 0.0),
                       size.get("alpha", alternatives.ALPHA)).label()


def _absent_note(report: dict) -> nodes.paragraph:
    """Why a figure is missing: the reasons the report gives, and otherwise not measured there."""
    reasons: dict[tuple[str, str], list[str]] = {}
    for size in report["sizes"].values():
        for operation, absent in size.get("absent", {}).items():
            for name, reason in absent.items():
                operations = reasons.setdefault((name, reason), [])
                if operation not in operations:
                    operations.append(operation)
    said = [[code(BENCH_COLUMNS.get(name, name)), f" ({', '.join(operations)}): {reason}"]
            for (name, reason), operations in reasons.items()]
    joined = [part for index, parts in enumerate(said) for part in ([] if index == 0 else ["; "]) + parts]
    return paragraph(f"{DASH}: not measured at that size", *([", or absent: "] if said else []), *joined, ".")


def bench_goals(results: list[Result], page: Page) -> list[nodes.Node]:
    """The goals each run records (met or missed), one column per run where there are several."""
    recorded = [(result, _goals_of(result)) for result in results]
    order = list(dict.fromkeys(goal["goal"] for _, goals in recorded for goal in goals))
    if not order:
        return []
    several = len(results) > 1
    header = ["goal", "at most", *([result.label("bench") for result in results] if several else ["measured", ""])]
    rows = []
    for name in order:
        found = [next((goal for goal in goals if goal["goal"] == name), None) for _, goals in recorded]
        most = next(goal["at most"] for goal in found if goal)
        cells = [_goal_cell(goal, several) for goal in found]
        rows.append([name, f"{most}x", *(cells if several else _split_goal_cell(found[0]))])
    shown: list[nodes.Node] = [table(header, rows, caption="the numba backend's goals (time / reference, medians)")]
    computed = [result for result, _ in recorded if "goals" not in result.data]
    if computed:
        shown.append(paragraph(", ".join(result.name for result in computed),
                               " records no goals: they are computed from its medians by the goals of "
                               "today's ", code("python -m centerkern bench"), "."))
    return shown


def _goals_of(result: Result) -> list[dict]:
    if "goals" in result.data:
        return result.data["goals"]
    return _bench.goals(current_floor_name(result.data))


def _goal_cell(goal: dict | None, with_verdict: bool) -> str:
    if goal is None:
        return DASH
    worst = f" ({goal['where']})" if goal.get("where") else ""
    return f"{goal['ratio']:.2f}x{worst}" + (f", {verdict(goal['met'])}" if with_verdict else "")


def _split_goal_cell(goal: dict) -> list[str]:
    return [_goal_cell(goal, with_verdict=False), verdict(goal["met"])]


def bench_first_call(results: list[Result], page: Page) -> list[nodes.Node]:
    said = [f"{result.label('bench')}: cold kernel cache {duration(cost['cold cache seconds'])}, "
            f"warm {duration(cost['warm cache seconds'])}"
            for result in results if (cost := result.data.get("compile_cost"))]
    if not said:
        return []
    return [paragraph(strong("First call"), " of ", code("center_loss"),
                      " in a fresh process, serial regime, import included (recorded by the same run): ",
                      "; ".join(said), ".")]


def bench_sweeps(results: list[Result], page: Page) -> list[nodes.Node]:
    """The sweeps as ``python -m centerkern bench`` plots them, drawn again from the file."""
    shown = []
    for result in results:
        if not result.data.get("sweeps"):
            continue
        report = current_floor_name(result.data)
        draw = lambda path, report=report: _bench_plot(report, path)  # noqa: E731 (one report each)
        shown.append(page.figure(f"{result.path.stem}-sweeps.png", draw,
                                 f"The sweeps of {result.name}: time of one facenet step against B and K, "
                                 "and its ratio to the bandwidth floor.", [result.path]))
    return shown


def _bench_plot(report: dict, path: Path) -> None:
    """``_bench.plot`` writes ``bench-<date>.png`` into a folder: here, the folder of ``path``."""
    written = _bench.plot(report, path.parent)
    if not written:
        raise BenchmarkFileError("no plot: matplotlib is not installed, or no sweep over B or K was measured")
    Path(written[0]).replace(path)


def bench_command(result: Result) -> str:
    data = result.data
    command = ["python -m centerkern bench"]
    if list(data["sizes"]) != list(_bench.SIZES):
        command.append("--sizes " + " ".join(f'"{name}"' if " " in name else name for name in data["sizes"]))
    sweeps = list(data.get("sweeps", {}))
    if sweeps != list(_bench.SWEEPS):
        command.append("--sweeps" + "".join(f" {variable}" for variable in sweeps))
    named = {name for size in data["sizes"].values()
             for part in ("median_seconds", "absent") for medians in size.get(part, {}).values() for name in medians}
    if "torch.compile" not in named:
        command.append("--no-compile")
    if "compile_cost" not in data:
        command.append("--no-compile-cost")
    return " ".join(command)


# --------------------------------------------------------------------------- revisions-*.json


def revisions_table(results: list[Result], page: Page) -> list[nodes.Node]:
    shown = []
    for result in results:
        data = result.data
        other = data["other revision"]
        rows, ratios = [], []
        for size, operations in data["sizes"].items():
            for operation, measured in operations.items():
                ratios.append((measured["this / other"], f"{size} {operation}"))
                rows.append([size, operation, microseconds(measured["this_seconds"]),
                             microseconds(measured["other_seconds"]), times(measured["this / other"])])
        worst, at = max(ratios)
        median = data.get("median this / other", statistics.median(ratio for ratio, _ in ratios))
        this = measured_at(result)
        # the backend alone (also files from before --level existed), the public calls, or the torch module
        timed = {"api": "the public calls", "torch": "CenterLoss's forward and backward"}.get(
            data.get("level"), "the numba kernels")
        shown += [table(["size", "operation", this, other, f"{this} / {other}"], rows,
                        caption=f"{timed} at {this} and at {other}, median µs per call"),
                  paragraph(f"{this}: {timed} {measured_at_note([result])}. "
                            f"{this} / {other}: {median:.2f} in the median of the {len(ratios)} size-operation "
                            f"pairs, {worst:.2f} at worst ({at}); "
                            f"{data.get('repeats', 'an unrecorded number of')} interleaved blocks each.")]
    return shown


def revisions_command(result: Result) -> str:
    repeats = f" --repeats {result.data['repeats']}" if result.data.get("repeats") else ""
    level = f" --level {result.data['level']}" if result.data.get("level") else ""
    return f"python benchmarks/compare_revisions.py {result.data['other revision']}{level}{repeats}"


# --------------------------------------------------------------------------- first-call-*.json


def first_call_table(results: list[Result], page: Page) -> list[nodes.Node]:
    """Each case's median (and the spread of its fresh processes) in every run given, against the
    goal it is held to; a run made ``--against`` a revision shows that revision beside it."""
    columns = []  # (title, the run, key prefix: "" for the code measured, "other_" for the revision beside it)
    for result in results:
        against = result.data.get("against")
        if against:
            columns.append((f"{against} ({_other_version(result.data)})", result, "other_"))
        columns.append((measured_at(result), result, ""))
    cases = list(dict.fromkeys(case for result in results for case in result.data["cases"]))
    rows = []
    for case in cases:
        what = next(result.data["cases"][case]["what"] for result in results if case in result.data["cases"])
        goals = [result.data.get("goals", {}).get(what) for result in results]
        target = next((goal["target"] for goal in goals if goal), None)
        rows.append([what, *(_first_call_cell(result.data["cases"].get(case), prefix) for _, result, prefix in columns),
                     at_most(target) if target is not None else "",
                     " / ".join(_first_call_verdict(goal) for goal in goals if goal)])
    shown: list[nodes.Node] = [table(["first call", *(title for title, _, _ in columns), "goal", ""], rows,
                                     caption="median of fresh processes (slowest and fastest in brackets)"),
                               paragraph(_sentence(measured_at_note(results)))]
    shown += [_each_layout(result) for result in results if "each" in result.data["cases"].get("new layouts", {})]
    return shown


def _other_version(data: dict) -> str:
    versions = [case.get("other_version") for case in data["cases"].values() if case.get("other_version")]
    return versions[0].split()[0] if versions else "version not recorded"


def _first_call_cell(case: dict | None, prefix: str) -> str:
    if case is None or f"{prefix}median_seconds" not in case:
        return DASH
    runs = case.get(f"{prefix}runs_seconds") or []
    spread = f" ({duration(min(runs))}–{duration(max(runs))})" if len(runs) > 1 else ""
    return duration(case[f"{prefix}median_seconds"]) + spread


def _first_call_verdict(goal: dict) -> str:
    if goal["met"]:
        return "met"
    return f"missed by {duration(goal['value'] - goal['target'])}"


def _each_layout(result: Result) -> nodes.paragraph:
    each = result.data["cases"]["new layouts"]["each"]
    return paragraph(f"New layouts, each ({result.label('first-call')}, one run): ",
                     ", ".join(f"{layout} {duration(seconds)}" for layout, seconds in each.items()), ".")


def first_call_command(result: Result) -> str:
    against = f" --against {result.data['against']}" if result.data.get("against") else ""
    return f"python -m centerkern bench --first-call --repeats {result.data.get('repeats', 3)}{against}"


# --------------------------------------------------------------------------- adapters-*.json


def _ours_first(group: dict) -> tuple[str, list[str]]:
    """centerkern's entry of a group (its name starts with centerkern) and the others'."""
    ours = next(name for name in group if name.startswith("centerkern"))
    return ours, [name for name in group if name != ours]


def _size_text(size: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in size.items())


def adapters_table(results: list[Result], page: Page) -> list[nodes.Node]:
    shown = []
    for result in results:
        rows = []
        for step, group in result.data["groups"].items():
            ours, others = _ours_first(group)
            for other in others:
                rows.append([step, [code(ours), f" {milliseconds(group[ours])}"],
                             [code(other), f" {milliseconds(group[other])}"],
                             f"centerkern {faster_or_slower(group[ours], group[other])}"])
        shown.append(table(["step", "centerkern", "the framework's own", ""], rows,
                           caption=f"{result.data.get('what', 'median ms of one step')}; {_size_text(result.data['size'])}"))
    return shown


def adapters_command(result: Result) -> str:
    size = result.data["size"]
    return f"python benchmarks/adapters.py --size {size['B']},{size['D']},{size['K']}"


# --------------------------------------------------------------------------- gpu-host-*.json


def gpu_host_table(results: list[Result], page: Page) -> list[nodes.Node]:
    """A row per call, a column pair (µs, trivial-call units) per framework: the host's time per
    call with the driver stubbed, and what the call asks of the driver and of Python."""
    shown = []
    for result in results:
        cases = result.data["cases"]
        frameworks = list(dict.fromkeys(row["framework"] for row in cases))
        by_case = {}
        for row in cases:
            by_case.setdefault(row["case"], {})[row["framework"]] = row
        rows = []
        for case, by_framework in by_case.items():
            device = next((row for name, row in by_framework.items() if name != "numpy"), None)
            cells = []
            for framework in frameworks:
                row = by_framework.get(framework)
                cells.append(DASH if row is None else f"{figure_text(row['host_us'])} µs ({row['units']:.2f})")
            counts = DASH if device is None else (f"{device['launches']} + {device['memsets']}, "
                                                  f"{device['python_calls']}")
            rows.append([code(case), *cells, counts])
        calibration = min(row["calibration_us"] for row in cases)
        names = {"numpy": "the CPU path (NumPy)", "numba": "Numba arrays"}
        caption = (f"{result.data.get('what', 'host time per call')}: the quietest round, in µs and (in brackets) "
                   f"in units of the time of 1000 trivial Python calls ({figure_text(calibration)} µs in the "
                   f"quietest round); goals {result.data['goals']['step_units']:.2f} units for a step, "
                   f"{result.data['goals']['gather_units']:.2f} for the gather")
        shown.append(table(["call", *(names.get(name, f"{name} tensors" if name == "torch" else name)
                                      for name in frameworks), "launches + memsets, Python calls"], rows,
                           caption=caption))
    return shown


# --------------------------------------------------------------------------- jax-ffi-*.json


def jax_ffi_table(results: list[Result], page: Page) -> list[nodes.Node]:
    """A row per implementation, a column per size: the implementations' names are long, the
    sizes few."""
    shown = []
    for result in results:
        sizes = result.data["sizes"]
        names = list(dict.fromkeys(name for size in sizes.values() for name in size["median_ms"]))
        rows = [[code(name) if name.startswith(("centerkern", "jax")) else name,
                 *(milliseconds(size["median_ms"].get(name)) for size in sizes.values())] for name in names]
        caption = result.data.get("what", "median ms") + (f"; {result.data['path']}" if result.data.get("path") else "")
        shown.append(table(["step", *(f"{name} (B={size['B']}, D={size['D']}, K={size['K']})"
                                      for name, size in sizes.items())], rows, caption=caption))
    return shown


def jax_ffi_fixed_cost(results: list[Result], page: Page) -> list[nodes.Node]:
    return [paragraph(strong("Fixed cost"), " of a call that does nothing (median µs): ",
                      ", ".join(f"{name} {figure_text(us)} µs" for name, us in costs.items()), ".")
            for result in results if (costs := result.data.get("fixed cost, median us"))]


def recorded_goals(results: list[Result], page: Page) -> list[nodes.Node]:
    """Goals recorded as ``{goal: {value, target, met}}`` (the JAX custom call's)."""
    shown = []
    for result in results:
        goals = result.data.get("goals")
        if not isinstance(goals, dict) or not all(isinstance(goal, dict) for goal in goals.values()):
            continue
        rows = [[name, str(goal["target"]), f"{goal['value']:.2f}", verdict(goal["met"])] for name, goal in goals.items()]
        shown.append(table(["goal", "target", "measured", ""], rows, caption="goals (ratios of medians)"))
    return shown


def jax_ffi_command(result: Result) -> str:
    return f"python benchmarks/jax_ffi.py --sizes {','.join(result.data['sizes'])}"


# --------------------------------------------------------------------------- distributed-*.json


def distributed_table(results: list[Result], page: Page) -> list[nodes.Node]:
    threshold = _sparse_below_fraction()
    header = ["ranks R", "U per rank", "R·U/K", "sparse ms", "dense ms", "faster", 'exchange="auto" picks']
    shown = []
    for result in results:
        rows = [_exchange_row(row, threshold) for row in result.data["rows"]]
        first = result.data["rows"][0]
        caption = f"{result.data.get('what', 'median ms')}; K={first['classes']}, D={first['width']}"
        shown += [table(header, rows, caption=caption), _exchange_summary(result.data)]
    return shown


def _exchange_row(row: dict, threshold: float) -> list[Cell]:
    """One measured step: which exchange was the faster, by how much, and which one auto takes."""
    sparse, dense = row["sparse_ms"], row["dense_ms"]
    faster = "sparse" if sparse <= dense else "dense"
    margin = max(sparse, dense) / min(sparse, dense)
    picked = "sparse" if row["load"] < threshold else "dense"
    if picked != faster:
        picked += f" (the slower, by {margin - 1:.0%})"
    return [str(row["ranks"]), str(row["touched_per_rank"]), f"{row['load']:.3f}", figure_text(sparse),
            figure_text(dense), f"{margin:.1f}x {faster}", picked]


def _sparse_below_fraction() -> float:
    # what exchange="auto" compares R·U/K with; torch is imported by the site's API pages anyway
    from centerkern.distributed import SPARSE_BELOW_FRACTION

    return SPARSE_BELOW_FRACTION


def _exchange_summary(data: dict) -> nodes.paragraph:
    crossover = data.get("crossover_load") or {}
    said = [f"at R·U/K = {load:.3g} with {ranks} ranks" for ranks, load in crossover.items()]
    disagree = [f"R={row['ranks']} U={row['touched_per_rank']}" for row in data["rows"] if row.get("agree") is False]
    agreed = ("Both exchanges gave the same centers in every row." if not disagree
              else f"The exchanges' centers differed at {', '.join(disagree)}.")
    first_faster = f"The dense exchange is first measured the faster {', '.join(said)}. " if said else ""
    return paragraph(first_faster, agreed)


def distributed_plot(results: list[Result], page: Page) -> list[nodes.Node]:
    threshold = _sparse_below_fraction()
    return [page.figure(f"{result.path.stem}-exchanges.png",
                        lambda path, data=result.data: _draw_exchanges(data, threshold, path),
                        "Sparse against dense exchange: the ratio of their step times against R·U/K, per number "
                        f"of ranks (above 1: dense is the faster). exchange=\"auto\" takes sparse below {threshold:g}.",
                        [result.path]) for result in results]


def _draw_exchanges(data: dict, threshold: float, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: nothing global to close afterwards
    from matplotlib.ticker import FuncFormatter, NullFormatter

    figure = Figure(figsize=(9, 5.2))  # 900 pixels: shown at the page's width without scaling
    axis = figure.subplots()
    for ranks in sorted({row["ranks"] for row in data["rows"]}):
        rows = sorted((row for row in data["rows"] if row["ranks"] == ranks), key=lambda row: row["load"])
        axis.plot([row["load"] for row in rows], [row["sparse_ms"] / row["dense_ms"] for row in rows],
                  marker="o", label=f"{ranks} ranks")
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.axvline(threshold, color="gray", linestyle="--", linewidth=0.8, label='exchange="auto" threshold')
    axis.set_xscale("log")
    axis.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.5 and 2, not 5 x 10^-1 and 2 x 10^0
    axis.xaxis.set_major_formatter(plain)
    axis.yaxis.set_major_formatter(plain)
    axis.yaxis.set_minor_formatter(NullFormatter())
    axis.set_yticks([tick for tick in (0.1, 0.2, 0.5, 1, 2, 5, 10) if _within(tick, axis.get_ylim())])
    axis.text(0.02, 0.98, "dense faster", transform=axis.transAxes, va="top", ha="left", fontsize=10, color="gray")
    axis.text(0.98, 0.02, "sparse faster", transform=axis.transAxes, va="bottom", ha="right", fontsize=10, color="gray")
    axis.set_xlabel("R·U/K (rows all-gathered by the sparse exchange, over K)")
    axis.set_ylabel("sparse ms / dense ms")
    first = data["rows"][0]
    axis.set_title(f"distributed step, K={first['classes']}, D={first['width']}, {data.get('date', '')[:10]}", fontsize=11)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=10, loc="center left")
    figure.tight_layout()
    figure.savefig(path, dpi=PLOT_DPI)


def _within(value: float, limits: tuple[float, float]) -> bool:
    return min(limits) <= value <= max(limits)


def distributed_command(result: Result) -> str:
    rows = result.data["rows"]
    ranks = " ".join(str(value) for value in sorted({row["ranks"] for row in rows}))
    touched = " ".join(str(value) for value in sorted({row["touched_per_rank"] for row in rows}))
    return (f"python benchmarks/distributed_exchange.py --ranks {ranks} --classes {rows[0]['classes']} "
            f"--width {rows[0]['width']} --touched {touched}")


# --------------------------------------------------------------------------- distributed-sharded-*.json


def sharded_table(results: list[Result], page: Page) -> list[nodes.Node]:
    """Two tables of a row per run: the step's time, then each rank's memory."""
    shown = []
    for result in results:
        speed_rows, memory_rows = [], []
        for row in result.data["rows"]:
            replicated = ("not run" if "sparse_peak_mb_per_rank" not in row
                          else f"{figure_text(row['sparse_peak_mb_per_rank'])} / {figure_text(row['dense_peak_mb_per_rank'])}")
            speed = row.get("sharded_over_faster_data_parallel")
            run = [str(row["ranks"]), f"{row['classes']:,}"]
            speed_rows.append([*run, figure_text(row["sharded_ms"]),
                               figure_text(row["sparse_ms"]) if "sparse_ms" in row else "not run",
                               figure_text(row["dense_ms"]) if "dense_ms" in row else "not run",
                               f"{speed:.2f}x, {verdict(row['speed_goal_met'])}" if speed is not None else DASH,
                               {True: "yes", False: "no"}.get(row.get("sharded_equals_sparse_bitwise"), DASH)])
            memory_rows.append([*run, figure_text(row["sharded_peak_mb_per_rank"]),
                                f"{figure_text(row['memory_goal_mb'])}, {verdict(row['sharded_memory_goal_met'])}",
                                replicated, figure_text(row["baseline_mb"])])
        first = result.data["rows"][0]
        sizes = f"D={first['width']}, B={first['batch_per_rank']} samples per rank"
        shown += [table(["ranks", "K", "sharded ms", "sparse ms", "dense ms", "sharded / faster replicated",
                         "sharded = sparse, bit for bit"], speed_rows,
                        caption=f"median ms of one step on rank 0; {sizes}"),
                  table(["ranks", "K", "sharded peak MB per rank", "its goal, MB",
                         "replicated peak MB per rank (sparse / dense)", "baseline MB"], memory_rows,
                        caption=f"each rank's peak growth of its resident set; {sizes}")]
    return shown


def sharded_goals(results: list[Result], page: Page) -> list[nodes.Node]:
    shown = []
    for result in results:
        goals = result.data.get("goals") or {}
        said = [[strong(name), f": {text}"] for name, text in goals.items() if name != "all_met"]
        if "all_met" in goals:
            said.append(["all met" if goals["all_met"] else "not all met"])
        if said:
            shown.append(paragraph(strong("Goals"), " — ", *[part for index, parts in enumerate(said)
                                                             for part in ([] if index == 0 else ["; "]) + parts], "."))
        if result.data.get("what"):
            shown.append(paragraph(strong("What is measured"), f": {result.data['what']}."))
    return shown


def sharded_command(result: Result) -> str:
    return "python benchmarks/distributed_sharded.py"


# --------------------------------------------------------------------------- data-parallel-*.json


def data_parallel_table(results: list[Result], page: Page) -> list[nodes.Node]:
    """Files measuring every K (``--classes``): a table per framework, a row per K, a column per
    step, each compared with centerkern's whole-batch step. Earlier files (one K each): one row
    per file, one column per implementation of each framework."""
    by_class_count = [result for result in results if "K" not in result.data["size"]]
    shown = [node for result in by_class_count for node in _data_parallel_by_class_count(result)]
    one_each = [result for result in results if "K" in result.data["size"]]
    return shown + (_data_parallel_one_size_each(one_each) if one_each else [])


def _data_parallel_by_class_count(result: Result) -> list[nodes.Node]:
    shown = []
    for group, by_k in result.data["groups"].items():
        names = list(dict.fromkeys(name for steps in by_k.values() for name in steps))
        ours = next(name for name in names if name.startswith("centerkern"))
        rows = []
        for k, steps in by_k.items():
            row = [f"{int(k.removeprefix('K=')):,}"]
            for name in names:
                if name not in steps:
                    row.append(DASH)
                    continue
                comparison = "" if name == ours else f" ({faster_or_slower(steps[name], steps[ours])})"
                row.append(milliseconds(steps[name]) + comparison)
            rows.append(row)
        caption = f"{group}: {result.data.get('what', 'median ms')}; {_size_text(result.data['size'])}"
        shown.append(table(["K", *names], rows, caption=caption))
    return shown


def _data_parallel_one_size_each(results: list[Result]) -> list[nodes.Node]:
    sizes = [result.data["size"] for result in results]
    varying = [key for key in sizes[0] if len({size.get(key) for size in sizes}) > 1] or ["K"]
    fixed = {key: value for key, value in sizes[0].items() if key not in varying}
    columns = list(dict.fromkeys((group, name) for result in results
                                 for group, implementations in result.data["groups"].items() for name in implementations))
    rows = []
    for result in results:
        row = [", ".join(f"{key}={result.data['size'][key]}" for key in varying)]
        for group, name in columns:
            implementations = result.data["groups"].get(group, {})
            if name not in implementations:
                row.append(DASH)
                continue
            ours, _ = _ours_first(implementations)
            comparison = "" if name == ours else f" ({faster_or_slower(implementations[name], implementations[ours])})"
            row.append(milliseconds(implementations[name]) + comparison)
        rows.append(row)
    caption = f"{results[0].data.get('what', 'median ms')}; {_size_text(fixed)}"
    return [table([" ".join(varying), *(f"{group}: {name}" for group, name in columns)], rows, caption=caption)]


def data_parallel_command(result: Result) -> str:
    size = result.data["size"]
    if "K" in size:  # an earlier file, of one K
        return f"python benchmarks/data_parallel.py --size {size['B']},{size['D']},{size['K']}"
    classes = ",".join(k.removeprefix("K=") for k in next(iter(result.data["groups"].values())))
    return f"python benchmarks/data_parallel.py --size {size['B']},{size['D']} --classes {classes}"


# --------------------------------------------------------------------------- gpu-*.json


def _gpu_configuration(timing: dict) -> str:
    hot = f", {timing['hot_share']:.0%} in 3 classes" if timing.get("hot_share") else ""
    return f"B={timing['B']}, K={timing['K']}{hot}"


def gpu_timings(results: list[Result], page: Page) -> list[nodes.Node]:
    shown = []
    for result in results:
        timings = result.data["timings"]
        names = list(dict.fromkeys(name for timing in timings for name in timing["median_ms"]))
        rows = [[name, *(milliseconds(timing["median_ms"].get(name)) for timing in timings)] for name in names]
        rows.append(["touched classes", *(f"{timing['touched_classes']:,}" for timing in timings)])
        rows.append(["bytes the step moves at least (floor)", *(f"{timing['floor_bytes'] / 1e6:,.1f} MB" for timing in timings)])
        rows.append(["achieved by the step", *(f"{timing['achieved_step_TBps']:.2f} TB/s" for timing in timings)])
        dims = sorted({timing["D"] for timing in timings})
        shown.append(table(["median ms of one call (CUDA events)", *(_gpu_configuration(timing) for timing in timings)],
                           rows, caption=f"float32, D={', '.join(map(str, dims))}, rule facenet"))
    return shown


def gpu_ratios(results: list[Result], page: Page) -> list[nodes.Node]:
    shown = []
    for result in results:
        timings = result.data["timings"]
        names = list(dict.fromkeys(name for timing in timings for name in timing["ratios"]))
        rows = [[name, *(times(timing["ratios"].get(name)) for timing in timings)] for name in names]
        shown.append(table(["ratio", *(_gpu_configuration(timing) for timing in timings)], rows,
                           caption="ratios of the medians above"))
    return shown


def gpu_launch_shapes(results: list[Result], page: Page) -> list[nodes.Node]:
    """The launch-shape sweep as one row per shape, a column per batch and mode."""
    shown = []
    for result in results:
        sweep = result.data.get("launch_shape_sweep") or []
        if not sweep:
            continue
        shapes = list(dict.fromkeys((point["tile_rows"], point["columns_per_block"]) for point in sweep))
        modes = list(dict.fromkeys((point["hot_share"], point["deterministic"]) for point in sweep))
        median = {(point["tile_rows"], point["columns_per_block"], point["hot_share"], point["deterministic"]):
                  point["median_ms"] for point in sweep}
        header = ["tile rows × columns per block",
                  *(f"{'uniform' if not hot else f'{hot:.0%} in 3 classes'}, {'deterministic' if exact else 'default'}"
                    for hot, exact in modes)]
        rows = [[f"{rows} × {columns}", *(milliseconds(median.get((rows, columns, hot, exact))) for hot, exact in modes)]
                for rows, columns in shapes]
        shown.append(table(header, rows, caption="the step's median ms by launch shape"))
    return shown


def gpu_checks(results: list[Result], page: Page) -> list[nodes.Node]:
    shown = []
    for result in results:
        data = result.data
        items = []
        if "first_call_seconds" in data:
            items.append(f"the process's first step: {duration(data['first_call_seconds'])}")
        overhead = data.get("host_overhead") or {}
        timed = [f"{name.replace('host seconds', 'host time').replace(' seconds', '')} {duration(seconds)}"
                 for name, seconds in overhead.items() if isinstance(seconds, (int, float))]
        if timed:
            items.append("host time: " + ", ".join(timed))
        checks = data.get("property_checks")
        if checks:
            items.append(f"property checks: {checks['cases']} cases, {len(checks['failures'])} failures")
        deterministic = data.get("deterministic_check") or {}
        for mode, outcome in deterministic.items():
            items.append(f"{mode} mode: " + ", ".join(f"{name.replace('_', ' ')} {'yes' if value else 'no'}"
                                                       for name, value in outcome.items()))
        if "simulator" in data:
            items.append("measured on the device" if data["simulator"] is False
                         else "measured in Numba's CUDA simulator (its timings mean nothing)")
        if items:
            listed = nodes.bullet_list()
            listed.extend(nodes.list_item("", paragraph(item)) for item in items)
            shown.append(listed)
    return shown


def gpu_command(result: Result) -> str:
    return f"python benchmarks/gpu_check.py {result.shown_path}"


# --------------------------------------------------------------------------- codebooks-*.json


def _memory_cell(memory) -> str:
    """A peak-memory entry: MiB over the setup, or why it was not measured."""
    if isinstance(memory, str):
        return memory
    if not isinstance(memory, dict) or "increase_mib" not in memory:
        return DASH if memory is None else str(memory.get("error", DASH))
    return f"{memory['increase_mib']:,.1f} MiB"


def codebooks_ema_table(results: list[Result], page: Page) -> list[nodes.Node]:
    """A row per N x K x D: the update alone and forward + update, ours against
    vector-quantize-pytorch's, and the peak memory of one forward + update call."""
    shown = []
    for result in results:
        rows = []
        for case in result.data["ema"].values():
            medians = case["median_ms"]
            peer = "vector-quantize-pytorch"
            skipped = case.get(peer)
            memory = case.get("peak memory", {})

            def cell(what: str) -> str:
                ours = medians[f"centerkern {what}"]
                theirs = medians.get(f"{peer} {what}")
                return milliseconds(ours) + ("" if theirs is None else f" vs {milliseconds(theirs)}, "
                                                                        f"{faster_or_slower(ours, theirs)}")

            rows.append([f"{case['N']:,} x {case['K']:,} x {case['D']}", f"{case['one-hot bytes'] / 2**20:,.0f} MiB",
                         cell("update"), cell("forward+update"), _memory_cell(memory.get("centerkern")),
                         skipped if skipped else _memory_cell(memory.get(peer))])
        shown.append(table(["N x K x D", "one-hot N x K", "update alone, ms (vs the peer's)",
                            "forward + update, ms (vs the peer's)", "peak memory, centerkern",
                            "peak memory, vector-quantize-pytorch"], rows,
                           caption="the EMA codebook, float32, median of the timed calls; peak memory: "
                                   + result.data.get("memory", "of one forward + update call")))
    return shown


def codebooks_kmeans_table(results: list[Result], page: Page) -> list[nodes.Node]:
    """A row per mini-batch k-means case: partial_fit and the update alone against scikit-learn's."""
    shown = []
    for result in results:
        rows = []
        for case in result.data["kmeans"].values():
            medians = case["median_ms"]
            row = [f"{case['N']:,} x {case['K']:,} x {case['D']}, {case['dtype']}"]
            for what in ("partial_fit", "update"):
                ours, theirs = medians.get(f"centerkern {what}"), medians.get(f"scikit-learn {what}")
                row.append(DASH if theirs is None else
                           f"{milliseconds(ours)} vs {milliseconds(theirs)}, {faster_or_slower(ours, theirs)}")
            rows.append(row)
        shown.append(table(["N x K x D", "partial_fit, ms (vs scikit-learn's)", "update alone, ms (vs scikit-learn's)"],
                           rows, caption="mini-batch k-means, median of the timed calls"))
    return shown


def codebooks_command(result: Result) -> str:
    return "python benchmarks/codebooks.py"


# --------------------------------------------------------------------------- the kinds


KINDS = {kind.name: kind for kind in [
    Kind("bench", {"table": bench_table, "sweeps": bench_sweeps, "goals": bench_goals,
                   "first-call": bench_first_call, "provenance": provenance}, bench_command),
    Kind("revisions", {"table": revisions_table, "provenance": provenance}, revisions_command),
    Kind("first-call", {"table": first_call_table, "provenance": provenance}, first_call_command),
    Kind("adapters", {"table": adapters_table, "provenance": provenance}, adapters_command),
    Kind("jax-ffi", {"table": jax_ffi_table, "fixed-cost": jax_ffi_fixed_cost, "goals": recorded_goals,
                     "provenance": provenance}, jax_ffi_command),
    Kind("distributed", {"table": distributed_table, "plot": distributed_plot, "provenance": provenance},
         distributed_command),
    Kind("distributed-sharded", {"table": sharded_table, "goals": sharded_goals, "provenance": provenance},
         sharded_command),
    Kind("data-parallel", {"table": data_parallel_table, "goals": recorded_goals, "provenance": provenance},
         data_parallel_command),
    Kind("codebooks", {"ema": codebooks_ema_table, "kmeans": codebooks_kmeans_table, "goals": recorded_goals,
                       "provenance": provenance}, codebooks_command),
    Kind("gpu-host", {"table": gpu_host_table, "provenance": provenance}, lambda result: "python benchmarks/gpu_host_time.py"),
    Kind("gpu", {"timings": gpu_timings, "ratios": gpu_ratios, "checks": gpu_checks,
                 "launch-shapes": gpu_launch_shapes, "provenance": provenance}, gpu_command),
]}


def kind_of(filename: str) -> Kind | None:
    """The kind whose prefix the file name starts with, the longest such prefix
    (``distributed-sharded-`` before ``distributed-``)."""
    for name in sorted(KINDS, key=len, reverse=True):
        if filename.startswith(f"{name}-"):
            return KINDS[name]
    return None


def load_result(path: Path) -> Result:
    shown = (RESULTS / path.name).as_posix()
    if not path.is_file():
        raise BenchmarkFileError(f"{shown}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BenchmarkFileError(f"{shown}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise BenchmarkFileError(f"{shown}: not a JSON object")
    return Result(path, data)


# --------------------------------------------------------------------------- the directive


def _part_names(text: str) -> list[str]:
    return [name for name in text.replace(",", " ").split() if name]


class BenchmarkDirective(SphinxDirective):
    """``{benchmark} FILE [FILE ...]``: what result files of ``benchmarks/results/`` hold."""

    required_arguments = 1
    optional_arguments = 8  # further files of the same kind, side by side where the kind allows
    has_content = False
    option_spec = {
        "show": directives.unchanged_required,  # parts, in order: "table, goals"
        "kind": directives.unchanged_required,  # where the file name does not say it
        "command": directives.unchanged_required,  # the command, where the file does not record it
    }

    def run(self) -> list[nodes.Node]:
        results_dir = Path(self.env.srcdir).parent / RESULTS
        files = ", ".join(self.arguments)
        paths = [results_dir / name for name in self.arguments]
        for path in paths:  # an edited (or newly added) result rebuilds the page
            self.env.note_dependency(path)
        self.env.note_dependency(Path(__file__))
        try:
            results = [load_result(path) for path in paths]
            kind = self._kind()
            parts, explicit = self._parts(kind)
        except BenchmarkFileError as error:
            return self._warn(str(error))
        page = Page(Path(self.env.srcdir), kind, self.options.get("command"))
        shown: list[nodes.Node] = []
        for part in parts:
            try:
                made = kind.parts[part](results, page)
            except BenchmarkFileError as error:
                return self._warn(f"{files}: {error}")
            except (KeyError, TypeError, ValueError, IndexError, AttributeError, StopIteration) as error:
                # a file that lacks what its kind records (or records it otherwise)
                return self._warn(f"{files}: malformed {kind.name} result, {part} cannot be shown "
                                  f"({type(error).__name__}: {error})")
            if explicit and not made:
                return self._warn(f"{files}: holds nothing for part {part!r}")
            shown += made
        container = nodes.container("", *shown, classes=["benchmark", f"benchmark-{kind.name}"])
        return [container]

    def _kind(self) -> Kind:
        named = self.options.get("kind")
        if named:
            if named not in KINDS:
                raise BenchmarkFileError(f"{' '.join(self.arguments)}: unknown kind {named!r} "
                                         f"(known: {', '.join(KINDS)})")
            return KINDS[named]
        kinds = {argument: kind_of(argument) for argument in self.arguments}
        unknown = [argument for argument, kind in kinds.items() if kind is None]
        if unknown:
            raise BenchmarkFileError(f"{', '.join(unknown)}: no formatter for this kind of file (known prefixes: "
                                     f"{', '.join(f'{name}-' for name in KINDS)}; or give :kind:)")
        if len({kind.name for kind in kinds.values()}) > 1:
            raise BenchmarkFileError(f"{', '.join(self.arguments)}: files of different kinds in one directive")
        return next(iter(kinds.values()))

    def _parts(self, kind: Kind) -> tuple[list[str], bool]:
        if "show" not in self.options:
            return list(kind.parts), False
        asked = _part_names(self.options["show"])
        unknown = [part for part in asked if part not in kind.parts]
        if unknown or not asked:
            raise BenchmarkFileError(f"{' '.join(self.arguments)}: unknown part {', '.join(unknown) or '(none)'} "
                                     f"of {kind.name} results (known: {', '.join(kind.parts)})")
        return asked, True

    def _warn(self, message: str) -> list[nodes.Node]:
        logger.warning("benchmark: %s", message, location=self.get_location(), type="benchmark", subtype="file")
        return []


def setup(app):
    app.add_directive("benchmark", BenchmarkDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
