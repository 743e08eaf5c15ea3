"""Training curves from the trainer's per-rank CSV log; a fine-tuning run's curves; the heads' grid of an eval run.

The trainer writes ``{write_tag}_r{rank}.csv`` in its output folder, one row per
logged step::

    epoch,itr,loss,mask-A,mask-B,time (ms),lr,wd,momentum,img/s,target_std,target_rank,pred_rank,pred_cosine

the last four (collapse diagnostics, ``fastjepa.step.diagnose``) only on the steps that measured them.

A resumed run appends to the same file, so an (epoch, itr) pair can appear more
than once; the later row wins. ``read_log`` parses and de-duplicates such a file,
``plot_run`` draws it into ``curves.png`` next to it.

Rendering uses the Agg canvas directly (no pyplot), so importing or calling this
never opens a window, never changes the caller's matplotlib backend, and leaves
no figure behind.
"""

from __future__ import annotations

import csv
import math
import pathlib

import numpy as np

COLUMNS = ("epoch", "itr", "loss", "mask-A", "mask-B", "time (ms)", "lr", "wd", "momentum", "img/s")
INT_COLUMNS = ("epoch", "itr", "mask-A", "mask-B")
DIAGNOSTIC_COLUMNS = ("target_std", "target_rank", "pred_rank", "pred_cosine")  # optional; blank on unmeasured steps


def find_log(out_dir: str | pathlib.Path, rank: int = 0) -> pathlib.Path:
    """The one ``*_r{rank}.csv`` in ``out_dir``; errors name the folder and what was found."""
    out_dir = pathlib.Path(out_dir)
    if not out_dir.exists():
        raise FileNotFoundError(f"run folder not found: {out_dir}")
    if not out_dir.is_dir():
        raise FileNotFoundError(f"run folder is not a folder: {out_dir}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    matches = sorted(p for p in out_dir.glob(f"*_r{rank}.csv") if p.is_file())
    if not matches:
        others = sorted(p.name for p in out_dir.glob("*.csv"))
        found = f" (CSVs there: {', '.join(others)})" if others else " (no CSV there at all)"
        raise FileNotFoundError(f"no training log '*_r{rank}.csv' for rank {rank} in {out_dir}{found}")
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise ValueError(f"several training logs for rank {rank} in {out_dir}: {names}; keep one or plot them apart")
    return matches[0]


def _number(cell: str, column: str, csv_path: pathlib.Path, line: int) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise ValueError(f"{csv_path} line {line}: column '{column}' has non-numeric value {cell!r}") from None
    if column in INT_COLUMNS and not (math.isfinite(value) and value == int(value)):
        raise ValueError(f"{csv_path} line {line}: column '{column}' needs an integer, got {cell!r}")
    return value


def read_log(csv_path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Parse a trainer CSV into numpy columns, one entry per unique (epoch, itr).

    Returns every column of ``COLUMNS`` (int64 for epoch, itr, mask-A, mask-B; float64
    otherwise, NaN/inf kept as written) plus ``global_step``: 0, 1, 2, ... over the kept
    rows. When an (epoch, itr) pair repeats (a resumed run appending to the file), the
    last occurrence is kept; kept rows are then ordered by (epoch, itr), which is the
    file's order for any run and puts stale rows of an abandoned attempt in place.
    ``DIAGNOSTIC_COLUMNS`` are read when the header has them (NaN where blank). Other columns
    are ignored; blank lines are skipped.
    """
    csv_path = pathlib.Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{csv_path} is empty: no header line")
        header = [name.strip() for name in header]
        missing = [name for name in COLUMNS if name not in header]
        if missing:
            raise ValueError(
                f"{csv_path} lacks required columns: {', '.join(missing)} "
                f"(header has: {', '.join(header)})"
            )
        names = COLUMNS + tuple(name for name in DIAGNOSTIC_COLUMNS if name in header)
        where = {name: header.index(name) for name in names}
        rows: dict[tuple[int, int], list[float]] = {}
        for cells in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                raise ValueError(
                    f"{csv_path} line {line}: {len(cells)} fields but the header has {len(header)}"
                )
            values = [_number(cells[where[name]].strip(), name, csv_path, line) for name in COLUMNS]
            values += [_number(cells[where[name]].strip() or "nan", name, csv_path, line) for name in names[len(COLUMNS):]]
            key = (int(values[0]), int(values[1]))
            rows.pop(key, None)  # re-insert so the dict's order is that of last occurrences
            rows[key] = values
    if not rows:
        raise ValueError(f"{csv_path} has a header but no data rows")

    ordered = sorted(rows.items(), key=lambda item: item[0])  # by (epoch, itr)
    table = np.array([values for _, values in ordered], dtype=np.float64)
    log = {
        name: table[:, i].astype(np.int64) if name in INT_COLUMNS else table[:, i]
        for i, name in enumerate(names)
    }
    log["global_step"] = np.arange(len(table), dtype=np.int64)
    return log


def ema(values: np.ndarray, span: int) -> np.ndarray:
    """Bias-corrected exponential moving average (the first value is not pulled to 0)."""
    alpha = 2.0 / (span + 1.0)
    out = np.empty(len(values), dtype=np.float64)
    mean, weight = 0.0, 0.0
    for i, v in enumerate(values):
        mean = (1.0 - alpha) * mean + alpha * v
        weight = (1.0 - alpha) * weight + alpha
        out[i] = mean / weight
    return out


def _epoch_starts(log: dict[str, np.ndarray]) -> np.ndarray:
    """Global steps where a new epoch begins (none for a single-epoch run)."""
    changes = np.nonzero(np.diff(log["epoch"]))[0] + 1
    return log["global_step"][changes]


def _plot_diagnostics(ax, log: dict[str, np.ndarray], step: np.ndarray) -> None:
    """The collapse diagnostics on their measured steps: effective ranks on the left axis, the
    target std and the prediction-target cosine on the right."""
    measured = np.isfinite(log["target_rank"])
    lines = []
    for name, color in (("target_rank", "tab:red"), ("pred_rank", "tab:pink")):
        lines += ax.plot(step[measured], log[name][measured], color=color, marker="o", ms=3, label=name.replace("_", " "))
    ax.set_ylabel("effective rank")
    ax.set_ylim(bottom=0)
    right = ax.twinx()
    for name, color in (("target_std", "tab:brown"), ("pred_cosine", "tab:olive")):
        lines += right.plot(step[measured], log[name][measured], color=color, ls="--", marker="s", ms=3, label=name.replace("_", " "))
    right.set_ylabel("std, cosine")
    ax.legend(lines, [line.get_label() for line in lines], loc="upper left", fontsize=8)
    ax.set_title("collapse diagnostics (collapse drives the target rank to 1 or 0 and the std to 0)")


# Long by nature: four or five panels drawn in sequence, each a few lines of matplotlib.
def plot_run(out_dir: str | pathlib.Path, rank: int = 0) -> pathlib.Path:
    """Draw ``out_dir/curves.png`` from ``out_dir``'s ``*_r{rank}.csv`` and return its path.

    Four panels over the global step: loss (+ EMA, log scale when all finite losses
    are positive), lr (+ weight decay on a right axis), EMA momentum, and throughput
    (+ its median); a fifth with the collapse diagnostics when the log has any. Light
    vertical lines mark epoch starts.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out_dir = pathlib.Path(out_dir)
    csv_path = find_log(out_dir, rank)
    log = read_log(csv_path)
    step = log["global_step"]
    n = len(step)
    marker = "o" if n <= 50 else None  # a line through one or a few points is invisible

    diagnosed = "target_rank" in log and np.isfinite(log["target_rank"]).any()
    fig = Figure(figsize=(10, 13.5 if diagnosed else 11))
    # fixed margins: the labels are known, and constrained layout would double the drawing time
    fig.subplots_adjust(left=0.09, right=0.91, top=0.925 if not diagnosed else 0.94, bottom=0.05, hspace=0.28)
    FigureCanvasAgg(fig)
    axes = fig.subplots(5 if diagnosed else 4, 1, sharex=True)
    ax_loss, ax_lr, ax_mom, ax_tput = axes[:4]
    if diagnosed:
        _plot_diagnostics(axes[4], log, step)

    # loss
    loss = log["loss"]
    finite = np.isfinite(loss)
    bad = int(n - finite.sum())
    title = "loss"
    if finite.any():
        span = int(min(100, max(1, finite.sum() // 20)))
        smooth = ema(loss[finite], span)
        ax_loss.plot(step[finite], loss[finite], color="tab:blue", alpha=0.35, lw=0.8, marker=marker, ms=3, label="loss")
        ax_loss.plot(step[finite], smooth, color="tab:blue", lw=2, label=f"EMA (span {span})")
        if (loss[finite] > 0).all():
            ax_loss.set_yscale("log")
        title += f" (last EMA {smooth[-1]:.4g})"
    if bad:
        title += f"  \u2014  {bad} non-finite loss{'es' if bad > 1 else ''}"
        ax_loss.plot(step[~finite], np.full(bad, 0.04), "|", color="tab:red", ms=12,
                     transform=ax_loss.get_xaxis_transform(), label="non-finite (not plotted)")
    ax_loss.legend(loc="upper right")
    ax_loss.set_title(title)
    ax_loss.set_ylabel("loss")

    # learning rate, weight decay on a twin axis
    lr_line = ax_lr.plot(step, log["lr"], color="tab:orange", marker=marker, ms=3, label="lr")
    ax_wd = ax_lr.twinx()
    wd_line = ax_wd.plot(step, log["wd"], color="tab:green", ls="--", marker=marker, ms=3, label="weight decay")
    ax_lr.set_ylabel("learning rate", color="tab:orange")
    ax_wd.set_ylabel("weight decay", color="tab:green")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.set_zorder(ax_wd.get_zorder() + 1)  # so the legend is drawn over the weight-decay line
    ax_lr.patch.set_visible(False)
    ax_lr.legend(lr_line + wd_line, [line.get_label() for line in lr_line + wd_line], loc="upper center")
    ax_lr.set_title("learning rate and weight decay")

    # EMA momentum
    ax_mom.plot(step, log["momentum"], color="tab:purple", marker=marker, ms=3)
    ax_mom.ticklabel_format(axis="y", useOffset=False)  # 0.996..1.0 reads as itself, not "+9.96e-1"
    ax_mom.set_ylabel("momentum")
    ax_mom.set_title("target-encoder EMA momentum")

    # throughput
    tput = log["img/s"]
    ax_tput.plot(step, tput, color="tab:gray", lw=0.8, marker=marker, ms=3, label="img/s")
    if np.isfinite(tput).any():
        median = float(np.nanmedian(np.where(np.isfinite(tput), tput, np.nan)))
        ax_tput.axhline(median, color="black", ls="--", lw=1.2, label=f"median {median:,.1f} img/s")
    ax_tput.legend(loc="lower right")
    step_ms = log["time (ms)"]
    title = "throughput"
    if np.isfinite(step_ms).any():
        title += f" (median step time {np.nanmedian(np.where(np.isfinite(step_ms), step_ms, np.nan)):,.1f} ms)"
    ax_tput.set_title(title)
    ax_tput.set_ylabel("images / s")
    axes[-1].set_xlabel("global step (logged rows, after de-duplication)")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    if n == 1:
        axes[-1].set_xlim(-1, 1)

    starts = _epoch_starts(log)
    for ax in axes:
        for x in starts:
            ax.axvline(x - 0.5, color="0.75", lw=0.8, zorder=0)
        ax.grid(True, alpha=0.25)

    epochs = f"epochs {log['epoch'][0]}\u2013{log['epoch'][-1]}" if len(starts) else f"epoch {log['epoch'][0]}"
    fig.suptitle(f"{out_dir.resolve().name}  \u2014  {csv_path.name}  ({n} step{'s' if n > 1 else ''}, {epochs})", fontsize=13)

    png = out_dir / "curves.png"
    fig.savefig(png, dpi=110)
    fig.clear()
    return png


# ---------------------------------------------------------------------------- fine-tuning runs

FINETUNE_LOG = "finetune.csv"  # what fastjepa finetune writes: a row per step, an evaluation row after each epoch


def read_finetune_log(csv_path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A fine-tuning CSV's columns as float arrays (blank cells NaN), with ``global_step``: the
    step count at each row (an evaluation row shares its epoch's last step)."""
    csv_path = pathlib.Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise ValueError(f"{csv_path} has no data rows")
    header = rows[0]
    columns = {name: np.array([_number(row[i].strip() or "nan", name, csv_path, line) for line, row in enumerate(rows[1:], start=2)])
               for i, name in enumerate(header)}
    is_step = np.isfinite(columns["loss"])
    columns["global_step"] = np.cumsum(is_step).astype(float)
    return columns


def plot_finetune(out_dir: str | pathlib.Path) -> pathlib.Path:
    """Draw ``out_dir/curves.png`` from a fine-tuning run's ``finetune.csv``: the loss (+ EMA),
    the lr, and held-out and val top-1 (and val top-5) after each epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = pathlib.Path(out_dir)
    log = read_finetune_log(out_dir / FINETUNE_LOG)
    step, loss = log["global_step"], log["loss"]
    steps = np.isfinite(loss)
    evaluated = np.isfinite(log["val top-1"])
    fig = Figure(figsize=(10, 9))
    fig.subplots_adjust(left=0.09, right=0.95, top=0.93, bottom=0.06, hspace=0.3)
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_acc = fig.subplots(3, 1, sharex=True)
    if steps.any():
        span = int(min(100, max(1, steps.sum() // 20)))
        ax_loss.plot(step[steps], loss[steps], color="tab:blue", alpha=0.35, lw=0.8, label="loss")
        ax_loss.plot(step[steps], ema(loss[steps], span), color="tab:blue", lw=2, label=f"EMA (span {span})")
        ax_lr.plot(step[steps], log["lr"][steps], color="tab:green")
    ax_loss.set_title("training loss (soft-target cross-entropy)")
    ax_loss.legend(loc="upper right")
    ax_lr.set_title("learning rate (layer decay 1: the head)")
    for column, colour, style in (("heldout top-1", "tab:orange", "-o"), ("val top-1", "tab:purple", "-o"), ("val top-5", "tab:purple", ":o")):
        if evaluated.any():
            ax_acc.plot(step[evaluated], log[column][evaluated], style, color=colour, ms=4, label=column)
    if evaluated.any():
        best = int(np.nanargmax(np.where(evaluated, log["heldout top-1"], -np.inf)))
        ax_acc.axvline(step[best], color="tab:orange", lw=0.8, ls="--", label=f"best held-out (val top-1 {log['val top-1'][best]:.2f})")
        ax_acc.legend(loc="lower right")
    ax_acc.set_title("accuracy after each epoch (%)")
    ax_acc.set_xlabel("step")
    fig.suptitle(f"{out_dir.resolve().name}  \u2014  {FINETUNE_LOG}  ({int(steps.sum())} steps, {int(evaluated.sum())} epochs evaluated)", fontsize=13)
    png = out_dir / "curves.png"
    fig.savefig(png, dpi=110)
    fig.clear()
    return png


# ---------------------------------------------------------------------------- eval runs


def _grid_axes(heads: list[dict]) -> tuple[str, list, list[tuple], list[str]]:
    """The column setting (lr, else k, else the first), its values, and the rows: every
    combination of the other settings present."""
    settings = [k for k in heads[0] if k not in ("heldout_top1", "val_top1")]
    column = "lr" if "lr" in settings else "k" if "k" in settings else settings[0]
    rest = [k for k in settings if k != column]
    columns = sorted({h[column] for h in heads}, key=lambda v: (isinstance(v, str), v))
    rows = sorted({tuple(h[k] for k in rest) for h in heads}, key=lambda r: tuple(str(v) for v in r))
    return column, columns, rows, rest


def plot_eval(results_path: str | pathlib.Path) -> pathlib.Path:
    """Draw ``<results>.png`` beside an eval results file: the held-out and val top-1 of every
    head as two heat maps (the column setting, usually the lr, across; the other settings down),
    the chosen head framed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from fastjepa.eval.results import read_results

    results_path = pathlib.Path(results_path)
    record = read_results(results_path)
    heads = record["heads"]
    if not heads:
        raise ValueError(f"{results_path} lists no heads")
    column, columns, rows, rest = _grid_axes(heads)
    fig = Figure(figsize=(min(4 + 1.1 * len(columns), 22), 2.8 + 0.45 * len(rows)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, score, title in ((axes[0], "heldout_top1", "held-out train top-1 (selects)"), (axes[1], "val_top1", "val top-1 (reported)")):
        grid = np.full((len(rows), len(columns)), np.nan)
        for h in heads:
            value = h.get(score)
            if value is not None:
                grid[rows.index(tuple(h[k] for k in rest)), columns.index(h[column])] = 100 * value
        measured = np.isfinite(grid).any()
        image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=np.nanmin(grid) if measured else 0, vmax=np.nanmax(grid) if measured else 100)
        for (r, c), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(c, r, f"{value:.1f}", ha="center", va="center", fontsize=7, color="white" if value < np.nanmean(grid) else "black")
        chosen = record["chosen"]
        key = tuple(chosen.get(k) for k in rest)
        if key in rows and chosen.get(column) in columns:
            ax.add_patch(Rectangle((columns.index(chosen[column]) - 0.5, rows.index(key) - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.5))
        ax.set_xticks(range(len(columns)), [f"{v:g}" if isinstance(v, float) else str(v) for v in columns], rotation=45, fontsize=8)
        ax.set_yticks(range(len(rows)), [" ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in r) for r in rows], fontsize=8)
        ax.set_xlabel(column)
        ax.set_ylabel(" ".join(rest))
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.04)
    fig.suptitle(f"{record['method']} on {record.get('data', '?')}: top-1 {100 * record['top1']:.2f}% (chosen head framed, refit on all train)",
                 fontsize=11)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.25, top=0.85, wspace=0.35)
    png = results_path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    fig.clear()
    return png


def eval_results_in(folder: str | pathlib.Path) -> list[pathlib.Path]:
    """The eval results files (``METHOD.json``, written by ``fastjepa eval``) in a folder."""
    from fastjepa.eval.results import read_results

    found = []
    for path in sorted(pathlib.Path(folder).glob("*.json")):
        try:
            read_results(path)
        except ValueError:  # some other JSON file
            continue
        found.append(path)
    return found
