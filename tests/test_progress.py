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


def test_eta_of_shards_finishing(monkeypatch):
    """explain-layer's gathering line: the first shard carries the run's warm-up (loading the
    embedder, the explainer helper), so the rate is the shards after it."""
    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    eta = progress.Eta()
    said = []
    for done, at in [(256, 90.0), (512, 103.0), (768, 116.0), (1536, 155.0)]:
        clock[0] = at
        said.append(eta(done, 1536))
    assert said == ["ETA unknown", "ETA 52s", "ETA 39s", "ETA 0s"]  # 13 s a shard of 256 after the first
