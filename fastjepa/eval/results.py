"""What a probe returns and how a run reports it: ``ProbeResult``, its JSON file and its table.

Every probe (``linear``, ``logreg``, ``attentive``, ``knn``) fits one or more heads and returns a
``ProbeResult``: the val top-1 of the head chosen on held-out train data (never on val), the
chosen head's settings, and every head's settings with its held-out and val top-1.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastjepa.files import replaced_atomically


@dataclass
class ProbeResult:
    method: str  # linear | logreg | attentive | knn
    top1: float  # val top-1 of the chosen head, in [0, 1]
    chosen: dict  # the chosen head's settings (e.g. {"lr": ..., "weight_decay": ..., "head": ..., "features": ...}) and its scores
    heads: list[dict]  # every head: its settings, "heldout_top1" (None without a selection) and "val_top1"
    n_train: int  # images the reported head was trained on
    n_val: int
    classes: int
    protocol: dict = field(default_factory=dict)  # everything else that defines the run: epochs, batch size, optimizer, features, ...

    def to_dict(self) -> dict:
        return asdict(self)


def write_results(result: ProbeResult, path: str | os.PathLike, **context) -> Path:
    """Write the JSON file ``path`` (its folder created): the result plus ``context`` (the
    weights, the data, the subset, ...) and the date. Written to a temporary file, then renamed
    (``fastjepa.files``): a full disk raises ``DiskFullError`` and leaves any previous file."""
    path = Path(path)
    record = {**result.to_dict(), **context, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    data = (json.dumps(record, indent=2, default=str) + "\n").encode()
    with replaced_atomically(path, len(data)) as temporary:
        Path(temporary).write_bytes(data)
    return path


def read_results(path: str | os.PathLike) -> dict:
    """A results file as a dict; a clear error for anything else."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no eval results at {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a results file: {e}") from None
    if not isinstance(record, dict) or not {"method", "top1", "heads"} <= set(record):
        raise ValueError(f"{path} is not a fastjepa eval results file (it lacks method, top1 or heads)")
    return record


def format_table(result: ProbeResult, limit: int = 12) -> str:
    """The chosen head and the best ``limit`` heads by held-out top-1, as printed after a run."""
    settings = [k for k in result.heads[0] if k not in ("heldout_top1", "val_top1")] if result.heads else []
    ranked = sorted(result.heads, key=lambda h: -1.0 if h.get("heldout_top1") is None else -h["heldout_top1"])

    def percent(value) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    lines = [" ".join(f"{name:>12s}" for name in settings) + f" {'held-out':>9s} {'val':>7s}"]
    for head in ranked[:limit]:
        mark = " <- chosen" if all(head.get(k) == result.chosen.get(k) for k in settings) else ""
        lines.append(" ".join(f"{str(head[name]):>12s}" for name in settings) + f" {percent(head.get('heldout_top1')):>9s} "
                     f"{percent(head.get('val_top1')):>7s}{mark}")
    if len(ranked) > limit:
        lines.append(f"... {len(ranked) - limit} more heads in the results file")
    selected = any(head.get("heldout_top1") is not None for head in result.heads)
    how = "chosen on held-out train, refit on all of it" if selected else "one head, nothing to choose"
    lines.append(f"{result.method} top-1: {100 * result.top1:.2f}% ({how}; {result.n_train} train / {result.n_val} val images, "
                 f"{result.classes} classes)")
    return "\n".join(lines)
