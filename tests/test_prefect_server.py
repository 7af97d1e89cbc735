"""Against a REAL Prefect server (`prefect server start`, SQLite, own PREFECT_HOME), not the test harness:

- an `explain-layer` run on the tiny Llama leaves its artifacts (lineage, score-summary, layer-report)
  on the server, and one `prefect.asset.materialization.succeeded` event per output, whose resource
  is the output's file:// URI and whose related assets are its inputs;
- `deployments/prefect.yaml` deploys (`prefect --no-prompt deploy --all`), with the nightly cron
  schedule, and a process worker runs the explain-layer deployment to completion.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.llama_server import free_port
from tests.prefect_homes import prefect_home

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
ASSET_EVENTS = ("prefect.asset.materialization.succeeded", "prefect.asset.referenced")


# Settings that say where Prefect's server, database, results or profile are: never inherited.
_WHERE = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_HOME", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH",
          "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_API_DATABASE_CONNECTION_URL",
          "PREFECT_SERVER_DATABASE_CONNECTION_URL")


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the location settings (the test's own come in `extra`);
    tuning settings such as conftest's SQLite timeouts pass through."""
    env = {k: v for k, v in os.environ.items() if k not in _WHERE}
    env.update(HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600.0) -> None:
    """The limit only turns a hang into an error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it is still there."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free loopback port; yields its API URL and a client-side home."""
    root = tmp_path_factory.mktemp("prefect-server")
    home, client_home, log = root / "server-home", root / "client-home", root / "server.log"
    prefect_home(home)  # a migrated database: the server starts without migrating one
    client_home.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = _clean_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false",
                     PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db")
    with open(log, "w") as out:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(url, proc, log)
        yield {"url": url, "home": client_home, "root": root, "log": log}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def against_server(prefect_server):
    """Point this process at the server: API URL, result storage and home, for the module's tests."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    EventsWorker.drain_all()  # an events worker from an earlier test would post to an earlier server
    results = prefect_server["root"] / "results"
    with temporary_settings({PREFECT_API_URL: prefect_server["url"], PREFECT_HOME: prefect_server["home"],
                             PREFECT_LOCAL_STORAGE_PATH: results}):
        yield prefect_server
        APILogWorker.drain_all()
        EventsWorker.drain_all()


def _tiny_params(tiny: str, corpus, out) -> dict:
    return dict(layer=1, units="0-3", model=tiny, corpus=str(corpus), tokens=100_000, explainer=f"local:{tiny}",
                simulator="embedding", k=2, shard_size=2, n_boot=50, out=str(out), window_len=8, top_k=8,
                n_random=6)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _asset_events(api: str, flow_run_id, want: int, timeout: float = 600.0) -> list[dict]:
    """`POST /api/events/filter`: the run's asset events, polled until the server has persisted `want`
    materialisations (it writes events in batches)."""
    body = {"filter": {"event": {"prefix": ["prefect.asset."]},
                       "related": {"id": [f"prefect.flow-run.{flow_run_id}"]}}, "limit": 50}
    deadline, events = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        page = _post(f"{api}/events/filter", body)
        events = page["events"]
        while page.get("next_page"):
            with urllib.request.urlopen(page["next_page"], timeout=10) as r:
                page = json.loads(r.read())
            events += page["events"]
        if sum(e["event"] == ASSET_EVENTS[0] for e in events) >= want:
            return events
        time.sleep(1.0)
    raise AssertionError(f"only {len(events)} asset events after {timeout:.0f}s: {[e['event'] for e in events]}")


def test_flow_run_leaves_artifacts_and_asset_events(against_server, tiny_llama_dir, prose_corpus, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.events.worker import EventsWorker

    from autoexplain.flows.explain_layer import explain_layer

    out = tmp_path / "out"
    state = explain_layer(**_tiny_params(tiny_llama_dir, prose_corpus, out), return_state=True)
    assert state.is_completed(), state
    result = state.result()
    run_id = state.state_details.flow_run_id
    EventsWorker.drain_all()  # send what is still queued

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        assert run.state.is_completed() and run.flow_id == client.read_flow_by_name("explain-layer").id
        arts = {a.key: a for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))}

    assert {"lineage", "score-summary", "layer-report", "viewer"} <= set(arts)
    assert arts["lineage"].type == "table" and arts["score-summary"].type == "table"
    assert arts["layer-report"].type == "markdown"
    rows = lambda a: json.loads(a.data) if isinstance(a.data, str) else a.data  # noqa: E731
    lineage = rows(arts["lineage"])
    stages = {}
    for row in lineage:
        stages.setdefault(row["stage"], set()).add(row["output"])
    # 2 shards of 2 units: the records, then explanations, simulations and scores per shard
    assert {k: len(v) for k, v in stages.items()} == {"records": 1, "explanations": 2, "simulations": 2, "scores": 2}
    assert stages["records"] == {result["records"]["uri"]}
    assert stages["scores"] == {s["uri"] for s in result["scores"]}
    assert stages["explanations"] == {p.resolve().as_uri() for p in (out / "explanations").iterdir()}
    for stage in ("simulations", "scores"):  # the viewer reads the shards themselves: no merged copy on disk
        assert stages[stage] == {p.resolve().as_uri() for p in (out / stage).iterdir()}, stage
    summary = rows(arts["score-summary"])
    assert {r["method"] for r in summary} == {"explainer", "token-lookup", "output-lookup", "shuffled"}
    assert all(r["units"] == 8 for r in summary), "4 units x 2 polarities in every method and metric"
    assert "# Layer report" in arts["layer-report"].data and result["records"]["uri"] in arts["layer-report"].data

    events = _asset_events(against_server["url"], run_id, want=8)
    materialised = {}
    for e in events:
        if e["event"] == ASSET_EVENTS[0]:
            materialised[e["resource"]["prefect.resource.id"]] = {
                r["prefect.resource.id"] for r in e["related"] if r["prefect.resource.role"] == "asset"}
    assert {e["event"] for e in events} <= set(ASSET_EVENTS), {e["event"] for e in events}
    records = result["records"]["uri"]
    windows = Path(result["records"]["windows"]).parent.resolve().as_uri()
    assert set(materialised) == {windows, records} | stages["explanations"] | stages["simulations"] | stages["scores"]
    assert materialised[windows] == set() and materialised[records] == {windows}
    for uri, upstream in materialised.items():
        if uri in (windows, records):
            continue
        if uri in stages["explanations"]:
            assert upstream == {records}, (uri, upstream)
        elif uri in stages["simulations"]:
            assert records in upstream and len(upstream - {records}) == 1
            assert upstream - {records} <= stages["explanations"]
        else:
            assert len(upstream) == 1 and upstream <= stages["simulations"], (uri, upstream)
    # every explanations output feeds exactly one simulations output, and so on down the chain
    assert set().union(*(materialised[u] for u in stages["simulations"])) - {records} == stages["explanations"]
    assert set().union(*(materialised[u] for u in stages["scores"])) == stages["simulations"]
    referenced = {e["resource"]["prefect.resource.id"] for e in events if e["event"] == ASSET_EVENTS[1]}
    assert referenced == {windows, records} | stages["explanations"] | stages["simulations"]


def _final_state(client, run_id, worker: subprocess.Popen, log: Path, deadlock_s: float = 1800.0):
    """Poll a flow run until it is final. The limit only turns a hang into an error."""
    deadline = time.monotonic() + deadlock_s
    while not (state := client.read_flow_run(run_id).state).is_final():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"flow run {run_id} not final ({state}); worker log:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    return state


def test_prefect_yaml_deploys_and_a_worker_runs_it(against_server, tiny_llama_dir, prose_corpus, tmp_path):
    """Deploy `deployments/prefect.yaml`, then through one process worker: explain-layer on the tiny
    model, the nightly `rescore` of that run with another simulator, and the nightly deployment with
    its shipped parameters (no run there: it fails at once with one line naming the parameter)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    from autoexplain.storage import read_run

    url = against_server["url"]
    env = _clean_env(PREFECT_API_URL=url, PREFECT_HOME=str(against_server["home"]),
                     PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "results"))
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="autoexplain-pool", type="process"), overwrite=True)

    deploy = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    with get_client(sync_client=True) as client:
        explain = client.read_deployment_by_name("explain-layer/smollm2-layer15")
        nightly = client.read_deployment_by_name("rescore/nightly")
        assert explain.entrypoint == "flows/explain_layer.py:explain_layer"
        assert nightly.entrypoint == "flows/explain_layer.py:rescore"
        for dep in (explain, nightly):
            assert dep.work_pool_name == "autoexplain-pool"
            assert dep.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        assert explain.parameters["model"] == "smollm2" and explain.parameters["layer"] == 15
        assert not explain.schedules
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
        # what the server holds is what the file says, and every name is one the flow takes
        shipped = {d["name"]: d["parameters"] for d in
                   yaml.safe_load((REPO / "deployments/prefect.yaml").read_text())["deployments"]}
        assert nightly.parameters == shipped["nightly"]
        assert nightly.parameters["out"] == "out" and nightly.parameters["budget"] is None
        from autoexplain.flows.explain_layer import rescore
        assert set(nightly.parameters) <= set(inspect.signature(rescore.fn).parameters)
        listed = {f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments()}
        assert listed == {"explain-layer/smollm2-layer15", "explain-model/smollm2", "rescore/nightly"}
        whole = client.read_deployment_by_name("explain-model/smollm2")
        from autoexplain.flows.explain_model import explain_model
        assert whole.entrypoint == "flows/explain_model.py:explain_model" and whole.parameters == shipped["smollm2"]
        assert set(whole.parameters) <= set(inspect.signature(explain_model.fn).parameters)

    log = tmp_path / "worker.log"
    with open(log, "w") as f:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "autoexplain-pool"],
                                  cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp_path / "out"
    try:
        with get_client(sync_client=True) as client:
            # the deployment runs on the tiny model (not the embedded default)
            run = client.create_flow_run_from_deployment(
                explain.id, parameters=_tiny_params(tiny_llama_dir, prose_corpus, out))
            state = _final_state(client, run.id, worker, log)
            assert state.is_completed(), f"{state}\n{log.read_text()[-4000:]}"
            assert len(list((out / "explanations").iterdir())) == 2
            assert (out / "site" / "layer_1" / "index.html").is_file()
            before = read_run(out, 1)

            # the nightly job, given only the run's output root and layer, with a new simulator
            simulator = f"all-at-once:local:{tiny_llama_dir}"
            rescored = client.create_flow_run_from_deployment(
                nightly.id, parameters={"out": str(out), "layer": 1, "simulator": simulator, "n_boot": 50})
            state = _final_state(client, rescored.id, worker, log)
            assert state.is_completed(), f"{state}\n{log.read_text()[-4000:]}"
            arts = {a.key: a for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[rescored.id])))}

            # the model deployment: two layers recorded in one pass, one site, a run pointer per layer
            model_out = tmp_path / "model-out"
            tiny = {k: v for k, v in _tiny_params(tiny_llama_dir, prose_corpus, model_out).items() if k != "layer"}
            whole_run = client.create_flow_run_from_deployment(whole.id, parameters={
                **tiny, "layers": "0,2", "units": "0-1", "explainer": "embedding", "k": 1})
            state = _final_state(client, whole_run.id, worker, log)
            assert state.is_completed(), f"{state}\n{log.read_text()[-4000:]}"
            assert read_run(model_out, 0)["flow"] == read_run(model_out, 2)["flow"] == "explain-model"
            assert len(list((model_out / "records").iterdir())) == 1
            assert (model_out / "site" / "model" / "report.html").is_file()
            model_arts = {a.key for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[whole_run.id])))}
            assert "model-report" in model_arts

            # as shipped: out=out (the repository's), layer 15. A clean clone has no run there.
            shipped_out = REPO / "out"
            params = {} if not (shipped_out / "runs" / "layer_15.json").exists() else {"out": str(tmp_path / "empty")}
            shipped = client.create_flow_run_from_deployment(nightly.id, parameters=params)
            shipped_state = _final_state(client, shipped.id, worker, log)
            shipped_tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[shipped.id])))
            from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

            # memory:// dies with the run's process (the worker starts one per run): refused first
            lost = client.create_flow_run_from_deployment(explain.id, parameters={
                **_tiny_params(tiny_llama_dir, prose_corpus, out), "out": "memory://lost/out"})
            lost_state = _final_state(client, lost.id, worker, log)

            for _ in range(60):  # the run process sends its logs in batches: wait for its last line
                shipped_log = [g.message for g in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[shipped.id])))]
                if any("Finished in state" in m for m in shipped_log):
                    break
                time.sleep(0.5)
    finally:
        _stop(worker)

    after = read_run(out, 1)
    assert after["flow"] == "rescore" and after["params"]["simulator"] == simulator
    assert [s["key"] for s in after["previous_scores"]] == [s["key"] for s in before["scores"]]
    assert len(after["scores"]) == 2 and not {s["key"] for s in after["scores"]} & {s["key"] for s in before["scores"]}
    for ref in after["scores"]:
        assert Path(ref["path"]).is_file() and (Path(ref["path"]).parent / "manifest.json").is_file()
    import polars as pl

    new_scores = pl.concat([pl.read_parquet(r["path"]) for r in after["scores"]])
    assert {name.partition(":")[0] for name in new_scores["simulator"]} == {"all-at-once"} and new_scores.select("unit", "polarity").unique().height == 8
    assert {"rescore-comparison", "score-summary", "layer-report"} <= set(arts)
    assert "mean change" in arts["rescore-comparison"].data and "Units that moved most" in arts["rescore-comparison"].data

    assert shipped_state.is_failed() and "\n" not in shipped_state.message
    assert shipped_state.message.startswith("parameter out: "), shipped_state.message
    assert "holds no finished explain-layer run" in shipped_state.message or "does not exist" in shipped_state.message
    assert shipped_tasks == [], "a parameter error does no work"
    assert any(shipped_state.message in m for m in shipped_log), shipped_log
    assert not any("Traceback" in m for m in shipped_log), "the run log says the one line, not the engine's traceback"
    assert lost_state.is_failed() and lost_state.message.startswith(
        "parameter out: memory://lost/out lives in this process's memory: what is written there vanishes when the "
        "run's process exits"), lost_state.message
