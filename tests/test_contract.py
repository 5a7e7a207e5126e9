"""The contract: records round-trip, job hashes are stable across processes, tampering is caught."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmcbench.driver.contract import (
    Calibration, Compression, ContractError, DeploySettings, EvalSettings, Job, LayerCompression, ModelRef, Result, read_record,
)
from llmcbench.driver.fsio import sha256_tree, write_atomic, write_record


def _job(**kw) -> Job:
    base = dict(kind="compress", method="wanda", preset="2:4", params={"sparsity": 0.5, "pattern": "n:m", "n": 2, "m": 4},
                model=ModelRef(name="m", source="local", identity="sha256:abc", path="/somewhere/m"),
                calibration=Calibration(nsamples=16, seqlen=128, seed=0))
    base.update(kw)
    return Job(**base)


def test_job_round_trip(tmp_path):
    job = _job(evaluation=EvalSettings(tracks=[1, 4], tasks=["arc_e"], limit=5))
    write_record(tmp_path / "job.json", job)
    back = read_record(tmp_path / "job.json", Job)
    assert back == job
    assert back.job_hash("env") == job.job_hash("env")


def test_compression_round_trip(tmp_path):
    c = Compression(method="wanda", preset="2:4", sparsity_pattern="n:m", n_m=(2, 4), target_sparsity=0.5,
                    measured_sparsity=0.5, layers={"model.layers.0.mlp.up_proj": LayerCompression(sparsity=0.5, shape=[128, 64])})
    write_record(tmp_path / "compression.json", c)
    assert read_record(tmp_path / "compression.json", Compression) == c


def test_job_hash_ignores_paths_but_not_content():
    a = _job()
    moved = _job(model=ModelRef(name="m", source="local", identity="sha256:abc", path="/elsewhere/m"))
    other = _job(model=ModelRef(name="m", source="local", identity="sha256:abd", path="/somewhere/m"))
    assert a.job_hash("env") == moved.job_hash("env")
    assert a.job_hash("env") != other.job_hash("env")
    assert a.job_hash("env") != a.job_hash("other-env")
    assert a.job_hash("env") != _job(preset="4:8").job_hash("env")


def test_a_job_keeps_the_hash_earlier_versions_gave_it():
    """Stores written before `overrides` existed stay cache hits: the hash of `_job()` as the
    contract computed it then. A param set over the preset is part of what a job computes."""
    assert _job().job_hash("env") == "3a3177999494fd4c73682839cd30a94ef000f4749c555d9ea260634f4d607e3e"
    over = _job(params={"sparsity": 0.6, "pattern": "n:m", "n": 2, "m": 4}, overrides={"sparsity": 0.6})
    assert over.job_hash("env") != _job(params=over.params).job_hash("env")
    assert (_job().setting(), over.setting(), _job().setting(also=["n", "m"])) == ("2:4", "2:4 (sparsity=0.6)", "2:4 (m=4, n=2)")


def test_a_deploy_job_keeps_its_hash_and_compile_changes_it():
    """`deploy.compile` came later: an eager deploy job hashes as the contract did before it
    (the figure pinned from the version without the field); a compiled one is another job."""
    def deploy(**kw):
        return Job(kind="deploy", method="gptq", preset="w4a16-g128",
                   model=ModelRef(name="model", source="artifact", identity="artifact:abc", path="/x"),
                   deploy=DeploySettings(new_tokens=32, repeats=3, batch_sizes=[1, 4], **kw))

    assert deploy().job_hash("env") == "abf5194be3b1d8040e355b3aafecb50d086149932977a5bc53e230e3d698a37a"
    assert deploy(compile=False).job_hash("env") == deploy().job_hash("env")
    assert deploy(compile=True).job_hash("env") != deploy().job_hash("env")
    assert deploy(compile=True).identity_dict()["deploy"]["compile"] is True


def test_job_hash_stable_across_processes():
    code = (
        "from llmcbench.driver.contract import *\n"
        "j = Job(kind='compress', method='wanda', preset='2:4', params={'n': 2, 'm': 4, 'sparsity': 0.5, 'pattern': 'n:m'},"
        " model=ModelRef(name='m', source='local', identity='sha256:abc', path='/x'),"
        " calibration=Calibration(nsamples=16, seqlen=128, seed=0))\n"
        "print(j.job_hash('env'))\n"
    )
    hashes = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout.strip() for seed in (1, 2, 3)}
    assert len(hashes) == 1
    # params given in another key order hash the same (canonical JSON)
    assert hashes == {_job(params={"m": 4, "n": 2, "pattern": "n:m", "sparsity": 0.5}).job_hash("env")}


def _result(**kw) -> Result:
    base = dict(job_hash="h", status="ok", started_at="t0", finished_at="t1", wall_s=1.5, metrics={"track1": {"x": 1.0}})
    base.update(kw)
    return Result(**base).sealed()


def test_result_seal_detects_edits(tmp_path):
    path = tmp_path / "result.json"
    write_record(path, _result())
    assert read_record(path, Result).metrics == {"track1": {"x": 1.0}}
    data = json.loads(path.read_text())
    data["metrics"]["track1"]["x"] = 2.0
    path.write_text(json.dumps(data))
    with pytest.raises(ContractError, match="checksum mismatch"):
        read_record(path, Result)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"schema_version": "99"}', "schema version 99"),
    ('{"schema_version": "1", "status": "ok"}', "invalid Result"),
])
def test_result_corruption_is_one_line(tmp_path, content, message):
    path = tmp_path / "result.json"
    path.write_text(content)
    with pytest.raises(ContractError, match=message) as info:
        read_record(path, Result)
    assert "\n" not in str(info.value)


def test_unknown_fields_and_bad_values_are_rejected():
    with pytest.raises(ValueError):
        Job.model_validate({**_job().model_dump(), "surprise": 1})
    with pytest.raises(ValueError):
        Calibration(nsamples=0, seqlen=128)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    write_atomic(tmp_path / "a" / "f.txt", "one")
    write_atomic(tmp_path / "a" / "f.txt", "two")
    assert (tmp_path / "a" / "f.txt").read_text() == "two"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.txt"]
    assert set(sha256_tree(tmp_path)) == {"a/f.txt"}
    # the mode a plain write gives under this umask, not mkstemp's 0600: a shared store's group reads its results
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "a" / "f.txt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777 != 0o600


@pytest.mark.parametrize("line, version", [
    # the open kernel module (a lent H200, 2026-12-04): read by position this gave "for"
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  "
     "(dvs-builder@U16-I2-C03-12-4)  Thu Oct 30 05:19:27 UTC 2025", "580.159.04"),
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023", "535.104.05"),
    ("NVRM version: NVIDIA UNIX Kernel Module  470.57.02", "470.57.02"),
])
def test_driver_version_is_the_number_in_the_kernel_module_line(tmp_path, line, version):
    from llmcbench.driver.environment import _nvidia_driver, parse_driver_version

    assert parse_driver_version(line) == version
    proc = tmp_path / "version"
    proc.write_text(line + "\nGCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n")
    assert _nvidia_driver(proc) == version
    assert _nvidia_driver(tmp_path / "absent") is None


def test_a_result_sealed_by_an_earlier_release_still_verifies():
    """Stores and bundles outlive releases. `tests/fixtures/results/` holds a real result.json (a
    reference Wanda compress job on the tiny LLaMA, written by jobrun at schema 1): it must still
    pass its seal and read back with exactly the keys it was written with. A field added to Result,
    Environment or Provenance appears in every dump, None or not, so the seal of every stored result
    would fail: such data goes under `metrics` (free-form), or the record keeps its old dump."""
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "results" / "wanda-compress-schema1.result.json"
    result = read_record(path, Result)
    assert result.status == "ok" and result.schema_version == "1" and result.metrics["track3"]["compress_s"] > 0
    assert json.loads(result.model_dump_json()) == json.loads(path.read_text())
