"""scripts/plot_log.py: parsing main.log (no matplotlib needed) and drawing the PNG (if matplotlib is there)."""
import builtins
import importlib
import os
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)
plot_log = importlib.import_module("plot_log")

LOG = """s:0 tel:10.9876
s:0 trl:10.9912 lr:0.000100 norm:12.34
s:1 trl:9.5000 lr:0.000200 norm:8.10
s:2 trl:8.2500 lr:0.000300 norm:nan
garbage line
step 3: not a log line
s:2 tel:8.5000
s:2 eval:0.2512
s:3 trl:7.0000 lr:0.000300 norm:3.00
s:3 trl:6.5000 lr:0.000300 norm:2.50
s:x trl:1.0
"""


def _write_run(tmp_path, name, text=LOG):
    d = tmp_path / name
    d.mkdir()
    (d / "main.log").write_text(text)
    return str(d)


def test_parse_log_series(tmp_path):
    d = plot_log.parse_log(_write_run(tmp_path, "run"))
    assert d["trl"] == [(0, 10.9912), (1, 9.5), (2, 8.25), (3, 6.5)]   # step 3 logged twice: last wins
    assert d["tel"] == [(0, 10.9876), (2, 8.5)]
    assert d["eval"] == [(2, 0.2512)]
    assert d["lr"][1] == (1, 0.0002)
    assert d["norm"][2][0] == 2 and d["norm"][2][1] != d["norm"][2][1]  # nan parses as a float


def test_parse_log_accepts_file_and_llmc_float_format(tmp_path):
    p = tmp_path / "main.log"
    p.write_text("s:0 trl:5.123456\ns:1 trl:4.5\ns:1 tel:4.75\n")     # llm.c's older %f lines
    d = plot_log.parse_log(str(p))
    assert d["trl"] == [(0, 5.123456), (1, 4.5)] and d["tel"] == [(1, 4.75)]
    assert "eval" not in d


def test_parse_log_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="main.log"):
        plot_log.parse_log(str(tmp_path))


def test_smooth():
    assert plot_log.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert plot_log.smooth([1.0, 2.0], 1) == [1.0, 2.0]


def test_missing_matplotlib_message(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(SystemExit) as e:
        plot_log.plot([_write_run(tmp_path, "run")], str(tmp_path / "p.png"))
    assert "pip install matplotlib" in str(e.value)


def test_plot_png_two_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = _write_run(tmp_path, "a")
    b = _write_run(tmp_path, "b", "s:0 trl:11.0 lr:0.1 norm:1.0\ns:1 trl:10.0 lr:0.1 norm:1.0\ns:1 tel:10.5\n")
    out = tmp_path / "plot.png"
    assert plot_log.main([a, b, "-o", str(out), "--smooth", "2", "--title", "test"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert str(out) in capsys.readouterr().out
