"""The reviewer bundle and its checker (STYLE.md "A checker that trusts nothing", after MLPerf's
submission checker).

`bundle` packs, for every trusted run of the store, its records (job.json, result.json,
log.txt, model/compression.json, track 7's sealed judge.json, the bench's report.md and
bench.json) but not the model weights, whose hashes stay in result.json and are listed in
`artifacts.json` (a run whose recorded outputs are gone or changed is not trusted); then the
store report built from exactly those files, `environment.json` (what ran each job, image
digests), `reproduce.sh` (the `llmcbench bench` lines that recreate each cell, derived from
the job records) and `MANIFEST.sha256` over everything. The bundle's digest is the sha256
of its manifest: publish it, and `verify --expect-digest` closes the last gap (an attacker
who rewrites every file and the manifest).

`verify` trusts nothing in the bundle: it re-hashes every file against the manifest,
re-checks every result.json seal and every hash a result recorded (its job.json, its
compression.json, its artifacts), re-derives the whole report from the raw results with
the same scorer (tracks/scoring.py) and demands identity with the bundled report.json and
report.md, and re-derives reproduce.sh. Each problem is one line naming the file.

A bundle never follows a symbolic link: a job writes its run dir (`/out`), and a link there
(log.txt -> a host file) would carry a file from outside the store into the bundle. A run
with one is left out, as are the evaluations of an artifact whose compress run is left out
(verify would reject them: their artifact is not in the bundle).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import re
import shlex
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from ..contract import ContractError, Job, Result, read_record
from ..fsio import not_there, sha256_file, write_atomic
from ..judging import JUDGE_FILE, judgement_problem
from .write import REPORT_FILES, write_store_report
from .build import StoredRun, build_store_report, generator, scan_runs
from .render import render_html, render_markdown
from .schema import StoreReport

TOP = "llmcbench-bundle"
MANIFEST = "MANIFEST.sha256"
RUN_FILES = ("job.json", "result.json", "log.txt", "model/compression.json", JUDGE_FILE, "report.md", "bench.json")
BUNDLE_FILES = ("environment.json", "artifacts.json", "reproduce.sh")


class BundleError(ValueError):
    """The bundle cannot be built or read at all (not a problem list: one line, exit 2)."""


# ---------------------------------------------------------------- bundle


def make_bundle(runs_dir: Path, out_path: Path) -> tuple[str, list[str], int]:
    """Returns (bundle digest, warnings about runs left out, number of runs bundled)."""
    runs_dir, out_path = Path(runs_dir), Path(out_path)
    if why := not_there(runs_dir):
        raise BundleError(f"store {runs_dir} {why}: pass the --runs-dir of your benches")
    if out_path.is_dir():
        raise BundleError(f"--out {out_path} is a directory: name the bundle file (e.g. {out_path / 'bundle.tar.gz'})")
    trusted, failed, problems = scan_runs(runs_dir, rehash_all=True)  # what it publishes the hashes of must still be there
    warnings = [f"left out {p.path}: {p.status}: {p.message}" for p in problems if p.status != "failed"]
    bundled, refused = _without_links(runs_dir, trusted + failed)
    bundled, orphans = _with_their_artifacts(bundled)
    warnings += refused + orphans
    if not any(r.result.status == "ok" for r in bundled):
        raise BundleError(f"store {runs_dir} holds no trusted ok result to bundle")
    with tempfile.TemporaryDirectory(prefix="llmcbench-bundle-") as tmp:
        root = Path(tmp) / TOP
        for run in bundled:
            for name in RUN_FILES:
                src = runs_dir / run.path / name
                if src.is_file():
                    dst = root / "runs" / run.path / name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dst, follow_symlinks=False)
        # before the report: the staged store lacks the weights, which artifacts.json lists
        write_atomic(root / "artifacts.json", json.dumps(artifacts_record(bundled), indent=2, sort_keys=True) + "\n")
        write_store_report(root / "runs", root / "report")
        staged = _staged_runs(root / "runs")
        write_atomic(root / "environment.json", json.dumps(environment_record(staged, bundler=True), indent=2, sort_keys=True) + "\n")
        write_atomic(root / "reproduce.sh", reproduce_script(staged))
        manifest = "".join(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n"
                           for p in sorted(root.rglob("*")) if p.is_file())
        write_atomic(root / MANIFEST, manifest)
        write_atomic(out_path, _targz(root))
        out_path.chmod(0o644)
    return hashlib.sha256(manifest.encode()).hexdigest(), warnings, len(bundled)


def _without_links(runs_dir: Path, runs: list[StoredRun]) -> tuple[list[StoredRun], list[str]]:
    """The runs none of whose bundled files is reached through a symbolic link or lies outside
    the store, and a warning for each other run (left out whole: a record swapped for a link
    is not the run's own)."""
    store = runs_dir.resolve()
    kept, warnings = [], []
    for run in runs:
        bad = [name for name in RUN_FILES if _linked(runs_dir, PurePosixPath(run.path) / name, store)]
        if bad:
            warnings.append(f"left out {run.path}: untrusted: {', '.join(bad)}: a symbolic link or outside the store "
                            "(a bundle never follows one)")
        else:
            kept.append(run)
    return kept, warnings


def _linked(runs_dir: Path, rel: PurePosixPath, store: Path) -> bool:
    """Whether any part of `rel` under the store is a symbolic link, or it resolves outside the store."""
    path = runs_dir
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            return True
    return path.exists() and not path.resolve().is_relative_to(store)


def _with_their_artifacts(runs: list[StoredRun]) -> tuple[list[StoredRun], list[str]]:
    """The runs whose evaluated artifact (if any) is a compress run among them, and a warning
    for each other: `verify` rejects an evaluation of an artifact the bundle does not hold."""
    compressed = {r.result.job_hash for r in runs if r.job.kind == "compress"}
    kept, warnings = [], []
    for r in runs:
        artifact = r.job.model.identity.removeprefix("artifact:")
        if r.job.model.source == "artifact" and artifact not in compressed:
            warnings.append(f"left out {r.path}: evaluates artifact {artifact[:12]}, whose compress run is not bundled")
        else:
            kept.append(r)
    return kept, warnings


def _staged_runs(runs_root: Path) -> list[StoredRun]:
    trusted, failed, _problems = scan_runs(runs_root)
    return sorted(trusted + failed, key=lambda r: r.path)


def _targz(root: Path) -> bytes:
    """A reproducible tar.gz: sorted entries, fixed owner, mode and times."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(root.rglob("*")):
            if not p.is_file():
                continue
            info = tarfile.TarInfo(f"{TOP}/{p.relative_to(root).as_posix()}")
            data = p.read_bytes()
            info.size, info.mtime, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0, 0, "", ""
            info.mode = 0o755 if p.name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def environment_record(runs: list[StoredRun], bundler: bool = False) -> dict:
    """What ran each job (library versions, runner, image and digest) and every image digest."""
    record: dict = {"runs": {}, "images": {}}
    for r in runs:
        p = r.result.provenance
        record["runs"][f"runs/{r.path}"] = {
            "environment": r.result.environment.model_dump(mode="json"),
            "runner": p.runner, "image": p.image, "image_digest": p.image_digest,
            "upstream_repo": p.upstream_repo, "upstream_commit": p.upstream_commit,
        }
        if p.image:
            record["images"][p.image] = p.image_digest
    if bundler:
        record["bundled_by"] = {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
                                "llmcbench": generator()}
    return record


def artifacts_record(runs: list[StoredRun]) -> dict[str, str]:
    """The outputs each result recorded that the bundle does not carry (model weights): path -> sha256."""
    return {f"runs/{r.path}/{rel}": digest for r in runs for rel, digest in sorted(r.result.output_sha256.items())
            if rel not in RUN_FILES}


def reproduce_script(runs: list[StoredRun]) -> str:
    """One `llmcbench bench` line per cell, read from its compress job (and the tracks its
    evaluation ran); the dense baseline is part of each bench. An evaluation no bench line
    makes (`llmcbench eval` of a model alone: a dense one on other tracks, or a compressed dir
    from elsewhere) gets its own `llmcbench eval` line."""
    lines = [
        "#!/usr/bin/env bash",
        "# Recreate every cell of this bundle, then its report. Derived from the bundle's job records",
        "# by `llmcbench bundle`; `llmcbench verify` re-derives it. A job's hash also covers the",
        "# environment that ran it (library versions and harness source for the local runner, the",
        "# image digest for docker): elsewhere the same commands make new runs, to compare with",
        "# environment.json and the bundled report.",
        "set -euo pipefail",
        "",
    ]
    seen: set[str] = set()
    covered: list[tuple[str, str, str, set[int]]] = []  # (model identity, profile, device, tracks) of each bench line
    compress = [r for r in runs if r.job.kind == "compress"]
    evals = [r for r in runs if r.job.kind in ("eval", "deploy")]
    for r in compress:
        job = r.job
        ev = [e for e in evals if e.job.model.identity == f"artifact:{r.result.job_hash}"]
        tracks = sorted({3} | {t for e in ev for t in (e.job.evaluation.tracks if e.job.evaluation else [5])})
        args = ["llmcbench", "bench", "--method", job.method]
        if job.preset:
            args += ["--preset", job.preset]
        model_args, comment = _model_args(r)
        args += model_args
        if "sparsity" in job.params:
            args += ["--sparsity", repr(float(job.params["sparsity"]))]
        args += ["--tracks", ",".join(map(str, tracks)), "--profile", job.profile, "--engine", job.engine,
                 "--runner", r.result.provenance.runner, "--device", job.device, "--runs-dir", "runs"]
        offline = (job.calibration and job.calibration.source == "local") or any(
            e.job.evaluation and e.job.evaluation.data_source == "local" for e in ev)
        covered.append((job.model.identity, job.profile, job.device, set(tracks)))
        _add_command(lines, seen, comment, args, offline)
    alone: dict[tuple, tuple[StoredRun, set[int], set[str], bool]] = {}
    for e in evals:
        job = e.job
        if job.model.source == "artifact":
            continue
        tracks = set(job.evaluation.tracks) if job.evaluation else {5}
        if job.method == "dense" and any(job.model.identity == ident and job.profile == profile and job.device == device
                                         and tracks <= bench_tracks for ident, profile, device, bench_tracks in covered):
            continue  # a bench line above makes it: its dense baseline
        key = (job.model.identity, job.method, job.preset, job.profile, e.result.provenance.runner, job.device)
        _, had, backends, offline = alone.get(key, (e, set(), set(), False))
        alone[key] = (e, had | tracks, backends | ({job.deploy.backend} if job.deploy else set()),
                      offline or bool(job.evaluation and job.evaluation.data_source == "local"))
    for e, tracks, backends, offline in alone.values():
        job = e.job
        model_args, comment = _model_args(e, {r.path for r in compress})
        args = ["llmcbench", "eval", *model_args, "--tracks", ",".join(map(str, sorted(tracks)))]
        args += ["--backend", ",".join(sorted(backends))] if backends else []
        args += ["--profile", job.profile, "--runner", e.result.provenance.runner, "--device", job.device, "--runs-dir", "runs"]
        if job.method != "dense":
            comment.append(f"#   a {' '.join(filter(None, (job.method, job.preset)))} model dir evaluated alone: "
                           "its compression.json says how")
        _add_command(lines, seen, comment, args, offline)
    lines += ["llmcbench report runs -o runs/report", ""]
    return "\n".join(lines)


def _model_args(r: StoredRun, store_runs: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """A job's --model (nothing for the embedded default) and the comment lines that pin it.
    `store_runs`: the bundle's compress runs (cell/hash), whose artifacts a path may name."""
    model = r.job.model
    comment = [f"# {r.path}: {model.name} ({model.identity})"]
    if model.source == "hub":
        comment.append(f"#   hub revision {model.revision or model.identity.split('@')[-1]}")
        return ["--model", model.identity.removeprefix("hub:").split("@", 1)[0]], comment
    if model.source == "local":
        path = PurePosixPath(model.path or model.name)
        if path.name == "model" and path.parent.as_posix().endswith(tuple(f"/{p}" for p in store_runs)):
            # a compress run's artifact in this store: where the bench line above makes it again
            comment.append(f"#   the model of compress run {path.parent.name[:12]}: the bench line above makes it there when it "
                           "reproduces that hash; elsewhere pass its new run's model/")
            return ["--model", f"runs/{path.parent.parent.name}/{path.parent.name}/model"], comment
        comment.append("#   local model dir: pass a dir with the same content (identity above)")
        return ["--model", model.path or model.name], comment
    return [], comment


def _add_command(lines: list[str], seen: set[str], comment: list[str], args: list[str], offline: bool) -> None:
    command = ("HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 " if offline else "") + shlex.join(args)
    if command not in seen:
        seen.add(command)
        lines += comment + [command, ""]


# ---------------------------------------------------------------- verify


def verify_bundle(bundle: Path, expect_digest: str | None = None) -> tuple[list[str], dict]:
    """Every problem found, one line each naming the file; and a summary of what was checked."""
    bundle = Path(bundle)
    if why := not_there(bundle, "file"):
        raise BundleError(f"{bundle} {why}: pass the .tar.gz that `llmcbench bundle` wrote")
    with tempfile.TemporaryDirectory(prefix="llmcbench-verify-") as tmp:
        problems = _extract(bundle, Path(tmp))
        root = Path(tmp) / TOP
        if not root.is_dir():
            raise BundleError(f"{bundle}: not an llmcbench bundle (no {TOP}/ folder)")
        summary: dict = {"files": 0, "results": 0, "oms": 0, "digest": None}
        problems += _check_manifest(root, summary, expect_digest)
        problems += _check_runs(root, summary)
        problems += _check_derived(root, summary)
        problems += _check_present(root, problems)
    return [" ".join(p.splitlines()) for p in problems], summary


def _extract(bundle: Path, dest: Path) -> list[str]:
    """Extract regular files only, refusing absolute paths, `..`, links and devices."""
    problems = []
    try:
        with tarfile.open(bundle, "r:*") as tar:
            for m in tar.getmembers():
                parts = PurePosixPath(m.name).parts
                if m.name.startswith("/") or ".." in parts or not parts or parts[0] != TOP:
                    problems.append(f"{m.name}: unsafe path in the archive, not extracted")
                    continue
                if m.isdir():
                    continue
                if not m.isfile():
                    problems.append(f"{PurePosixPath(*parts[1:])}: not a regular file (link or device), not extracted")
                    continue
                target = dest.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as e:
        raise BundleError(f"{bundle}: not a readable tar.gz ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return problems


def _check_manifest(root: Path, summary: dict, expect_digest: str | None) -> list[str]:
    path = root / MANIFEST
    if not path.is_file():
        return [f"{MANIFEST}: missing: no file of this bundle can be checked against its hash"]
    problems, listed = [], {}
    text = path.read_text(errors="replace")
    summary["digest"] = hashlib.sha256(text.encode()).hexdigest()
    if expect_digest and summary["digest"] != expect_digest.strip().lower():
        problems.append(f"{MANIFEST}: bundle digest {summary['digest']} is not the expected {expect_digest.strip()}")
    for n, line in enumerate(text.splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            problems.append(f"{MANIFEST}:{n}: malformed line")
            continue
        listed[name] = digest
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    for name, digest in sorted(listed.items()):
        if name not in present:
            problems.append(f"{name}: listed in {MANIFEST} but missing from the bundle (removed)")
        elif sha256_file(root / name) != digest:
            problems.append(f"{name}: sha256 does not match {MANIFEST} (modified)")
    problems += [f"{name}: not listed in {MANIFEST} (added)" for name in sorted(present - set(listed))]
    summary["files"] = len(listed)
    return problems


def _check_runs(root: Path, summary: dict) -> list[str]:
    """Every run's own records: seals, the hashes its result recorded, artifact links."""
    problems = []
    runs_root = root / "runs"
    dirs = sorted({p.parent for pattern in ("*/*/job.json", "*/*/result.json") for p in runs_root.glob(pattern)})
    hashes = {d.name: d for d in dirs}
    artifacts = _read_json(root / "artifacts.json", problems) or {}
    for d in dirs:
        rel = f"runs/{d.relative_to(runs_root).as_posix()}"
        try:
            job = read_record(d / "job.json", Job)
            result = read_record(d / "result.json", Result)
        except ContractError as e:
            problems.append(str(e).replace(f"{root}/", ""))
            continue
        summary["results"] += 1
        if result.job_hash != d.name:
            problems.append(f"{rel}/result.json: belongs to job {result.job_hash[:12]}, not to this run dir (swapped)")
        if result.input_sha256.get("job.json") and sha256_file(d / "job.json") != result.input_sha256["job.json"]:
            problems.append(f"{rel}/job.json: does not match the sha256 its result.json recorded (swapped or modified)")
        for out_rel, digest in result.output_sha256.items():
            f = d / out_rel
            if out_rel in RUN_FILES:
                if not f.is_file():
                    problems.append(f"{rel}/{out_rel}: recorded by its result.json but missing from the bundle")
                elif sha256_file(f) != digest:
                    problems.append(f"{rel}/{out_rel}: does not match the sha256 its result.json recorded (swapped or modified)")
            elif artifacts.get(f"{rel}/{out_rel}") != digest:
                problems.append(f"artifacts.json: {rel}/{out_rel} is not listed with the sha256 its result.json recorded")
        judge = judgement_problem(d, d.name)
        if judge:
            problems.append(f"{rel}/{judge}")
        if job.model.source == "artifact":
            source = hashes.get(job.model.identity.removeprefix("artifact:"))
            if source is None or source.parent != d.parent:
                problems.append(f"{rel}/job.json: evaluates artifact {job.model.identity.removeprefix('artifact:')[:12]}, "
                                "which is not a compress run of the same cell in this bundle")
    return problems


def _read_json(path: Path, problems: list[str]):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        problems.append(f"{path.parent.name}/{path.name}: missing" if path.parent.name != TOP else f"{path.name}: missing")
    except (OSError, ValueError) as e:
        problems.append(f"{path.name}: not valid JSON ({type(e).__name__})")
    return None


def _check_derived(root: Path, summary: dict) -> list[str]:
    """Re-derive the report, the reproduce script and the records from the raw results."""
    problems = []
    try:
        derived = build_store_report(root / "runs")
    except Exception as e:  # noqa: BLE001 - anything the raw results break is a finding
        return problems + [f"runs/: the report cannot be re-derived from the raw results ({type(e).__name__}: {e})"]
    try:
        bundled = StoreReport.model_validate_json((root / "report" / "report.json").read_text())
    except FileNotFoundError:
        problems.append("report/report.json: missing")
        bundled = None
    except ValueError as e:
        problems.append(f"report/report.json: not a valid report ({str(e).splitlines()[0]})")
        bundled = None
    if bundled is not None:
        mine, theirs = _oms(derived), _oms(bundled)
        summary["oms"] = len(mine)
        for key in sorted(set(mine) | set(theirs)):
            if key not in theirs:
                problems.append(f"report/report.json: lacks {key} = {mine[key]!r}, which the raw results score")
            elif key not in mine:
                problems.append(f"report/report.json: states {key} = {theirs[key]!r}, which the raw results do not give")
            elif mine[key] != theirs[key]:
                problems.append(f"report/report.json: {key} is {theirs[key]!r}, re-scored from the raw results {mine[key]!r}")
        if mine == theirs:
            a, b = derived.model_dump(mode="json", exclude={"generator"}), bundled.model_dump(mode="json", exclude={"generator"})
            for where, x, y in _diff(b, a)[:5]:
                problems.append(f"report/report.json: {where} is {x!r}, the raw results give {y!r}")
        md = root / "report" / "report.md"
        if md.is_file() and md.read_text() != render_markdown(derived):
            problems.append("report/report.md: does not match the report re-derived from the raw results (edited, or built by another llmcbench)")
        page = root / "report" / "report.html"
        if page.is_file() and _without_images(page.read_text()) != _without_images(render_html(derived, "../runs/")):
            problems.append("report/report.html: its text does not match the report re-derived from the raw results (edited, or built by another llmcbench)")
    staged = _staged_runs(root / "runs")
    expected = {"reproduce.sh": reproduce_script(staged),
                "artifacts.json": json.dumps(artifacts_record(staged), indent=2, sort_keys=True) + "\n"}
    for name, text in expected.items():
        path = root / name
        if path.is_file() and path.read_text() != text:
            problems.append(f"{name}: does not match what the bundle's job records give (edited)")
    env = _read_json(root / "environment.json", []) if (root / "environment.json").is_file() else None
    if env is not None:
        want = environment_record(staged)
        if {k: env.get(k) for k in want} != want:
            problems.append("environment.json: does not match the environments and images the bundle's results record (edited)")
    return problems


def _check_present(root: Path, problems: list[str]) -> list[str]:
    """The bundle's own files, where no other check has named them already."""
    out = []
    for name in REPORT_FILES + BUNDLE_FILES:
        rel = f"report/{name}" if name in REPORT_FILES else name
        if not (root / rel).is_file() and not any(p.startswith(rel + ":") for p in problems):
            out.append(f"{rel}: missing")
    return out


def _without_images(page: str) -> str:
    """The page minus its inline PNGs, whose bytes depend on the matplotlib build; every number stays."""
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "data:image/png;base64,", page)


def _oms(report: StoreReport) -> dict[str, float]:
    return {f"{o.om} of {c.method} {c.setting} on {g.model} ({g.profile})": o.value
            for g in report.groups for c in g.cells for o in c.oms}


def _diff(a, b, where: str = "") -> list[tuple[str, object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{where}[{i}]")]
    return [] if a == b else [(where, a, b)]
