"""The server on Ray Serve: our app as the ingress, two engine replicas of the tiny model behind it, on a local
Ray cluster started once for these tests. Adapters reach the replicas only through the registry's remotes (a
bare git repository and a DVC folder), as they would on other machines."""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving import metric, registry_with, server_process, wait_for

from adapterctl.registry.repo import Registry
from adapterctl.registry.push import push
from adapterctl.registry.remotes import set_remote
from adapterctl.serve.api.dependencies import Settings
from adapterctl.serve.engines.base import AdapterSpec
from adapterctl.serve.engines.factory import EngineOptions
from adapterctl.serve.api.tenants import add_tenant, set_admin

PROMPT = "The quick brown fox"
NO_RAY = "Ray is not installed (the ray extra); `make test` installs it"


@dataclass
class Cluster:
    """The app deployed on the session's Ray cluster, with the registry it follows and each tenant's key."""

    url: str
    registry: Registry
    keys: dict[str, str]
    remote: str

    def post(self, path: str, who: str | None = "acme", **body: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=120)

    def complete(self, model: str, who: str | None = "acme", **body: Any) -> httpx.Response:
        return self.post("/v1/completions", who, model=model, prompt=PROMPT, max_tokens=4, temperature=0, **body)

    def stream(self, model: str, tokens: int) -> Any:
        """A streamed completion of exactly TOKENS tokens, opened (read it with iter_lines)."""
        body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "stream": True}
        headers = {"Authorization": f"Bearer {self.keys['acme']}"}
        return httpx.stream("POST", f"{self.url}/v1/completions", json=body, headers=headers, timeout=120)

    def replicas(self) -> dict[str, tuple[int, Any]]:
        """replica id -> (process id, engine status), as the replicas report them to their board."""
        import ray

        from adapterctl.serve.ray.cluster import APP, NAMESPACE

        return ray.get(ray.get_actor(f"{APP}-board", namespace=NAMESPACE).read.remote())

    def holders(self, key: str) -> set[str]:
        """The replicas whose engine holds adapter version KEY now."""
        return {replica for replica, (_, status) in self.replicas().items() if key in status.loaded}

    def routes(self, replica: str, result: str) -> float:
        return metric(self.url, "adapters_replica_routes_total", self.keys["admin"], replica=replica, result=result)


@pytest.fixture(scope="module")
def ray_url(adapters_home: Path) -> Iterator[str]:
    """One local Ray cluster and Serve HTTP proxy for these tests (Ray's start takes seconds; it is done once). The
    tests on it are marked `ray`: `make test-fast` starts no cluster."""
    pytest.importorskip("ray", reason=NO_RAY)
    import ray
    from ray import serve

    from adapterctl.serve.ray.cluster import start

    url = start(None, "127.0.0.1", 0, cpus=3)
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster(
    ray_url: str, tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, make_adapter: Any
) -> Iterator[Cluster]:
    from adapterctl.serve.ray.cluster import APP, ReplicaConfig, deploy, remote_url

    root = tmp_path_factory.mktemp("ray")
    names = ["acme-a", "acme-b", "acme-c", "acme-d", "other"]
    folders = {name: [make_adapter(seed)] for seed, name in enumerate(names, 1)}
    registry = registry_with(root / "registry", {**folders, "acme-support": [make_adapter(11), make_adapter(12)]})
    registry.promote("acme-support@v1.0.0", "prod")
    set_remote(registry, "origin", str(root / "origin.git"), None, {}, create=True)
    push(registry, [])
    registry.add("acme-unpushed", make_adapter(13))  # registered here only: no replica can fetch it
    tenants = root / "tenants.yaml"
    keys = {"acme": add_tenant(tenants, "acme", ["acme-*"], None, None), "admin": set_admin(tenants)}
    config = ReplicaConfig(
        replicas=2,
        threads=1,
        base=str(tiny_base),
        options=EngineOptions(
            engine="transformers", quantize="none", max_loaded=2, max_batch=8, max_rank=64, max_context=1024
        ),
        registry=registry.root,
        remote=remote_url(registry),
        branch=registry.git.branch(),
        tenants_file=tenants,
        settings=Settings(max_tokens_cap=1000),
        interval=0.1,
    )
    deploy(config)
    yield Cluster(ray_url, registry, keys, config.remote)
    from ray import serve

    serve.delete(APP)


def _events(lines: Iterator[str]) -> Iterator[Any]:
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


@pytest.mark.ray
def test_tenants_are_enforced_at_the_ingress(cluster: Cluster) -> None:
    assert cluster.complete("acme-a", who=None).status_code == 401
    other = cluster.complete("other")
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    models = httpx.get(f"{cluster.url}/v1/models", headers={"Authorization": f"Bearer {cluster.keys['acme']}"}).json()
    assert {m["id"] for m in models["data"]} >= {"acme-a", "acme-b", "acme-support"}
    assert "other" not in {m["id"] for m in models["data"]}
    assert cluster.post("/admin/refresh").status_code == 403
    assert cluster.post("/admin/refresh", who="admin").status_code == 200


@pytest.mark.ray
def test_a_version_not_pushed_to_the_remote_is_refused_saying_so(cluster: Cluster) -> None:
    refused = cluster.complete("acme-unpushed")
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["message"] == (
        "acme-unpushed@v1.0.0 cannot be served: its version tag is not on the registry's remote; publish it with "
        "`adapters push`"
    )
    assert cluster.complete("acme-a").status_code == 200


@pytest.mark.ray
def test_admin_load_and_unload_reach_the_replicas(cluster: Cluster) -> None:
    loaded = cluster.post("/admin/load", who="admin", model="acme-support@v1.0.0")
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["loaded"] is True and "acme-support@v1.0.0" in loaded.json()["adapters"]
    assert cluster.holders("acme-support@v1.0.0")
    unloaded = cluster.post("/admin/unload", who="admin", model="acme-support@v1.0.0")
    assert unloaded.json() == {**unloaded.json(), "unloaded": True}
    assert "acme-support@v1.0.0" not in unloaded.json()["adapters"]


@pytest.mark.ray
def test_requests_for_one_version_land_on_the_replica_that_loaded_it(cluster: Cluster) -> None:
    first = cluster.complete("acme-a")
    assert first.status_code == 200, first.text
    assert first.json()["model"] == "acme-a@v1.0.0"
    (holder,) = wait_for(lambda: cluster.holders("acme-a@v1.0.0"), 10, "the board to show acme-a loaded")
    hits, colds = cluster.routes(holder, "hit"), sum(cluster.routes(r, "cold") for r in cluster.replicas())
    for _ in range(5):
        assert cluster.complete("acme-a").status_code == 200
    # Each request is routed twice (its load, then its generation): all ten went to the holder, none loaded anew.
    assert cluster.routes(holder, "hit") == hits + 10
    assert sum(cluster.routes(r, "cold") for r in cluster.replicas()) == colds
    assert cluster.holders("acme-a@v1.0.0") == {holder}
    admin = cluster.keys["admin"]
    assert metric(cluster.url, "adapters_replica_adapter_loaded", admin, replica=holder, model="acme-a@v1.0.0") == 1
    # A second adapter is loaded on one replica only: its load and its generation were routed alike. (Which replica
    # Ray picks for a version none holds depends on what earlier tests left loaded, so it is not asserted.)
    assert cluster.complete("acme-b").status_code == 200
    wait_for(lambda: len(cluster.holders("acme-b@v1.0.0")) == 1, 10, "the board to show acme-b loaded")
    assert len(cluster.holders("acme-b@v1.0.0")) == 1


@pytest.mark.ray
def test_a_promote_under_load_reaches_routing_while_running_requests_keep_their_version(cluster: Cluster) -> None:
    assert cluster.complete("acme-support").json()["model"] == "acme-support@v1.0.0"
    with cluster.stream("acme-support", 400) as running:
        assert running.status_code == 200
        events = _events(running.iter_lines())
        seen = [next(events)]  # it has started, on v1.0.0
        cluster.registry.promote("acme-support@v1.1.0", "prod")
        answered = wait_for(
            lambda: (r := cluster.complete("acme-support")).json()["model"] == "acme-support@v1.1.0" and r,
            10,
            "the promotion to reach the ingress's routing",
        )
        assert answered.status_code == 200
        seen.extend(events)
    assert seen[-1] == "[DONE]"
    assert {e["model"] for e in seen[:-1]} == {"acme-support@v1.0.0"}
    assert sum(len(e["choices"][0]["text"]) > 0 for e in seen[:-1]) > 0
    # Every replica now routes the bare name to the new version: several at once, all v1.1.0.
    answers = [cluster.complete("acme-support") for _ in range(4)]
    assert {a.json()["model"] for a in answers} == {"acme-support@v1.1.0"}


@pytest.mark.ray
def test_a_replica_killed_mid_stream_fails_cleanly_and_ray_restarts_it(cluster: Cluster) -> None:
    assert cluster.complete("acme-c").status_code == 200
    (holder,) = wait_for(lambda: cluster.holders("acme-c@v1.0.0"), 10, "the board to show acme-c loaded")
    before = cluster.replicas()
    pid = before[holder][0]
    hits = cluster.routes(holder, "hit")
    with cluster.stream("acme-c", 1000) as running:
        assert running.status_code == 200
        events = _events(running.iter_lines())
        next(events)  # its first tokens have arrived: 999 more are to come from the replica holding acme-c
        os.kill(pid, signal.SIGKILL)
        rest = list(events)
    assert cluster.routes(holder, "hit") == hits + 2  # its load and its generation went to the killed replica
    # The fault landed mid-stream: the stream ends with an error event, not with [DONE].
    assert "[DONE]" not in rest
    error = rest[-1]["error"]
    assert error["type"] == "server_error" and "replica running this request stopped" in error["message"]
    # The other replica keeps serving meanwhile, and Ray starts a new replica in place of the dead one.
    assert cluster.complete("acme-a").status_code == 200
    after = wait_for(lambda: len(r := cluster.replicas()) == 2 and holder not in r and r, 120, "a new replica")
    (new,) = set(after) - set(before)
    assert after[new][0] != pid
    answer = wait_for(lambda: (r := cluster.complete("acme-c")).status_code == 200 and r, 60, "acme-c served again")
    assert answer.json()["model"] == "acme-c@v1.0.0"


def _has_open(pid: int, path: Path) -> bool:
    """Whether process PID has the file PATH open."""
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


@pytest.mark.ray
def test_a_replica_lost_before_it_answered_is_replaced_for_that_request_by_another(cluster: Cluster) -> None:
    from adapterctl.core.cache import locked
    from adapterctl.serve.ray.replica import replica_home

    lock = replica_home(cluster.remote) / "files" / ".materialize.lock"
    retries = metric(cluster.url, "adapters_replica_retries_total", cluster.keys["admin"])

    def waiting(besides: int = 0) -> list[int]:
        return [pid for pid, _ in cluster.replicas().values() if pid != besides and _has_open(pid, lock)]

    with ThreadPoolExecutor(1) as pool:
        # A fault point: a replica fetching a version it has not seen waits for this lock, before it answers anything.
        with locked(lock):
            answer = pool.submit(cluster.complete, "acme-d")
            (pid,) = wait_for(waiting, 60, "a replica to fetch acme-d")
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: waiting(besides=pid), 60, "the request sent to another replica")
        response = answer.result(timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "acme-d@v1.0.0" and response.json()["usage"]["completion_tokens"] == 4
    assert metric(cluster.url, "adapters_replica_retries_total", cluster.keys["admin"]) == retries + 1


def test_serve_on_replicas_refuses_what_it_cannot_use_in_one_line_before_starting_ray(
    cli: Any, make_adapter: Any, tmp_path: Path
) -> None:
    registry = registry_with(tmp_path / "registry", {"alpha": [make_adapter(1)]})  # no remote to fetch from
    cases = [
        (["--ray-address", "auto"], "--ray-address places engine replicas on a Ray cluster; add --replicas N."),
        (["--replicas", "2"], f"Replicas fetch adapters from the registry's remote, and {registry.root} has none"),
    ]
    for args, message in cases:
        result = cli("serve", "--registry", str(registry.root), *args, cwd=tmp_path)
        assert result.exit_code == 2, (args, result.output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output, result.output


@pytest.mark.ray
def test_adapters_serve_replicas_joins_a_cluster_serves_and_stops_on_sigterm(cluster: Cluster, tiny_base: Path) -> None:
    """The command itself, joining this module's Ray cluster (its app replaces the one the tests above used)."""
    import ray
    from ray import serve

    address = ray.get_runtime_context().gcs_address
    args = ["serve", "--replicas", "1", "--ray-address", address, "--port", "0", "--base", str(tiny_base)]
    args += ["--quantize", "none", "--max-context", "1024"]
    with server_process(["-m", "adapterctl.cli", *args], cluster.registry.root) as (server, url, lines):
        assert url == cluster.url  # the cluster's Serve proxy, which was running already
        answer = httpx.post(f"{url}/v1/completions", json={"model": "acme-a", "prompt": PROMPT, "max_tokens": 4})
        assert answer.status_code == 200 and answer.json()["model"] == "acme-a@v1.0.0"
        server.send_signal(signal.SIGTERM)
        assert server.wait(120) == 0, "".join(lines)
    assert "adapters" not in serve.status().applications


def test_a_replica_checks_out_the_registry_branch_whatever_the_remote_head_names(
    tmp_path: Path, tiny_base: Path, make_adapter: Any
) -> None:
    """A remote made by plain `git init --bare` whose HEAD names master, the registry's branch being main."""
    pytest.importorskip("ray", reason=NO_RAY)
    import subprocess

    from adapterctl.core.base import fingerprint
    from adapterctl.serve.ray.replica import EngineDescription, RemoteAdapters

    registry = registry_with(tmp_path / "registry", {"acme-a": [make_adapter(1)]})
    remote = tmp_path / "origin.git"
    subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=master", str(remote)], check=True)
    set_remote(registry, "origin", str(remote), None, {})
    push(registry, [])
    version = registry.state().resolve("acme-a")
    description = EngineDescription("tiny-llama", fingerprint(tiny_base), None, 1024, 100, 4096, 64, 2)
    adapters = RemoteAdapters(str(remote), registry.git.branch(), tiny_base, description)
    spec = AdapterSpec(version.name, str(version.version), tmp_path, version.commit)
    fetched = adapters.fetch(spec)
    assert (fetched.key, (fetched.path / "adapter_model.safetensors").is_file()) == ("acme-a@v1.0.0", True)
