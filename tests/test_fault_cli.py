"""Every error a user can cause on the command line: non-zero exit, one clear line, no traceback; and
`--debug` shows the traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from groupmixnorm.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli-errors")
    corrupt = folder / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    empty = folder / "empty.csv"
    empty.write_text("")
    checkpoint = folder / "model.pt"
    assert main(["train", "--method", "erm", "--epochs", "1", "--iterations", "2", "--hidden", "8", "--quiet",
                 "--out", str(folder / "run"), "--save", str(checkpoint)]) == 0
    no_columns = folder / "no_columns.csv"
    no_columns.write_text("a,b\n1,2\n")
    return {"dir": folder, "corrupt": corrupt, "empty": empty, "model": checkpoint, "no_columns": no_columns,
            "missing": folder / "missing.pt", "out": folder / "out"}


CASES = {
    "unknown command": (["nonsense"], "invalid choice"),
    "unknown flag": (["train", "--bogus", "--out", "{out}"], "unrecognized arguments: --bogus"),
    "unknown dataset": (["train", "--dataset", "mnist", "--out", "{out}"], "invalid choice: 'mnist'"),
    "not a number": (["train", "--epochs", "ten", "--out", "{out}"], "invalid int value"),
    "bad value": (["train", "--epochs", "0", "--out", "{out}"], "epochs must be at least 1"),
    "flag of another method": (["train", "--method", "erm", "--align", "1", "--out", "{out}"], "--align does not apply"),
    "threads": (["train", "--threads", "0", "--out", "{out}"], "--threads must be at least 1"),
    "celeba without data": (["train", "--dataset", "celeba", "--out", "{out}"], "needs --data-dir"),
    "missing data dir": (["train", "--dataset", "celeba", "--data-dir", "{dir}/nowhere", "--out", "{out}"], "nowhere"),
    "missing csv": (["train", "--csv", "{dir}/none.csv", "--label", "y", "--sensitive", "s", "--out", "{out}"], "none.csv"),
    "empty csv": (["train", "--csv", "{empty}", "--label", "y", "--sensitive", "s", "--out", "{out}"], "empty"),
    "unknown csv column": (["train", "--csv", "{no_columns}", "--label", "y", "--sensitive", "a", "--out", "{out}"], "'y'"),
    "predict: missing checkpoint": (["predict", "--checkpoint", "{missing}", "--csv", "{empty}", "--out", "{out}/p.csv"],
                                    "missing.pt"),
    "predict: corrupt checkpoint": (["predict", "--checkpoint", "{corrupt}", "--csv", "{empty}", "--out", "{out}/p.csv"],
                                    "corrupt.pt"),
    "predict: empty csv": (["predict", "--checkpoint", "{model}", "--csv", "{empty}", "--out", "{out}/p.csv"], "empty"),
    "predict: csv without the model's columns": (
        ["predict", "--checkpoint", "{model}", "--csv", "{no_columns}", "--out", "{out}/p.csv"], "age"),
    "debias: corrupt checkpoint": (["debias", "--checkpoint", "{corrupt}", "--out", "{out}"], "corrupt.pt"),
    "analyze: missing checkpoint": (["analyze", "--checkpoint", "{missing}", "--out", "{out}"], "missing.pt"),
    "export: corrupt checkpoint": (["export", "--checkpoint", "{corrupt}", "--onnx", "{out}/m.onnx"], "corrupt.pt"),
    "report: missing source": (["report", "{dir}/nothing-here", "--out", "{out}/r.html"], "nothing-here"),
    "bench: no seeds": (["bench", "adult", "--seeds", "0"], "--seeds must be at least 1"),
    "bench: methods on a bench without them": (["bench", "adult-debias", "--methods", "erm"], "--methods applies"),
    "bench: celeba folder that does not exist": (  # refused before the progress bar starts, not under it
        ["bench", "celeba", "--data-dir", "{dir}/nowhere", "--records-dir", "{dir}/records", "--results-dir",
         "{dir}/results"], "nowhere has no img_align_celeba"),
    "no batch per epoch": (["train", "--iterations", "0", "--out", "{out}"], "iterations must be at least 1"),
    "no command": ([], "a command is required"),
    "alpha beyond float32": (["train", "--method", "gmn", "--alpha", "inf", "--out", "{out}"], "alpha must be > 0"),
}


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's errors
        return int(stop.code)


@pytest.mark.parametrize("name", list(CASES))
def test_user_errors_are_one_line_without_traceback(name: str, files: dict, capsys: pytest.CaptureFixture[str]) -> None:
    argv, expected = CASES[name]
    code = _run([part.format(**files) for part in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert expected in lines[0] and "Traceback" not in lines[0]


def test_debug_shows_the_traceback(files: dict) -> None:
    with pytest.raises(Exception, match="corrupt.pt"):
        main(["predict", "--debug", "--checkpoint", str(files["corrupt"]), "--csv", str(files["empty"]),
              "--out", str(files["out"] / "p.csv")])


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("groupmixnorm.cli.train._run_train", interrupted)
    assert main(["train", "--out", "unused"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["groupmixnorm train: interrupted"]
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--debug", "--out", "unused"])


def test_a_real_process_prints_one_line_and_exits_2(files: dict) -> None:
    finished = subprocess.run([sys.executable, "-m", "groupmixnorm", "predict", "--checkpoint", str(files["corrupt"]),
                               "--csv", str(files["empty"]), "--out", str(files["out"] / "p.csv")],
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    assert len(finished.stderr.strip().splitlines()) == 1 and "Traceback" not in finished.stderr
    debug = subprocess.run([sys.executable, "-m", "groupmixnorm", "--debug", "predict", "--checkpoint",
                            str(files["corrupt"]), "--csv", str(files["empty"]), "--out", str(files["out"] / "p.csv")],
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
