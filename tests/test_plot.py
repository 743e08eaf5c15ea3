"""Training-curve plotting from synthetic trainer CSVs: parsing, de-duplication, the PNG, errors."""

import math

import matplotlib.image
import numpy as np
import pytest

from fastjepa.plot import plot_run, read_log

HEADER = "epoch,itr,loss,mask-A,mask-B,time (ms),lr,wd,momentum,img/s"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(epoch, itr, loss=None):
    """One log line; values are a function of (epoch, itr) unless ``loss`` is given."""
    step = epoch * 100 + itr
    if loss is None:
        loss = 1.0 / (1 + 0.01 * step)
    return f"{epoch},{itr},{loss},98,36,90.5,{1e-3 * (1 + step) / 1000:.6g},0.04,{0.996 + 1e-6 * step:.6f},1400.0"


def write_csv(folder, lines, name="jepa_r0.csv", header=HEADER):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def assert_png(path):
    assert path.name == "curves.png" and path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0


def test_resumed_run_keeps_the_last_row_of_each_step(tmp_path):
    first = [row(0, i) for i in range(10)] + [row(1, i, loss=9.0) for i in range(4)]  # crashed in epoch 1
    resumed = [row(1, i) for i in range(10)]  # resumed from the start of epoch 1
    path = write_csv(tmp_path / "run", first + resumed)

    log = read_log(path)
    assert len(log["global_step"]) == 20
    np.testing.assert_array_equal(log["global_step"], np.arange(20))
    np.testing.assert_array_equal(log["epoch"], [0] * 10 + [1] * 10)
    np.testing.assert_array_equal(log["itr"], list(range(10)) * 2)
    assert not (log["loss"] == 9.0).any()  # the crashed attempt's rows lost to the resumed ones
    assert log["loss"][10] == pytest.approx(1.0 / (1 + 0.01 * 100))
    assert log["epoch"].dtype == np.int64 and log["loss"].dtype == np.float64
    assert log["momentum"][-1] == pytest.approx(0.996 + 1e-6 * 109)

    assert_png(plot_run(tmp_path / "run"))


def test_stale_rows_of_an_abandoned_attempt_fall_into_place(tmp_path):
    # epoch 1 ran further the first time; the second attempt re-did only its start
    lines = [row(0, i) for i in range(3)] + [row(1, i, loss=5.0) for i in range(3)] + [row(1, 0, loss=0.5)]
    log = read_log(write_csv(tmp_path, lines))
    np.testing.assert_array_equal(log["epoch"], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(log["itr"], [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(log["loss"][3:], [0.5, 5.0, 5.0])


def test_multi_epoch_run_with_nan_loss_plots(tmp_path):
    lines = [row(e, i) for e in range(3) for i in range(40)]
    lines[50] = row(1, 10, loss="nan")
    lines[51] = row(1, 11, loss="inf")
    write_csv(tmp_path / "multi", lines)

    log = read_log(tmp_path / "multi" / "jepa_r0.csv")
    assert len(log["loss"]) == 120 and int((~np.isfinite(log["loss"])).sum()) == 2
    assert math.isnan(log["loss"][50])

    assert_png(plot_run(tmp_path / "multi"))


def test_single_row_and_other_rank_and_tag(tmp_path):
    write_csv(tmp_path, [row(0, 0)], name="myrun_r1.csv")
    log = read_log(tmp_path / "myrun_r1.csv")
    np.testing.assert_array_equal(log["global_step"], [0])
    assert_png(plot_run(tmp_path, rank=1))
    with pytest.raises(FileNotFoundError, match=r"\*_r0\.csv.*myrun_r1\.csv"):
        plot_run(tmp_path)  # rank 0 has no log; the error lists what is there


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder not found: .*nowhere"):
        plot_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no training log '\*_r0\.csv' .*empty"):
        plot_run(tmp_path / "empty")


def test_several_tags_for_one_rank(tmp_path):
    write_csv(tmp_path, [row(0, 0)], name="jepa_r0.csv")
    write_csv(tmp_path, [row(0, 0)], name="other_r0.csv")
    with pytest.raises(ValueError, match="jepa_r0.csv, other_r0.csv"):
        plot_run(tmp_path)


def test_header_missing_columns(tmp_path):
    header = "epoch,itr,loss,mask-A,mask-B,time (ms),lr"
    write_csv(tmp_path, ["0,0,0.9,98,36,90.5,0.001"], header=header)
    with pytest.raises(ValueError, match="jepa_r0.csv lacks required columns: wd, momentum, img/s"):
        plot_run(tmp_path)


def test_zero_data_rows(tmp_path):
    write_csv(tmp_path, [])
    with pytest.raises(ValueError, match="jepa_r0.csv has a header but no data rows"):
        plot_run(tmp_path)
    (tmp_path / "jepa_r0.csv").write_text("")
    with pytest.raises(ValueError, match="jepa_r0.csv is empty"):
        plot_run(tmp_path)


def test_non_numeric_cell_names_line_and_column(tmp_path):
    lines = [row(0, 0), row(0, 1), row(0, 2).replace(",0.04,", ",abc,")]
    write_csv(tmp_path, lines)
    with pytest.raises(ValueError, match=r"jepa_r0.csv line 4: column 'wd' has non-numeric value 'abc'"):
        plot_run(tmp_path)
    write_csv(tmp_path, [row(0, 0), "0,1.5,0.9,98,36,90.5,0.001,0.04,0.996,1400"])
    with pytest.raises(ValueError, match=r"line 3: column 'itr' needs an integer, got '1.5'"):
        read_log(tmp_path / "jepa_r0.csv")
    write_csv(tmp_path, [row(0, 0), "0,1,0.9,98"])  # a line cut short by a crash
    with pytest.raises(ValueError, match="line 3: 4 fields but the header has 10"):
        read_log(tmp_path / "jepa_r0.csv")
