"""The probes' results: the JSON file (context, date, atomic write), reading it back, the table."""

import json

import pytest

from fastjepa.eval.results import ProbeResult, format_table, read_results, write_results
from fastjepa.plot import eval_results_in, plot_eval


def grid_result() -> ProbeResult:
    heads = [{"lr": lr, "head": head, "heldout_top1": score, "val_top1": score - 0.01}
             for (lr, head), score in zip([(0.1, "bn"), (0.01, "bn"), (0.1, "linear")], (0.9, 0.95, 0.5))]
    return ProbeResult("linear", 0.93, {"lr": 0.01, "head": "bn", "heldout_top1": 0.95}, heads, 100, 40, 4, {"epochs": 3})


def test_write_adds_the_context_and_date_and_reads_back(tmp_path):
    path = write_results(grid_result(), tmp_path / "out" / "linear.json", weights="w.pth", subset={"per_class": 5})
    record = json.loads(path.read_text())
    assert record["top1"] == 0.93 and record["weights"] == "w.pth" and record["subset"] == {"per_class": 5} and "UTC" in record["date"]
    assert read_results(path) == record and not list(path.parent.glob(".*.tmp"))
    assert eval_results_in(path.parent) == [path]


def test_reading_something_else_is_a_named_error(tmp_path):
    (tmp_path / "other.json").write_text('{"loss": 1}')
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not a fastjepa eval results file"):
        read_results(tmp_path / "other.json")
    with pytest.raises(ValueError, match="is not a results file"):
        read_results(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="no eval results"):
        read_results(tmp_path / "missing.json")
    assert eval_results_in(tmp_path) == []


def test_table_ranks_by_heldout_marks_the_choice_and_says_how_it_was_chosen():
    table = format_table(grid_result()).splitlines()
    assert "0.01" in table[1] and table[1].endswith("<- chosen") and sum("<- chosen" in line for line in table) == 1
    assert "chosen on held-out train, refit on all of it" in table[-1] and "100 train / 40 val" in table[-1]
    one = ProbeResult("logreg", 0.9, {"lambd": 1e-6, "heldout_top1": None}, [{"lambd": 1e-6, "heldout_top1": None, "val_top1": 0.9}], 10, 5, 2)
    assert "one head, nothing to choose" in format_table(one)


def test_plot_draws_both_scores_beside_the_file(tmp_path):
    path = write_results(grid_result(), tmp_path / "linear.json")
    png = plot_eval(path)
    assert png == tmp_path / "linear.png" and png.stat().st_size > 5000
