"""The real client path: `dagster dev` (webserver + daemon) in a subprocess, driven over HTTP with Dagster's
GraphQL API, as a user or an orchestrator outside this repository would drive it.

Setup (in this process, before the server starts): tiny synthetic data, the daily data assets of the training
day, and a tiny registered champion in the same OMNISAGE_HOME + MLflow sqlite store, because daily_pipeline
contains the assets that read the champion (entity_embeddings, recall_report).

Then, against `dagster dev -h 127.0.0.1 -p <free port>` with a DAGSTER_HOME whose dagster.yaml queues runs and
runs at most one at a time:
- one partition of daily_pipeline launched with dagster_graphql.DagsterGraphQLClient,
- a two-partition backfill of daily_pipeline with the launchPartitionBackfill mutation: the daily assets'
  single-run backfill policy makes it ONE run for both days (docs/operations.md, "Backfills"),
- every run succeeds (a failed run fails the test at once with its event log), no two runs overlapped
  (the daily chain's pool, enforced per run with limit 1), every partition's outputs exist under OMNISAGE_HOME (contract "Outputs"), and a
  secret in the server's environment appears nowhere in the runs' event logs; the MLflow tracking URI is not
  the sqlite default, so the code location holds it as dg.EnvVar and each run resolves it from its environment;
- finally the whole process group is killed and the port is closed again.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from omnisage_pipeline.storage.publish import published_path
from omnisage_pipeline.tools.synthetic import generate

REPO = Path(__file__).resolve().parents[2]
DAYS = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
TRAIN_DAY = DAYS[0]
SINGLE_DAY = DAYS[1]
BACKFILL_DAYS = DAYS[2:]
LOCATION = "omnisage"
JOB = "daily_pipeline"
MODEL_CONSUMERS = {"entity_embeddings", "recall_report", "ann_index"}  # ann_index: from the embeddings
SECRET = "omnisage-dev-secret-5b1f0c2e"
TINY_TRAIN = {
    "preset": "small",
    "steps": 4,
    "warmup_steps": 1,
    "batch_size": 16,
    "num_random_negatives": 16,
    "pool_size": 200,
    "log_every": 2,
    "checkpoint_every": 0,
    "device": "cpu",
}

DAGSTER_YAML = """\
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
concurrency:
  runs:
    max_concurrent_runs: 8
  pools:
    granularity: run
    default_limit: 1
telemetry:
  enabled: false
"""

IN_PROCESS: dict = {}  # daily_pipeline runs in process by definition (omnisage_pipeline/jobs.py)
SERVER_START_DEADLINE_S = 180
RUNS_DEADLINE_S = 420


def _outputs(home: Path, asset: str, day: str) -> list[Path]:
    """The published folders (and files) of one asset's partition, from the contract's "Outputs" table."""
    wh = home / "warehouse"
    table = {
        "engagement_logs": [wh / "engagement_logs", wh / "quarantine" / "engagement_logs"],
        "entity_metadata": [wh / "entity_metadata", wh / "quarantine" / "entity_metadata"],
        "daily_edges": [wh / "daily_edges"],
        "pruned_edges": [wh / "pruned_edges"],
        "training_examples": [wh / "training_examples"],
        "graph_snapshot": [home / "graph"],
        "feature_store": [home / "features"],
        "entity_embeddings": [home / "embeddings", home / "user_embeddings"],
        "recall_report": [home / "reports"],
        "ann_index": [home / "indexes"],
    }
    assert asset in table, f"daily_pipeline has an asset the contract's Outputs table does not name: {asset}"
    dataset = table[asset]
    paths = []
    for folder in dataset:
        published = published_path(folder, day)
        assert published is not None, f"{asset}: {folder}/dt={day} was not published"
        paths.append(published)
    if asset == "entity_metadata":
        paths += [paths[0] / "pins", paths[0] / "boards"]
    if asset == "recall_report":
        paths = [paths[0] / "recall.json"]
    return paths


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class GraphQL:
    """Raw POSTs to /graphql (urllib) for what DagsterGraphQLClient has no public method for."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/graphql"

    def __call__(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # GraphQL answers a bad query with 400 and the reason
            raise AssertionError(f"GraphQL HTTP {exc.code}: {exc.read()[:4000]!r}") from exc
        assert not payload.get("errors"), payload["errors"]
        return payload["data"]


WORKSPACE_QUERY = """
{ repositoriesOrError { __typename ... on RepositoryConnection {
    nodes { name location { name } pipelines { name } } } } }
"""
DAEMONS_QUERY = "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"
JOB_ASSETS_QUERY = """
query($selector: PipelineSelector!) { assetNodes(pipeline: $selector) { assetKey { path } } }
"""
BACKFILL_MUTATION = """
mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) { __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on PartitionSetNotFoundError { message }
    ... on PartitionKeysNotFoundError { message } } }
"""
BACKFILL_QUERY = """
query($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename
    ... on PartitionBackfill { status error { message } } ... on PythonError { message } } }
"""
RUNS_QUERY = """
query($tags: [ExecutionTag!]) { runsOrError(filter: {tags: $tags}) { __typename ... on Runs {
    results { runId status startTime endTime tags { key value } } } } }
"""
LOGS_QUERY = """
query($runId: ID!, $cursor: String) { logsForRun(runId: $runId, afterCursor: $cursor) { __typename
    ... on EventConnection { cursor hasMore events { __typename
        ... on MessageEvent { message level stepKey }
        ... on ExecutionStepFailureEvent { error { message stack } }
        ... on RunFailureEvent { error { message stack } }
        ... on MaterializationEvent { partition assetKey { path }
            metadataEntries { label ... on TextMetadataEntry { text } ... on PathMetadataEntry { path }
                ... on JsonMetadataEntry { jsonString } } } } } } }
"""


def _event_log(gql: GraphQL, run_id: str) -> list[dict]:
    events, cursor = [], None
    while True:
        page = gql(LOGS_QUERY, {"runId": run_id, "cursor": cursor})["logsForRun"]
        assert page["__typename"] == "EventConnection", page
        events += page["events"]
        cursor = page["cursor"]
        if not page["hasMore"]:
            return events


def _format_log(events: list[dict]) -> str:
    lines = []
    for e in events:
        line = f"[{e.get('level', '')}] {e.get('stepKey') or ''} {e['__typename']}: {e.get('message', '')}"
        if e.get("error"):
            line += "\n" + e["error"]["message"] + "\n" + "".join(e["error"].get("stack") or [])
        lines.append(line)
    return "\n".join(lines)[-12_000:]


@pytest.fixture
def champion_home(tmp_path, omnisage_env, monkeypatch) -> dict[str, str]:
    """Tiny data, the training day's data assets and a registered tiny champion, all in-process."""
    import dagster as dg

    from assets.training import OmniSageModelConfig, train_from_asset_config
    from ml.registry import ModelRegistry
    from omnisage_pipeline.definitions import build_resources, defs
    from omnisage_pipeline.resources import MlflowResource
    from omnisage_pipeline.settings import Settings

    data_root = tmp_path / "data"
    generate(data_root, start_date=DAYS[0], days=len(DAYS), scale="tiny", seed=0)
    monkeypatch.setenv("OMNISAGE_DATA_ROOT", str(data_root))
    monkeypatch.setenv("OMNISAGE_START_DATE", DAYS[0])
    # Not the sqlite default: the server's code location holds it as dg.EnvVar, resolved by each run.
    tracking_uri = f"sqlite:///{Path(omnisage_env['OMNISAGE_HOME']) / 'registry.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    settings = Settings.from_env()
    job = defs.resolve_job_def(JOB)
    data_keys = [k for k in job.asset_layer.executable_asset_keys if k.to_user_string() not in MODEL_CONSUMERS]
    result = dg.materialize(
        list(defs.assets), selection=data_keys, partition_key=TRAIN_DAY, resources=build_resources(settings)
    )
    assert result.success
    outcome = train_from_asset_config(
        settings,
        MlflowResource.from_settings(settings),
        OmniSageModelConfig(**TINY_TRAIN),
        log=lambda m: None,
    )
    assert outcome is not None and outcome.alias == "champion"
    assert ModelRegistry(settings.mlflow_tracking_uri).version_for_alias("champion") == outcome.version
    return {
        **omnisage_env,
        "OMNISAGE_DATA_ROOT": str(data_root),
        "OMNISAGE_START_DATE": DAYS[0],
        "MLFLOW_TRACKING_URI": tracking_uri,
    }


@pytest.fixture
def dagster_dev(tmp_path, champion_home):
    """`dagster dev` in its own process group on 127.0.0.1:<free port>; yields (port, log file, env)."""
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    port = _free_port()
    env = {
        # (NUMBA_CACHE_DIR / MPLCONFIGDIR of this process may point into another test's home: the server's
        # processes derive their own from OMNISAGE_HOME.)
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OMNISAGE_", "DAGSTER_", "MLFLOW_", "NUMBA_CACHE_DIR", "MPLCONFIGDIR"))
        },
        **champion_home,
        "DAGSTER_HOME": str(dagster_home),
        "OMNISAGE_TEST_SECRET": SECRET,
        "AWS_SECRET_ACCESS_KEY": SECRET,
    }
    log_path = tmp_path / "dagster_dev.log"
    cmd = [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(REPO / "workspace.yaml"),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield port, log_path, proc
        assert not any(cwd.iterdir()), f"dagster dev wrote into its working directory: {list(cwd.iterdir())}"
    finally:
        pgid = os.getpgid(proc.pid) if proc.poll() is None else proc.pid
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.2)
            if not _group_alive(pgid):
                break
        proc.wait(timeout=30)
        assert not _group_alive(pgid), "processes of the dagster dev group survived SIGKILL"
        assert not _port_open(port), f"port {port} still accepts connections after dagster dev was stopped"


def _group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return bool(_group_pids(pgid))  # zombies (exited, not yet reaped) do not count


def _listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by these processes (/proc/net/tcp{,6})."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in inodes:
                continue
            addr_hex, port_hex = local.split(":")
            raw = bytes.fromhex(addr_hex)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((str(ipaddress.ip_address(raw)), int(port_hex, 16)))
    return found


def _tail(path: Path, n: int = 6000) -> str:
    return path.read_bytes()[-n:].decode(errors="replace")


def _wait_until_ready(gql: GraphQL, port: int, proc, log_path: Path) -> None:
    """/server_info answers, the code location is loaded with daily_pipeline, and the daemons that run
    queued runs and backfills report healthy."""
    deadline = time.monotonic() + SERVER_START_DEADLINE_S
    stage = "webserver"
    while True:
        assert proc.poll() is None, f"dagster dev exited with {proc.returncode}:\n{_tail(log_path)}"
        assert time.monotonic() < deadline, f"dagster dev not ready ({stage}) in time:\n{_tail(log_path)}"
        try:
            if stage == "webserver":
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5) as r:
                    info = json.loads(r.read())
                assert "dagster_version" in info, info
                stage = "code location"
            if stage == "code location":
                repos = gql(WORKSPACE_QUERY)["repositoriesOrError"]
                jobs = [
                    p["name"]
                    for n in repos.get("nodes", [])
                    if n["location"]["name"] == LOCATION
                    for p in n["pipelines"]
                ]
                if JOB not in jobs:
                    raise ConnectionError("code location not loaded yet")
                stage = "daemon"
            statuses = gql(DAEMONS_QUERY)["instance"]["daemonHealth"]["allDaemonStatuses"]
            healthy = {s["daemonType"] for s in statuses if s["healthy"]}
            if {"QUEUED_RUN_COORDINATOR", "BACKFILL"} <= healthy:
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1)


def test_dagster_dev_runs_a_partition_and_a_backfill_over_graphql(dagster_dev, champion_home):
    from dagster_graphql import DagsterGraphQLClient

    port, log_path, proc = dagster_dev
    home = Path(champion_home["OMNISAGE_HOME"])
    gql = GraphQL(port)
    _wait_until_ready(gql, port, proc, log_path)

    # Everything dagster dev listens on (webserver, code server) is on the loopback interface only.
    listening = _listening_addresses(_group_pids(os.getpgid(proc.pid)))
    assert any(p == port for _, p in listening), listening
    assert all(_is_loopback(addr) for addr, _ in listening), listening

    # The job's assets, as the server sees them.
    repo = next(n for n in gql(WORKSPACE_QUERY)["repositoriesOrError"]["nodes"] if n["location"]["name"] == LOCATION)
    selector = {"pipelineName": JOB, "repositoryName": repo["name"], "repositoryLocationName": LOCATION}
    assets = sorted(
        "/".join(a["assetKey"]["path"]) for a in gql(JOB_ASSETS_QUERY, {"selector": selector})["assetNodes"]
    )
    assert {"engagement_logs", "pruned_edges", "entity_embeddings"} <= set(assets), assets

    # One partition through the public client, then a two-day backfill of the same job. Both ask for the
    # in-process executor: on 2 cores a subprocess per step costs more than the tiny steps themselves.
    client = DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=60)
    single_run = client.submit_job_execution(JOB, run_config=IN_PROCESS, tags={"dagster/partition": SINGLE_DAY})
    launched = gql(
        BACKFILL_MUTATION,
        {
            "params": {
                "selector": {
                    "partitionSetName": f"{JOB}_partition_set",
                    "repositorySelector": {
                        "repositoryName": repo["name"],
                        "repositoryLocationName": LOCATION,
                    },
                },
                "partitionNames": BACKFILL_DAYS,
                "runConfigData": IN_PROCESS,
            }
        },
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]
    backfill_tag = {"key": "dagster/backfill", "value": backfill_id}

    # Poll until the single run and the backfill's run have succeeded; a failed run ends the test at once
    # with its event log.
    deadline = time.monotonic() + RUNS_DEADLINE_S
    while True:
        assert proc.poll() is None, f"dagster dev exited with {proc.returncode}:\n{_tail(log_path)}"
        runs = gql(RUNS_QUERY, {"tags": None})["runsOrError"]["results"]
        for run in runs:
            if run["status"] in ("FAILURE", "CANCELED", "CANCELING"):
                pytest.fail(
                    f"run {run['runId']} {run['status']} (tags {run['tags']}):\n"
                    f"{_format_log(_event_log(gql, run['runId']))}"
                )
        backfill = gql(BACKFILL_QUERY, {"id": backfill_id})["partitionBackfillOrError"]
        assert backfill["__typename"] == "PartitionBackfill", backfill
        assert backfill["status"] in ("REQUESTED", "COMPLETED", "COMPLETED_SUCCESS"), backfill
        backfill_runs = [r for r in runs if backfill_tag in r["tags"]]
        if backfill_runs and all(r["status"] == "SUCCESS" for r in runs):
            break
        assert time.monotonic() < deadline, (
            f"runs not done in time: {[(r['runId'], r['status']) for r in runs]}, backfill {backfill}\n"
            f"{_tail(log_path)}"
        )
        time.sleep(2)

    # The single run plus ONE backfill run for both days (the daily assets' single-run backfill policy).
    assert {r["runId"] for r in runs} == {single_run, backfill_runs[0]["runId"]}, runs
    tags = {t["key"]: t["value"] for t in backfill_runs[0]["tags"]}
    assert (
        tags.get("dagster/asset_partition_range_start"),
        tags.get("dagster/asset_partition_range_end"),
    ) == (
        BACKFILL_DAYS[0],
        BACKFILL_DAYS[-1],
    ), tags

    # The daily chain's pool (granularity run, limit 1) -> the runs did not overlap in time.
    spans = sorted((r["startTime"], r["endTime"]) for r in runs)
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans)), spans

    # Every asset of the job published every launched partition under OMNISAGE_HOME (contract "Outputs").
    for day in [SINGLE_DAY, *BACKFILL_DAYS]:
        for asset in assets:
            for path in _outputs(home, asset, day):
                assert path.exists(), f"{asset} dt={day}: {path} missing"
                assert path.is_file() or any(path.iterdir()), f"{asset} dt={day}: {path} is empty"
        assert pq_rows(_outputs(home, "entity_embeddings", day)[0]) > 0, f"entity_embeddings dt={day}: no rows"

    # Each run recorded one materialization per (asset, day) it covered; the secret in the server's
    # environment appears nowhere in the event logs (messages, metadata).
    for run in runs:
        events = _event_log(gql, run["runId"])
        # A range run records each day when it is published and again at the end of the step (assets/daily.py).
        materialized = sorted(
            {
                ("/".join(e["assetKey"]["path"]), e["partition"])
                for e in events
                if e["__typename"] == "MaterializationEvent"
            }
        )
        days = [SINGLE_DAY] if run["runId"] == single_run else BACKFILL_DAYS
        assert materialized == sorted((a, d) for a in assets for d in days), materialized
        assert SECRET not in json.dumps(events)


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def pq_rows(folder: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(folder.glob("*.parquet")))
