"""Progress lines in the logs of a Prefect task: the ETA counts the work, not the setup before it."""

from __future__ import annotations

from autoexplain import progress


def test_eta_leaves_out_the_setup_before_the_first_report(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    lines: list[str] = []
    throttle = progress.Throttle(lines.append, "simulate layer 1", step=0.1)
    clock[0] = 100.0  # loading, reading the shard: no unit done yet
    throttle(1, 100)
    for done in range(2, 101):
        clock[0] += 1.0  # then a unit a second
        throttle(done, 100)
    assert lines[0] == "simulate layer 1: 1/100 (1%), 100s elapsed, ETA unknown"
    # 10 units in the 10 s since the first report, 89 to go: 89 s, where the rate since the start
    # (11 units in 110 s) would say 890 s
    assert lines[1] == "simulate layer 1: 11/100 (11%), 110s elapsed, ETA 89s"
    assert lines[-1] == "simulate layer 1: 100/100 (100%), 199s elapsed, ETA 0s"
    assert len(lines) == 11, "one line every tenth of the way"
