"""``fastjepa data verify DIR [--move-to DIR]``: bad files listed and moved aside, valid images of
every kind pass, exit codes, progress on stderr."""

import os

import pytest
from imagefiles import write_bad_files, write_colour_images, write_every_mode

import fastjepa.data.verify as verify
from fastjepa.cli import main


def run(capsys, *args):
    code = main(["data", "verify", *map(str, args), "--workers", "1"])
    out, err = capsys.readouterr()
    return code, out, err


def test_valid_images_of_every_kind_pass_with_exit_0(tmp_path, capsys):
    write_every_mode(tmp_path / "cls")  # grayscale and CMYK JPEGs, RGBA / palette / 16-bit PNGs
    write_colour_images(tmp_path / "cls", 3)
    (tmp_path / "labels.csv").write_text("a,b\n")
    code, out, err = run(capsys, tmp_path)
    assert code == 0 and err == ""
    assert out.strip() == "all 9 image files decode; 1 files without an image extension not checked (training does not read them)"


def test_bad_files_are_listed_with_their_reason_and_exit_1(tmp_path, capsys):
    write_colour_images(tmp_path, 2)
    bad = write_bad_files(tmp_path / "sub")
    code, out, _ = run(capsys, tmp_path)
    assert code == 1
    lines = out.strip().splitlines()
    assert lines[-1] == "5 of 7 image files are bad"
    reasons = dict(line.split(": ", 1) for line in lines[:-1])
    assert set(reasons) == set(bad.values())
    assert reasons[bad["truncated.jpg"]] == "truncated JPEG (no end marker)"
    assert reasons[bad["truncated.png"]] == "truncated PNG (no end marker)"
    assert reasons[bad["text.jpg"]] == reasons[bad["empty.png"]] == "not an image (no known image header)"
    assert "broken data stream" in reasons[bad["undecodable.jpg"]]  # complete file, damaged inside: found by the decode
    assert all(os.path.exists(p) for p in bad.values())  # nothing moved without --move-to


def test_move_to_keeps_relative_paths_never_overwrites_and_never_deletes(tmp_path, capsys):
    data, aside = tmp_path / "data", tmp_path / "aside"
    write_colour_images(data / "cls", 2)
    bad = write_bad_files(data / "cls")
    (aside / "cls").mkdir(parents=True)
    (aside / "cls" / "text.jpg").write_bytes(b"moved by an earlier run")
    code, out, _ = run(capsys, data, "--move-to", aside)
    assert code == 1 and out.strip().splitlines()[-1] == f"5 of 7 image files are bad, moved to {aside}"
    assert not any(os.path.exists(p) for p in bad.values()) and len(os.listdir(data / "cls")) == 2
    assert (aside / "cls" / "text.jpg").read_bytes() == b"moved by an earlier run"
    assert (aside / "cls" / "text.jpg.1").read_bytes() == b"this is not a jpeg"
    assert sorted(os.listdir(aside / "cls")) == sorted([*(os.path.basename(p) for p in bad.values()), "text.jpg.1"])
    assert f"(moved to {aside / 'cls' / 'text.jpg.1'})" in out
    assert run(capsys, data)[0] == 0  # clean now


def test_empty_missing_folders_and_a_move_target_inside_exit_1_with_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no images")
    code, out, err = run(capsys, tmp_path)
    assert code == 1 and out == "" and err.startswith(f"fastjepa data: no image files under {tmp_path} (extensions .jpg")
    code, _, err = run(capsys, tmp_path / "missing")
    assert code == 1 and "does not exist" in err and len(err.strip().splitlines()) == 1
    write_bad_files(tmp_path)
    code, _, err = run(capsys, tmp_path, "--move-to", tmp_path / "bad")
    assert code == 1 and "is inside" in err and len(err.strip().splitlines()) == 1
    assert os.path.exists(tmp_path / "text.jpg")


def test_worker_processes_and_the_progress_bar_on_stderr(tmp_path, capsys, monkeypatch):
    write_colour_images(tmp_path, 6)
    write_bad_files(tmp_path)
    monkeypatch.setattr(verify, "PROGRESS_FROM", 5)
    report = verify.verify_folder(str(tmp_path), workers=2)
    assert report.checked == 11 and len(report.bad) == 5
    assert "verify" in capsys.readouterr().err  # tqdm's bar
    verify.verify_folder(str(tmp_path), workers=1, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv", [["data"], ["data", "verify"]])
def test_data_command_needs_an_action_and_a_folder(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
