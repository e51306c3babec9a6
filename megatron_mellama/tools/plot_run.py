"""Draw a run's curves in one PNG: training and per-domain validation loss, learning rate, grad norm,
downstream accuracy, tokens/s and memory (a panel for each the run has).

    mellama-plot-run runs/13b/metrics.jsonl                  writes runs/13b/metrics.png
    mellama-plot-run runs/13b/tensorboard --output loss.png

RUN is a run's `--log-file` (JSON lines) or its `--tensorboard-dir`. The image goes beside the
run unless `--output` names it: `metrics.jsonl` -> `metrics.png`, a folder `tb` -> `tb.png`.
It is written to `FILE.png.partial` and renamed, so a reader never sees half an image.
Exit 0 with the image's path printed, 2 when RUN is not a run (its path and line named).
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_mellama.tools.cli import OneLineParser, UsageError, run_tool
from megatron_mellama.tools.run_logs import Run, RunLogError, read_run

PROG = "mellama-plot-run"
PARTIAL = ".partial"
# one line style and marker per run, so two runs' curves of one metric share a colour
RUN_STYLES = ("-", "--", ":", "-.")
RUN_MARKERS = ("o", "s", "^", "D")
MAX_MARKERS = 60  # more evaluations than this read better as a line
SMOOTH_ABOVE = 500  # points in a curve drawn as they are; longer ones get a running mean
SMOOTH_POINTS = 200  # about how many windows the running mean spans


@dataclass(frozen=True)
class Panel:
    title: str
    patterns: tuple[str, ...]  # fnmatch patterns over the metric names
    ylabel: str = ""
    noisy: bool = False  # a long curve is also drawn as its running mean


PANELS = (
    Panel("loss (training, validation per domain)", ("lm loss", "lm loss validation", "lm loss validation/*"), "loss",
          noisy=True),
    Panel("learning rate", ("learning-rate",)),
    Panel("grad norm", ("grad-norm",), noisy=True),
    Panel("downstream accuracy", ("downstream/*",), "accuracy"),
    Panel("throughput", ("tokens-per-sec",), "tokens/s", noisy=True),
    Panel("memory", ("memory",), "GiB (peak)"),
)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("run", metavar="RUN", help="a run's --log-file (JSON lines) or its --tensorboard-dir")
    p.add_argument("--output", metavar="FILE.png", help="where the image goes (default: beside RUN, RUN's name .png)")
    return p


def default_output(run_path: str) -> str:
    path = Path(run_path.rstrip("/\\") or run_path)
    return str(path.parent / f"{path.stem if path.is_file() else path.name}.png")


def checked_output(path: str) -> str:
    if not path.lower().endswith(".png"):
        raise UsageError(f"--output {path}: the image is a PNG; name a FILE.png")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--output {path}: no such folder {folder}")
    return path


def panel_metrics(panel: Panel, names) -> list[str]:
    """The metrics of `names` the panel draws, in the order of its patterns, then by name."""
    found = []
    for pattern in panel.patterns:
        found += sorted(n for n in names if fnmatch.fnmatchcase(n, pattern) and n not in found)
    return found


def draw_runs(runs: list[Run], output: str, title: str) -> str:
    """Overlay the runs' curves (the first solid, the next dashed, ...), one panel per kind of metric
    any run has, each metric one colour; returns `output`."""
    Figure, FigureCanvasAgg = _matplotlib()
    names = {n for run in runs for n in run.metrics}
    panels = [(panel, metrics) for panel in PANELS if (metrics := panel_metrics(panel, names))]
    if not panels:
        raise RunLogError(f"{runs[0].path}: none of the metrics drawn here ({', '.join(p.title for p in PANELS)})")
    columns = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(7 * columns, 3.6 * rows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    iterations = [run.iterations for run in runs]
    span = (min(i[0] for i in iterations), max(i[-1] for i in iterations))
    for ax, (panel, metrics) in zip(axes, panels):
        _draw_panel(ax, panel, metrics, runs, [len(i) for i in iterations], span)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    return save_png(fig, output)


def _draw_panel(ax, panel: Panel, metrics: list[str], runs: list[Run], logged: list[int],
                span: tuple[int, int]) -> None:
    """`logged`: how many iterations each run logged; `span`: the first and last of all runs."""
    from matplotlib.ticker import MaxNLocator

    colours = {m: f"C{i % 10}" for i, m in enumerate(metrics)}
    labelled = set()
    for run_index, run in enumerate(runs):
        # the first run wide and pale, the others thin on top of it: equal curves still show both
        style = dict(linewidth=2.4, alpha=0.55) if run_index == 0 and len(runs) > 1 else dict(linewidth=1.3)
        for metric in metrics:
            values = run.metrics.get(metric)
            if not values:
                continue
            steps = sorted(values)
            points = [values[s] for s in steps]
            label = None if metric in labelled else metric
            line = RUN_STYLES[run_index % len(RUN_STYLES)]
            smooth = running_mean(points) if panel.noisy else None
            if smooth is not None:
                # a long run's per-iteration curve is noise at this scale: its running mean over it
                ax.plot(steps, points, line, color=colours[metric], linewidth=0.5, alpha=0.2)
                steps, points = steps[len(steps) - len(smooth[1]):], smooth[1]
                label = label and f"{label} (mean of {smooth[0]})"
            # evaluations are a few points far apart: markers show where they were taken
            sparse = len(steps) <= MAX_MARKERS and (len(steps) < 3 or len(steps) < 0.5 * logged[run_index])
            marker = dict(marker=RUN_MARKERS[run_index % len(RUN_MARKERS)], markersize=4,
                          markerfacecolor=colours[metric] if run_index == 0 else "none") if sparse else {}
            ax.plot(steps, points, line, color=colours[metric], label=label, **marker, **style)
            labelled.add(metric)
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("iteration")
    ax.set_xlim(span[0] - 0.02 * (span[1] - span[0]) - 0.5 * (span[0] == span[1]),
                span[1] + 0.02 * (span[1] - span[0]) + 0.5 * (span[0] == span[1]))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if panel.ylabel:
        ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if len(labelled) > 1:
        ax.legend(fontsize=7, loc="best")


def running_mean(points: list[float]) -> tuple[int, list[float]] | None:
    """(window, the trailing mean over it at each point from the window's end), NaN points left out;
    None for a curve short enough to draw as it is."""
    if len(points) <= SMOOTH_ABOVE:
        return None
    import numpy

    window = len(points) // SMOOTH_POINTS
    values = numpy.asarray(points, dtype=numpy.float64)
    finite = numpy.isfinite(values)
    kernel = numpy.ones(window)
    sums = numpy.convolve(numpy.where(finite, values, 0.0), kernel, "valid")
    counts = numpy.convolve(finite.astype(numpy.float64), kernel, "valid")
    with numpy.errstate(invalid="ignore", divide="ignore"):
        return window, (sums / counts).tolist()


def save_png(fig, output: str) -> str:
    """Write `fig` to `output` through `output.partial`, so no half-written image has the final name."""
    partial = output + PARTIAL
    try:
        fig.savefig(partial, format="png", dpi=100)
        os.replace(partial, output)
    except OSError as e:
        raise UsageError(f"{output}: cannot write the image ({e.strerror or e})") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return output


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("matplotlib is not installed: pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def run_label(run: Run) -> str:
    return f"{run.path} ({run.form}, iterations {run.iterations[0]}-{run.iterations[-1]})"


def _plot(args) -> int:
    output = args.output and checked_output(args.output)
    run = read_run(args.run)
    output = output or default_output(args.run)
    print(draw_runs([run], output, run_label(run)))
    return 0


def main(argv=None) -> int:
    return run_tool(PROG, lambda: build_parser().parse_args(argv), _plot, errors=(RunLogError,))
