"""Parametrised report notebooks, executed with papermill and rendered to HTML with nbconvert.

A notebook under ``notebooks/`` has a cell tagged ``parameters`` (at least ``tenant`` and
``mlops_home``) and reads the platform's state only through its resources. ``NotebookRunner.run``
executes it for one tenant into ``MLOPS_HOME/reports/<tenant>/<name>-<timestamp>.ipynb``, renders
the HTML next to it, and returns both paths. A failing cell raises ``NotebookExecutionError``, which
names the cell (index, execution count, first line of its source) and the error; the partly
executed notebook and its HTML are kept for inspection.

The kernel runs the interpreter of the calling process: the ``python3`` kernel spec of the
environment starts ``python``, which jupyter_client replaces by ``sys.executable``. The runner
checks this before it starts a kernel, so a stray user-level kernel spec pointing at another
Python cannot run the reports against other libraries. The kernel's working directory is the
repository root, so ``import definitions`` works inside the notebook.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from mlops.core.environment import PROJECT_ROOT
from resources.settings import PlatformSettings

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
SUMMARY_TAG = "summary"  # a cell with this tag displays an application/json summary of the report
# nbconvert's lab template loads require.js, MathJax and mermaid from a CDN; a report must open
# without the network (and without telling anyone that it was opened), so those scripts are left out.
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
_PYTHON_NAMES = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}


class NotebookExecutionError(RuntimeError):
    """A notebook cell raised. ``cell_index`` is the 0-based index of the cell in the source notebook."""

    def __init__(self, notebook: str, *, cell_index: int | None, execution_count: int | None, cell_source: str,
                 ename: str, evalue: str, traceback: str, output_path: Path, html_path: Path | None):
        self.notebook = notebook
        self.cell_index = cell_index
        self.execution_count = execution_count
        self.cell_source = cell_source
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.output_path = output_path
        self.html_path = html_path
        first_line = next((line.strip() for line in cell_source.splitlines() if line.strip()), "")
        where = f"cell {cell_index}" if cell_index is not None else "a cell"
        message = (
            f"notebook {notebook!r} failed in {where} (In [{execution_count}]: {first_line}): {ename}: {evalue}\n"
            f"executed notebook: {output_path}" + (f"\nHTML: {html_path}" if html_path else "")
        )
        if traceback:
            message += "\n\n" + traceback[-3000:]
        super().__init__(message)


class NotebookKernelError(RuntimeError):
    pass


@dataclass(frozen=True)
class NotebookRun:
    """One executed report: where it is, how long it took and what it shows."""

    name: str
    tenant: str
    notebook: Path
    html: Path
    seconds: float
    parameters: dict
    figures: int
    tables: int
    summary: dict = field(default_factory=dict)


def kernel_interpreter(kernel_name: str) -> str:
    """The Python executable a kernel spec starts (``sys.executable`` for the environment's own)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel as exc:
        raise NotebookKernelError(
            f"no Jupyter kernel named {kernel_name!r}: install ipykernel in this environment "
            f"({sys.executable} -m ipykernel install --sys-prefix)"
        ) from exc
    executable = spec.argv[0] if spec.argv else ""
    return sys.executable if executable in _PYTHON_NAMES else executable


def report_counts(nb) -> tuple[int, int]:
    """Figures (PNG outputs) and tables (HTML tables) of an executed notebook."""
    figures = tables = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            figures += "image/png" in data
            tables += "<table" in "".join(data.get("text/html", ""))
    return figures, tables


def report_summary(nb) -> dict:
    """The application/json output of the cell tagged ``summary``, or an empty dict."""
    for cell in nb.cells:
        if SUMMARY_TAG in cell.get("metadata", {}).get("tags", []):
            for output in cell.get("outputs", []):
                summary = output.get("data", {}).get("application/json")
                if isinstance(summary, dict):
                    return dict(summary)
    return {}


def render_html(notebook: Path) -> Path:
    """Render an executed notebook to a standalone HTML file next to it (figures inline, no CDN scripts)."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(extra_loaders=[DictLoader({"offline.html.j2": _OFFLINE_TEMPLATE})],
                            template_file="offline.html.j2")
    body, _ = exporter.from_filename(str(notebook))
    html = notebook.with_suffix(".html")
    html.write_text(body, encoding="utf-8")
    return html


class NotebookRunner(dg.ConfigurableResource):
    """Executes the report notebooks for a tenant into ``MLOPS_HOME/reports/<tenant>/``."""

    settings: PlatformSettings
    notebooks_dir: str = ""  # empty: the repository's notebooks/
    kernel_name: str = "python3"
    cell_timeout_s: int = 600
    start_timeout_s: int = 120

    @property
    def source_dir(self) -> Path:
        return Path(self.notebooks_dir) if self.notebooks_dir else NOTEBOOKS_DIR

    def reports_dir(self, tenant: str) -> Path:
        if not tenant or Path(tenant).name != tenant or tenant in {".", ".."}:
            raise ValueError(f"invalid tenant name {tenant!r}")
        return self.settings.layout.reports_dir(tenant)

    def notebook_path(self, name: str) -> Path:
        path = self.source_dir / f"{name}.ipynb"
        if not path.is_file():
            available = sorted(p.stem for p in self.source_dir.glob("*.ipynb"))
            raise FileNotFoundError(f"no notebook {name!r} in {self.source_dir}; available: {available}")
        return path

    def run(self, name: str, tenant: str, parameters: dict | None = None) -> NotebookRun:
        """Execute notebook ``name`` for ``tenant`` with papermill, then render its HTML.

        ``tenant`` and ``mlops_home`` are always passed; ``parameters`` adds to them.
        """
        source = self.notebook_path(name)
        interpreter = kernel_interpreter(self.kernel_name)
        if Path(interpreter).absolute() != Path(sys.executable).absolute():
            raise NotebookKernelError(
                f"kernel {self.kernel_name!r} runs {interpreter}, not this environment's {sys.executable}; "
                f"install this environment's kernel ({sys.executable} -m ipykernel install --sys-prefix) "
                "or remove the other kernel spec"
            )
        # Imported here: papermill and nbconvert cost ~1.5 s, and every run process imports this module.
        import nbformat
        import papermill
        from papermill.exceptions import PapermillExecutionError, strip_color

        params = {**(parameters or {}), "tenant": tenant, "mlops_home": str(self.settings.root)}
        output = self._reserve_output(name, tenant)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(source), str(output), parameters=params, kernel_name=self.kernel_name,
                cwd=str(PROJECT_ROOT), progress_bar=False, log_output=False,
                start_timeout=self.start_timeout_s, execution_timeout=self.cell_timeout_s,
            )
        except PapermillExecutionError as exc:
            raise NotebookExecutionError(
                name, cell_index=_source_index(source, exc), execution_count=exc.exec_count,
                cell_source=exc.source or "", ename=exc.ename, evalue=exc.evalue,
                traceback=strip_color("\n".join(exc.traceback or [])), output_path=output,
                html_path=_try_render(output),
            ) from exc
        except Exception as exc:  # kernel died, cell timeout, missing parameter...
            raise NotebookExecutionError(
                name, cell_index=None, execution_count=None, cell_source="", ename=type(exc).__name__,
                evalue=str(exc), traceback="", output_path=output, html_path=_try_render(output),
            ) from exc
        seconds = time.perf_counter() - start
        html = render_html(output)
        nb = nbformat.read(output, as_version=4)
        figures, tables = report_counts(nb)
        return NotebookRun(name=name, tenant=tenant, notebook=output, html=html, seconds=seconds,
                           parameters=params, figures=figures, tables=tables, summary=report_summary(nb))

    def _reserve_output(self, name: str, tenant: str) -> Path:
        folder = self.reports_dir(tenant)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        for attempt in range(1, 1000):
            path = folder / (f"{name}-{stamp}.ipynb" if attempt == 1 else f"{name}-{stamp}-{attempt}.ipynb")
            try:
                path.open("x").close()  # claim the name: two runs in the same second never share a file
                return path
            except FileExistsError:
                continue
        raise RuntimeError(f"could not find a free report name for {name} in {folder}")


def _source_index(source: Path, exc) -> int | None:
    """Index of the failing cell in the source notebook (papermill counts its injected cell too)."""
    import nbformat

    cells = nbformat.read(source, as_version=4).cells
    matches = [i for i, cell in enumerate(cells) if cell.source == exc.source]
    if len(matches) == 1:
        return matches[0]
    injected_before = 1 if exc.cell_index > _parameters_index(cells) else 0
    return max(exc.cell_index - injected_before, 0)


def _parameters_index(cells) -> int:
    for i, cell in enumerate(cells):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return i
    return -1


def _try_render(output: Path) -> Path | None:
    try:
        return render_html(output) if output.exists() and output.stat().st_size else None
    except Exception:  # the HTML of a broken run is a convenience; the error matters more
        return None
