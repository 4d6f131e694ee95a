"""Results of a benchmark run: rich tables and progress, JSON and Markdown files.

A run is a list of scenarios; a scenario is a list of rows. A row is one
figure of the system next to the same figure of its floor (measured in the
same run), their ratio, and the target the ratio (or the figure) must meet.
Rows without a target are reported for context only. A missed target is a
result, not an error: it is printed and written, the exit code stays 0.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table as RichTable

Op = Literal[">=", "<="]


@dataclass
class Row:
    """One figure. ``ratio`` is ``value / floor``; the target applies to ``target_on``."""

    figure: str
    value: float | None
    unit: str = ""
    floor: float | None = None
    floor_name: str = ""
    target_op: Op | None = None
    target: float | None = None
    target_on: Literal["ratio", "value"] = "ratio"
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.floor is None or self.floor == 0:
            return None
        return self.value / self.floor

    @property
    def passed(self) -> bool | None:
        """True/False against the target; None when there is no target or no figure."""
        if self.target_op is None or self.target is None:
            return None
        subject = self.ratio if self.target_on == "ratio" else self.value
        if subject is None:
            return False
        return subject >= self.target if self.target_op == ">=" else subject <= self.target

    @property
    def target_text(self) -> str:
        if self.target_op is None or self.target is None:
            return "—"
        op = "≥" if self.target_op == ">=" else "≤"
        if self.target_on == "ratio":
            return f"{op} {self.target:g}x"
        return f"{op} {_fmt(self.target)} {self.unit}".rstrip()

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "ratio": None if self.ratio is None else round(self.ratio, 4),
            "passed": self.passed,
            "target_text": self.target_text,
        }


@dataclass
class Scenario:
    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def passed(self) -> bool | None:
        verdicts = [r.passed for r in self.rows if r.passed is not None]
        if self.error:
            return False
        return all(verdicts) if verdicts else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "passed": self.passed,
            "error": self.error,
            "rows": [r.to_dict() for r in self.rows],
            "notes": self.notes,
            "details": self.details,
        }


@dataclass
class RunReport:
    system: str
    command: str
    settings: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    finished: str = ""
    scenarios: list[Scenario] = field(default_factory=list)
    measurements: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "command": self.command,
            "started": self.started,
            "finished": self.finished,
            "machine": self.machine,
            "settings": self.settings,
            "scenarios": [s.to_dict() for s in self.scenarios],
            "measurements": self.measurements,
            "notes": self.notes,
            "error": self.error,
        }


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "?"


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    try:
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    try:
        load: list[float] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "grpcio": _version("grpcio"),
        "aiohttp": _version("aiohttp"),
        "protobuf": _version("protobuf"),
        "loadavg_at_start": load,
    }


def command_line(argv: list[str] | None = None) -> str:
    args = list(sys.argv if argv is None else argv)
    if args:
        args[0] = Path(args[0]).name
    return shlex.join(args)


# --------------------------------------------------------------------------- formatting


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "—"
    if unit in ("rps", "/s"):
        return f"{x:,.0f}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _with_unit(x: float | None, unit: str) -> str:
    s = _fmt(x, unit)
    return s if x is None or not unit else f"{s} {unit}"


def _verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "info"}[passed]


def scenario_table(s: Scenario) -> RichTable:
    status = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[dim]info[/]"}[s.passed]
    t = RichTable(title=f"{s.title}  {status}", title_justify="left", expand=False)
    t.add_column("figure")
    t.add_column("system", justify="right")
    t.add_column("floor", justify="right")
    t.add_column("ratio", justify="right")
    t.add_column("target", justify="right")
    t.add_column("", justify="center")
    for r in s.rows:
        floor = _with_unit(r.floor, r.unit)
        if r.floor_name and r.floor is not None:
            floor = f"{floor} [dim]({r.floor_name})[/]"
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}x"
        verdict = {True: "[green]✔ pass[/]", False: "[bold red]✘ FAIL[/]", None: "[dim]·[/]"}
        t.add_row(r.figure, _with_unit(r.value, r.unit), floor, ratio, r.target_text,
                  verdict[r.passed])
    return t


def print_report(report: RunReport, console: Console) -> None:
    for s in report.scenarios:
        console.print(scenario_table(s))
        if s.error:
            console.print(f"  [bold red]error:[/] {s.error}")
        for note in s.notes:
            console.print(f"  [dim]{note}[/]")
        console.print()
    for note in report.notes:
        console.print(f"[dim]{note}[/]")
    missed = [
        (s.title, r.figure) for s in report.scenarios for r in s.rows if r.passed is False
    ]
    if missed:
        console.print(f"[bold red]{len(missed)} target(s) missed:[/]")
        for title, fig in missed:
            console.print(f"  [red]✘[/] {title}: {fig}")
    elif any(r.passed for s in report.scenarios for r in s.rows):
        console.print("[bold green]every target met[/]")


def to_markdown(report: RunReport) -> str:
    m = report.machine
    lines = [
        f"# `{report.system}` benchmark",
        "",
        f"- command: `{report.command}`",
        f"- started {report.started}, finished {report.finished}",
        f"- machine: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores "
        f"({m.get('usable_cores', '?')} usable), {m.get('memory_gib', '?')} GiB; "
        f"Python {m.get('python', '?')}, grpcio {m.get('grpcio', '?')}, "
        f"aiohttp {m.get('aiohttp', '?')}; load average at start {m.get('loadavg_at_start')}",
        "- settings: "
        + ", ".join(f"{k}={v}" for k, v in report.settings.items() if not isinstance(v, dict)),
        "",
    ]
    if report.error:
        lines += [f"**harness error:** {report.error}", ""]
    for s in report.scenarios:
        lines += [f"## {s.title} — {_verdict(s.passed)}", ""]
        lines += ["| figure | system | floor | ratio | target | result |",
                  "|---|---:|---:|---:|---:|:---:|"]
        for r in s.rows:
            floor = _with_unit(r.floor, r.unit)
            if r.floor_name and r.floor is not None:
                floor += f" ({r.floor_name})"
            ratio = "—" if r.ratio is None else f"{r.ratio:.2f}x"
            lines.append(
                f"| {r.figure} | {_with_unit(r.value, r.unit)} | {floor} | {ratio} "
                f"| {r.target_text} | {_verdict(r.passed)} |"
            )
        lines.append("")
        if s.error:
            lines += [f"**error:** {s.error}", ""]
        for note in s.notes:
            lines.append(f"- {note}")
        if s.notes:
            lines.append("")
    for note in report.notes:
        lines.append(f"> {note}")
    return "\n".join(lines).rstrip() + "\n"


def write_results(report: RunReport, out_dir: Path) -> tuple[Path, Path]:
    """``<system>-<UTC stamp>.json``, ``.md`` and ``.png`` (the step searches), plus
    ``<system>-latest.*`` copies."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    data = json.dumps(report.to_dict(), indent=2, default=str) + "\n"
    md = to_markdown(report)
    jpath = out_dir / f"{report.system}-{stamp}.json"
    mpath = out_dir / f"{report.system}-{stamp}.md"
    jpath.write_text(data)
    mpath.write_text(md)
    (out_dir / f"{report.system}-latest.json").write_text(data)
    (out_dir / f"{report.system}-latest.md").write_text(md)
    png = plot_searches(report, out_dir / f"{report.system}-{stamp}.png")
    if png is not None:
        shutil.copyfile(png, out_dir / f"{report.system}-latest.png")
    return jpath, mpath


# --------------------------------------------------------------------------- progress


class ProgressUI:
    """One overall bar (phases done) and one bar for the step running now."""

    def __init__(self, console: Console, total_phases: int, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=not enabled,
        )
        self._overall: TaskID | None = None
        self._step: TaskID | None = None
        self._total = total_phases

    def __enter__(self) -> ProgressUI:
        self.progress.start()
        self._overall = self.progress.add_task("[bold]benchmark", total=self._total)
        self._step = self.progress.add_task("starting", total=1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def log(self, message: str) -> None:
        self.progress.console.print(message)

    @contextmanager
    def phase(self, description: str) -> Iterator[None]:
        assert self._overall is not None
        self.progress.update(self._overall, description=f"[bold]{description}")
        start = time.monotonic()
        try:
            yield
        finally:
            self.progress.advance(self._overall, 1)
            self.log(f"[dim]{description}: {time.monotonic() - start:.1f} s[/]")

    def step(self, label: str, seconds: float) -> Callable[[float], None]:
        """Show a step of about ``seconds``; returns the callback that moves its bar (0..1)."""
        assert self._step is not None
        step = self._step
        self.progress.reset(step, total=1.0, description=label)

        def update(fraction: float) -> None:
            self.progress.update(step, completed=fraction)

        return update

    def count(self, label: str, total: int) -> Callable[[int], None]:
        """A counting step (bulk loads): the callback takes the number done."""
        assert self._step is not None
        step = self._step
        self.progress.reset(step, total=max(1, total), description=label)

        def update(done: int) -> None:
            self.progress.update(step, completed=done)

        return update


# --------------------------------------------------------------------------- plot


def plot_searches(report: RunReport, path: Path) -> Path | None:
    """Achieved rate and p99 against offered rate, one line per step search (PNG).

    Returns None when there is nothing to plot or matplotlib cannot draw.
    """
    searches: dict[str, Any] = report.measurements.get("searches", {})
    if not searches:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for key, search in searches.items():
        steps = sorted(search.get("steps", []), key=lambda st: st["offered_rps"])
        if not steps:
            continue
        offered = [st["offered_rps"] for st in steps]
        ax1.plot(offered, [st["achieved_rps"] for st in steps], marker="o", label=key)
        ax2.plot(offered, [st["latency"]["p99_ms"] for st in steps], marker="o", label=key)
    top = max((st["offered_rps"] for s in searches.values() for st in s.get("steps", [])),
              default=1.0)
    ax1.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1)
    ax1.set(xlabel="offered (req/s)", ylabel="achieved (req/s)", title="throughput")
    ax2.set(xlabel="offered (req/s)", ylabel="p99 from scheduled time (ms)", yscale="log",
            title="p99 latency")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{report.system}: open-loop step searches ({report.started})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
