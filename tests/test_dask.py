"""The explain-layer flow on a 2-worker dask cluster (prefect-dask) writes exactly what the default
task runner writes: the same explanations, simulations and scores, row for row and value for value.

The shards' explain, simulate and score tasks run in the dask worker processes (separate Python
processes, spawned), the recording and publishing in the flow's own process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tests.prefect_homes import prefect_home

pytestmark = pytest.mark.slow

STAGES = ("explanations", "simulations", "scores")


@pytest.fixture(scope="module")
def prefect_isolated(tmp_path_factory):
    """Own home, database and result storage: nothing is shared with another run or test."""
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("prefect-dask")
    with temporary_settings({PREFECT_HOME: root / "home", PREFECT_LOCAL_STORAGE_PATH: root / "results"}), \
            prefect_test_harness():
        yield root


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes; they inherit this environment (HF_HUB_OFFLINE=1)."""
    from distributed import Client, LocalCluster

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c, \
            Client(c) as client:
        yield c, client


def _params(tiny: str, corpus, out) -> dict:
    return dict(layer=1, units="0-5", model=tiny, corpus=str(corpus), tokens=100_000, explainer=f"local:{tiny}",
                simulator="embedding", k=2, shard_size=2, n_boot=50, out=str(out), window_len=8, top_k=8,
                n_random=6)


def _stage(out, stage: str, name: str = "layer_1.parquet") -> pl.DataFrame:
    """All shards' rows of one stage, in a canonical order."""
    frames = [pl.read_parquet(d / name).with_columns(pl.lit(d.name).alias("_folder"))
              for d in sorted((out / stage).iterdir())]
    df = pl.concat(frames)
    keys = [c for c, t in df.schema.items() if not t.is_nested()]
    return df.sort(keys)


def _cached_models(dask_worker) -> dict:
    from autoexplain.tasks import stages

    return {"llm": stages.llm_for.cache_info().currsize, "simulator": stages.simulator_for.cache_info().currsize,
            "pid": os.getpid()}


def _not_here(*args, **kwargs):
    raise AssertionError("scored in the flow's process, not in the scoring worker")


def test_dask_run_matches_sequential_run(prefect_isolated, cluster, tiny_llama_dir, prose_corpus, tmp_path,
                                        monkeypatch):
    """Also the scoring worker against scoring in-process: the sequential run scores its shards in the
    worker process (however small), the dask workers score in theirs."""
    from prefect_dask import DaskTaskRunner

    from autoexplain.flows.explain_layer import explain_layer
    from autoexplain.tasks import stages

    c, client = cluster
    seq_out, dask_out = tmp_path / "sequential", tmp_path / "dask"
    monkeypatch.setattr(stages, "SCORE_ELSEWHERE_FROM", 0)
    monkeypatch.setattr(stages.layer_mod, "run_score", _not_here)  # the worker process has its own
    seq = explain_layer(**_params(tiny_llama_dir, prose_corpus, seq_out))
    monkeypatch.undo()
    on_dask = explain_layer.with_options(task_runner=DaskTaskRunner(address=c.scheduler_address))
    par = on_dask(**_params(tiny_llama_dir, prose_corpus, dask_out))

    # the shards' tasks really ran in both worker processes, not in this one
    used = client.run(_cached_models)
    assert len(used) == 2 and all(u["pid"] != os.getpid() for u in used.values())
    assert all(u["llm"] == 1 and u["simulator"] == 1 for u in used.values()), used

    assert len(seq["scores"]) == len(par["scores"]) == 3
    for stage in STAGES:
        assert sorted(p.name for p in (seq_out / stage).iterdir()) == sorted(p.name for p in (dask_out / stage).iterdir())
        assert_frame_equal(_stage(seq_out, stage), _stage(dask_out, stage), check_exact=True)
    assert_frame_equal(_stage(seq_out, "simulations", "chosen.parquet"),
                       _stage(dask_out, "simulations", "chosen.parquet"), check_exact=True)


def test_explain_model_on_dask_equals_explain_layer(prefect_isolated, cluster, tiny_llama_dir, prose_corpus, tmp_path):
    """explain-model submits every layer's shards to the flow's task runner, dask included; a layer's
    scores equal those of an explain-layer run of that layer alone (default runner)."""
    from prefect_dask import DaskTaskRunner

    from autoexplain.flows.explain_layer import explain_layer
    from autoexplain.flows.explain_model import explain_model

    c, client = cluster
    base = {k: v for k, v in _params(tiny_llama_dir, prose_corpus, tmp_path / "model").items() if k != "layer"}
    base.update(units="0-1", explainer="embedding", k=1)
    on_dask = explain_model.with_options(task_runner=DaskTaskRunner(address=c.scheduler_address))
    result = on_dask(**base, layers="0,2", site="none")
    assert {(w["explained"], w["dead"]) for w in result["layers"].values()} == {(2, 0)} and len(result["layers"]) == 2
    assert len(list((tmp_path / "model" / "records").iterdir())) == 1, "one recording pass for both layers"
    alone = explain_layer(**{**base, "out": str(tmp_path / "alone")}, layer=2, site="none")
    model_scores = pl.concat([pl.read_parquet(r["path"]) for r in result["scores"]]).filter(pl.col("layer") == 2)
    alone_scores = pl.concat([pl.read_parquet(r["path"]) for r in alone["scores"]])
    keys = ["unit", "polarity", "method", "metric"]
    assert_frame_equal(model_scores.sort(keys).select(keys + ["value"]), alone_scores.sort(keys).select(keys + ["value"]),
                       check_exact=False, rel_tol=1e-6)


def _prefect_servers(dask_worker) -> int:
    """Prefect temporary servers this worker process started (its child processes serving the API)."""
    import psutil

    return sum("prefect.server.api.server:create_app" in " ".join(p.cmdline())
               for p in psutil.Process().children(recursive=True))


def test_dask_workers_report_to_the_commands_prefect_server(cluster, tiny_llama_dir, prose_corpus, tmp_path):
    """`explain-layer --dask ADDRESS` with Prefect's temporary server (no PREFECT_API_URL): the tasks on
    the workers report to the command's server. Before, each worker process found no API URL in the
    flow's settings and started a temporary server of its own."""
    from distributed import get_task_stream

    from autoexplain.preflight import cli_flag

    c, client = cluster
    assert sum(client.run(_prefect_servers).values()) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(HF_HUB_OFFLINE="1", PREFECT_HOME=prefect_home(tmp_path / "home"))
    params = {**_params(tiny_llama_dir, prose_corpus, tmp_path / "out"), "explainer": "embedding"}
    args = [a for k, v in params.items() for a in (cli_flag(k), str(v))]
    with get_task_stream(client) as stream:
        result = subprocess.run([sys.executable, "-m", "autoexplain.flows.cli", "explain-layer", *args,
                                 "--dask", c.scheduler_address],
                                capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(stream.data) >= 9, "the 3 shards' explain, simulate and score tasks ran on the workers"
    assert sum(client.run(_prefect_servers).values()) == 0, "no worker started a Prefect server"


def _foreign_worker(address: str) -> subprocess.Popen:
    """A real `dask worker` that tells the scheduler at `address` it lives at 192.0.2.10 (TEST-NET-1:
    never this machine) while it listens here: to the flow, a worker on another machine."""
    from tests.test_dask_probe import free_port

    port = free_port()
    return subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--listen-address",
                             f"tcp://127.0.0.1:{port}", "--contact-address", f"tcp://192.0.2.10:{port}",
                             "--nthreads", "1", "--no-nanny", "--no-dashboard"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def foreign_worker():
    """A real `dask scheduler` on loopback with one `_foreign_worker`."""
    from distributed import Client

    from tests.test_dask_probe import scheduler

    with scheduler("tcp") as address:
        worker = _foreign_worker(address)
        try:
            with Client(address) as client:
                client.wait_for_workers(1, timeout=60)
                assert {w["host"] for w in client.scheduler_info()["workers"].values()} == {"192.0.2.10"}
            yield address
        finally:
            worker.terminate()
            worker.wait(30)


def _cli_on_temporary_server(params: dict, dask: str) -> list[str]:
    """The explain-layer command line with `params` on `dask` (run it with `_temporary_server_env`)."""
    from autoexplain.preflight import cli_flag

    args = [a for k, v in params.items() for a in (cli_flag(k), str(v))]
    return [sys.executable, "-m", "autoexplain.flows.cli", "explain-layer", *args, "--dask", dask]


def _temporary_server_env(tmp_path) -> dict:
    """No Prefect API set: the flow starts Prefect's temporary server, on this machine's loopback."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    return {**env, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": prefect_home(tmp_path / "home")}


def test_workers_on_other_machines_need_a_prefect_api_they_can_reach(foreign_worker, tiny_llama_dir, prose_corpus,
                                                                      tmp_path):
    """With Prefect's temporary server (on this machine's loopback) and a worker elsewhere, the run
    stops with one line before any work: before, the worker's tasks would have failed once the run
    reached them, after the recording."""
    from tests.test_cli import _one_error_line

    params = {**_params(tiny_llama_dir, prose_corpus, tmp_path / "out"), "explainer": "embedding"}
    result = subprocess.run(_cli_on_temporary_server(params, foreign_worker), capture_output=True, text=True,
                            env=_temporary_server_env(tmp_path))
    line = _one_error_line(result)
    assert line.startswith("error: --dask: the scheduler's workers at 192.0.2.10 run on other machines"), line
    assert "PREFECT_API_URL" in line
    assert not (tmp_path / "out" / "records").exists(), "nothing was recorded"


def test_a_worker_elsewhere_that_joins_later_stops_the_run(tiny_llama_dir, prose_corpus, tmp_path):
    """An adaptive cluster often has no worker when the run starts, so the check before any work
    sees none: a worker on another machine that joins once the run waits for one stops the run with
    the same line (before, it took the run's tasks, which could never report from there)."""
    from distributed import Client

    from tests.test_cli import _one_error_line
    from tests.test_dask_probe import scheduler

    params = {**_params(tiny_llama_dir, prose_corpus, tmp_path / "out"), "explainer": "embedding"}
    with scheduler("tcp") as address, Client(address) as watcher:
        run = subprocess.Popen(_cli_on_temporary_server(params, address), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_temporary_server_env(tmp_path))
        worker = None
        try:
            waiting = 0
            while not waiting and run.poll() is None:  # the run's first task, with no worker to take it
                time.sleep(0.5)
                waiting = watcher.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
            assert waiting, f"the run ended before it submitted a task: {run.communicate()}"
            worker = _foreign_worker(address)
            stdout, stderr = run.communicate(timeout=300)
        finally:
            run.kill()
            if worker is not None:
                worker.terminate()
                worker.wait(30)
    line = _one_error_line(subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr))
    assert line.startswith("error: --dask: the scheduler's workers at 192.0.2.10 run on other machines"), line


def test_which_workers_count_as_elsewhere():
    import psutil

    from autoexplain.errors import UserError
    from autoexplain.server_probe import check_workers_reach

    mine = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == 2]  # AF_INET
    here = ["127.0.0.1", "localhost", "::1", *mine, "no-such-host.invalid", None]
    check_workers_reach(here, "http://127.0.0.1:4200/api")  # all on this machine, or unknown
    check_workers_reach(["192.0.2.10"], "http://192.0.2.1:4200/api")  # an API on the network
    for api in ("http://127.0.0.1:4200/api", "http://localhost:4200/api"):
        with pytest.raises(UserError, match=r"workers at 192\.0\.2\.10, 198\.51\.100\.7 run on other machines"):
            check_workers_reach([*here, "198.51.100.7", "192.0.2.10"], api)


def test_a_run_on_dask_hands_its_llm_settings_to_the_workers_and_counts_their_requests(
        prefect_isolated, cluster, tiny_llama_dir, prose_corpus, tmp_path):
    """The workers were started before the run, so they never saw its environment: the run's LLM
    settings reach them all the same (here `retries=0`: the one 500 fails its unit, where the
    default would have sent it again), the workers' requests are in this process's counts (the
    `LLM:` line), and the workers get their own settings back at the end."""
    from bench.llm_server import BenchServer
    from tests.llama_server import FaultServer

    from autoexplain.counters import COUNTS, since
    from autoexplain.flows.explain_layer import explain_layer
    from autoexplain.llm import RETRIES_ENV

    c, client = cluster
    upstream = BenchServer(latency=0.0)
    srv = FaultServer(fail_with=[500], upstream=upstream.base_url)
    try:
        before = dict(COUNTS)
        params = {**_params(tiny_llama_dir, prose_corpus, tmp_path / "out"), "units": "0-3", "k": 1, "site": "none",
                  "explainer": f"openai:bench@{srv.base_url}"}
        state = explain_layer(**params, retries=0, dask=c.scheduler_address, return_state=True)
        counted = since(before)
    finally:
        srv.stop()
        upstream.stop()
    assert state.name == "Incomplete" and state.result()["unanswered"] >= 1, (state.name, state.message)
    assert srv.requests and counted.get("llm_sent") == len(srv.requests), (counted, len(srv.requests))
    assert counted.get("llm_requests") == len(srv.requests) - 1 and not counted.get("llm_retries")
    assert set(client.run(lambda: os.environ.get(RETRIES_ENV)).values()) == {None}, "the workers' environment untouched"
    assert all(not runs for runs in client.run(_kept_runs).values()), "the run's settings gone from the workers"


def _kept_runs() -> list[str]:
    from autoexplain import run_scope

    return run_scope.runs()


def _read_in(run: str) -> tuple:
    from autoexplain import llm_cache, run_scope
    from autoexplain.llm import limits_now

    with run_scope.scope(run):
        return limits_now(), llm_cache.enabled()


def test_two_runs_on_one_cluster_keep_their_own_llm_settings(prefect_isolated, cluster, tiny_llama_dir, prose_corpus,
                                                              tmp_path):
    """Another run on the same workers, with other settings (no retries, no response cache), handed
    over as a run hands them: this run's tasks read their own (one 500 is sent again, the default
    retries), and the other run's settings are still on every worker after this run ends."""
    from bench.llm_server import BenchServer
    from tests.llama_server import FaultServer

    from autoexplain import run_settings
    from autoexplain.counters import COUNTS, since
    from autoexplain.flows.explain_layer import explain_layer
    from autoexplain.llm import LIMIT_ENVS, RETRIES_ENV
    from autoexplain.llm_cache import CACHE_ENV

    c, client = cluster
    other = dict(run_settings.current(), **{RETRIES_ENV: "0", CACHE_ENV: "off"})
    theirs = run_settings.WorkerSettings("another-run", other.items())
    client.register_plugin(theirs)
    upstream = BenchServer(latency=0.0)
    srv = FaultServer(fail_with=[500], upstream=upstream.base_url)
    try:
        params = {**_params(tiny_llama_dir, prose_corpus, tmp_path / "out"), "units": "0-3", "k": 1, "site": "none",
                  "explainer": f"openai:bench@{srv.base_url}"}
        before = dict(COUNTS)
        state = explain_layer(**params, dask=c.scheduler_address, return_state=True)
        retried = since(before).get("llm_retries")
        kept = client.run(_kept_runs)
        read = client.run(_read_in, "another-run")
    finally:
        run_settings.give_back(client, theirs)
        srv.stop()
        upstream.stop()
    assert state.name == "Completed" and retried == 1, (state.name, state.message, retried)  # not the other's 0
    assert (tmp_path / "out" / "llm_cache").is_dir(), "the run kept its answers: not the other run's cache off"
    assert all(runs == ["another-run"] for runs in kept.values()), kept
    for limits, cached in read.values():
        assert dict(zip(LIMIT_ENVS, limits))[RETRIES_ENV] == "0"
        assert cached is False
