"""Progress output: plain lines (not a carriage-return flood) when stderr is not a terminal."""

from __future__ import annotations

import io
import re

from evolve.observers.progress import ProgressObserver


class FakeDriver:
    def __init__(self, records=()):
        self.records = {r["eval_id"]: r for r in records}

    def busy_fraction(self) -> float:
        return 0.97


def _record(i: int, fitness: float, status: str = "ok") -> dict:
    return {"eval_id": f"c{i:06d}", "kind": "train", "status": status, "fitness": fitness}


LINE = re.compile(r"^progress: \d+/100 evaluations, best (\d\.\d{4}|-)(, held-out \d\.\d{4})?, \d+\.\d evals/min"
                  r"(, ETA \d+m\d\ds)?, busy 0\.97(, \d+ failed)?$")


def test_a_log_gets_one_plain_line_every_five_percent():
    log = io.StringIO()
    progress = ProgressObserver(100, stream=log)
    progress.on_start(FakeDriver())
    for i in range(100):
        progress.on_record(_record(i, i / 100, "failed" if i == 3 else "ok"))
        if i == 10:
            progress.on_record({"eval_id": "c000010/held_out", "kind": "held_out", "status": "ok", "fitness": 0.42})
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert 20 <= len(lines) <= 22
    assert all(LINE.match(line) for line in lines), lines[:3]
    assert lines[-1].startswith("progress: 100/100 evaluations, best 0.9900, held-out 0.4200")
    assert "1 failed" in lines[-1] and "ETA" not in lines[-1]


def test_a_slow_run_still_logs_every_interval():
    log = io.StringIO()
    progress = ProgressObserver(1000, stream=log, interval_s=0.0)  # every record is past the interval
    progress.on_start(FakeDriver([_record(0, 0.5)]))  # resumed: one record already there
    for i in range(1, 4):
        progress.on_record(_record(i, 0.1))
    assert [line.split(",")[0] for line in log.getvalue().splitlines()] == [
        f"progress: {n}/1000 evaluations" for n in (2, 3, 4)]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_bar():
    term = Terminal()
    progress = ProgressObserver(10, stream=term)
    progress.on_start(FakeDriver())
    for i in range(3):
        progress.on_record(_record(i, 0.5))
    progress.close()
    assert "progress:" not in term.getvalue() and "3/10" in term.getvalue() and "\r" in term.getvalue()
