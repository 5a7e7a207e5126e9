"""The upstream engine's plumbing: a compress job on `--engine upstream` through the real job
process (`python -m llmcbench.driver.jobrun`), with the shim, staging, timing, conversion and
failure classes, against a stand-in upstream checkout.

CI cannot clone GitHub, so the checkout is `tests/fixtures/upstream/wanda`: a CPU stand-in
with locuslab/wanda's command line, module layout, hub loads and output format (its README
says exactly what it is). The real adapter (`methods/wanda/upstream.py`) drives it; only the
code behind upstream's interface differs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmcbench.driver.contract import Compression, Result, read_record
from llmcbench.driver.fsio import sha256_file, write_record
from llmcbench.driver.registry import get_method
from llmcbench.methods._upstream.testing import job_for

FIXTURE = Path(__file__).parent / "fixtures" / "upstream" / "wanda"


@pytest.fixture(scope="module")
def upstream_root(tmp_path_factory) -> Path:
    """A copy of the stand-in checkout, marked as being at method.toml's pinned commit."""
    root = tmp_path_factory.mktemp("upstream")
    shutil.copytree(FIXTURE, root / "wanda")
    (root / "wanda" / ".llmcbench-commit").write_text(get_method("wanda").upstream.commit + "\n")
    return root


def shim_events(path: Path) -> list[dict]:
    """The shim's events after its first, which names the interpreter (test_shim_takes_the_host_rss_...)."""
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert events[0]["event"] == "environment", events[0]
    return events[1:]


def run_job(tmp_path: Path, model_dir: Path, data_dir: Path, upstream_root: Path | None, *, preset: str = "2:4",
            mode: str = "", time_limit_s: int = 600) -> tuple[Result, Path, float]:
    """One compress job in the volume-contract layout the runners give it; returns its result."""
    job = job_for("wanda", preset, profile="quick", nsamples=4, seqlen=64, seed=0, device="cpu", model_name="tiny")
    job.limits.time_limit_s = time_limit_s
    for d in ("job", "models", "out"):
        (tmp_path / d).mkdir(parents=True)
    write_record(tmp_path / "job" / "job.json", job)
    os.symlink(model_dir, tmp_path / "models" / "tiny")
    os.symlink(data_dir, tmp_path / "data")
    env = {**os.environ, "LLMCBENCH_FAKE_UPSTREAM": mode, "OMP_NUM_THREADS": "1"}
    env.pop("LLMCBENCH_UPSTREAM_DIR", None)
    if upstream_root is not None:
        env["LLMCBENCH_UPSTREAM_DIR"] = str(upstream_root)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llmcbench.driver.jobrun", "--job", str(tmp_path / "job" / "job.json"),
                           "--models", str(tmp_path / "models"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=900)
    wall = time.perf_counter() - t0
    assert (tmp_path / "out" / "result.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = read_record(tmp_path / "out" / "result.json", Result)
    assert (proc.returncode == 0) == (result.status == "ok"), proc.stdout[-2000:]
    return result, tmp_path / "out", wall


def test_upstream_job_produces_a_faithful_artifact(tmp_path, tiny_llama_dir, data_dir, upstream_root):
    """2:4 through the upstream engine: the artifact is 2:4 in every block linear, loads in
    transformers, evaluates with our code, and result.json keeps upstream's own perplexity,
    the hooked compression time, the commands and upstream's log."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcbench.methods._engine.testing import block_linears
    from llmcbench.tracks.performance import wikitext2_ppl

    result, out, wall = run_job(tmp_path, tiny_llama_dir, data_dir, upstream_root, preset="2:4")
    assert result.status == "ok", result.error
    declaration = read_record(out / "model" / "compression.json", Compression)
    assert (declaration.engine, declaration.method, declaration.preset) == ("upstream", "wanda", "2:4")
    assert declaration.sparsity_pattern == "n:m" and tuple(declaration.n_m) == (2, 4)
    assert declaration.measured_sparsity == pytest.approx(0.5)

    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    linears = block_linears(model)
    assert linears
    for name, linear in linears.items():
        zeros_per_group = (linear.weight.reshape(linear.weight.shape[0], -1, 4) == 0).sum(-1)
        assert torch.equal(zeros_per_group, torch.full_like(zeros_per_group, 2)), name
    ours = wikitext2_ppl(model, AutoTokenizer.from_pretrained(out / "model"), data_dir=data_dir, seqlen=128, max_windows=2)
    assert 1 < ours["ppl"] < float("inf")

    upstream = result.metrics["upstream"]
    assert 1 < upstream["reported"]["wikitext_ppl"] < float("inf")  # parsed from `wikitext perplexity <x>`
    assert upstream["commit"] == get_method("wanda").upstream.commit
    assert upstream["cuda_mapped_to_cpu"] is True  # the stand-in hard-codes cuda:0, as upstream does
    assert upstream["fp16_as_fp32_on_cpu"] is True  # CPU jobs run upstream's fp16 as fp32 (the shim's docstring says why)
    assert "--sparsity_type 2:4" in upstream["commands"][0]
    # the input model (transformers 5's format) went to upstream as a copy its 4.x stack reads
    # (test_upstream_model_staging.py); the artifact keeps the input's own tokenizer files
    assert f"--model {out / '.upstream-work' / 'input' / tiny_llama_dir.name} " in upstream["commands"][0]
    assert any(c.startswith("tokenizer.json: ") and "merges" in c for c in upstream["staged_model"]), upstream["staged_model"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / "model" / name).read_bytes() == (tiny_llama_dir / name).read_bytes(), name
    track3 = result.metrics["track3"]
    assert track3["timed"] == ["prune: lib.prune:prune_wanda"]
    # a CPU job has no GPU figures
    assert track3["compress_peak_gpu_bytes"] is None and result.peak_gpu_bytes is None and track3["compress_gpu_used_nvml_bytes"] is None
    # its host RSS is the timed function's, as the reference engine's is its compression step's
    events = [json.loads(line) for line in (out / "upstream" / "prune.events.jsonl").read_text().splitlines()]
    [timed] = [e for e in events if e["event"] == "timed"]
    assert track3["compress_peak_rss_scope"] == "compress_step" and track3["compress_peak_rss_bytes"] == timed["peak_rss_bytes"] > 0
    # what ran: upstream's own interpreter (here the harness's, the stand-in's default) and the checkout's commit
    import platform

    ran_on = upstream["environment"]
    assert ran_on["python"] == platform.python_version() and ran_on["torch"] == torch.__version__ and ran_on["cuda"] == torch.version.cuda
    assert result.provenance.upstream_commit == get_method("wanda").upstream.commit
    assert 0 < result.compress_s < upstream["step_wall_s"]["prune"] < wall  # loading and upstream's eval excluded
    assert result.input_sha256["calibration"] == sha256_file(data_dir / "hf" / "allenai__c4" / "en" / "train.jsonl")
    assert any(k.startswith("model/") for k in result.output_sha256)

    log = (out / "upstream" / "prune.log").read_text()
    assert "pruning starts" in log and "wikitext perplexity" in log
    # quick profile: upstream's own evaluation was served the quick text, not the whole split
    own = upstream["own_eval_text"]
    assert own["cut"] and own["tokens"] >= own["tokens_wanted"] == 4096 and own["rows"] < own["rows_total"]
    assert f"wikitext test rows {own['rows']}\n" in log
    served = [e for e in events if e["event"] == "dataset"]
    kinds = [e["event"] for e in events]
    assert kinds.index("vml_warm_up") < kinds.index("dataset") and events[kinds.index("vml_warm_up")]["ops"] >= 8
    assert {tuple(e["requested"][:2]) for e in served} >= {("allenai/c4", "allenai--c4"), ("wikitext", "wikitext-2-raw-v1")}
    assert not (out / ".upstream-work").exists() and not (out / ".model.partial").exists()


CUDA_SCRIPT = """
import torch
from torch import nn

dev = torch.device("cuda:0")
lin = nn.Linear(8, 4).cuda()
x = torch.randn(2, 8, device=dev)
y = torch.zeros(2, 4).to("cuda")
with torch.cuda.amp.autocast():
    mixed = lin(x.to(dev))
out = mixed.float() + y.cuda() + torch.ones(4).to(dev, torch.float32)
torch.cuda.synchronize()
torch.cuda.empty_cache()
# as on a GPU, a move is a new tensor: a Parameter held as a buffer becomes a plain one (OmniQuant reassigns it)
holder = nn.Module()
holder.register_buffer("w", nn.Parameter(torch.ones(2), requires_grad=False))
holder.to(dev)
t = torch.ones(2)
print("moves", type(holder.w).__name__, t.to(dev) is t, t.cuda() is t, t.to("cpu") is t)
print("devices", lin.weight.device, x.device, y.device, out.device, "autocast", mixed.dtype,
      "peak", torch.cuda.max_memory_allocated())
"""


def test_cuda_to_cpu_hook_runs_cuda_code_on_the_cpu(tmp_path):
    """The repositories hard-code `cuda:0`; on a CPU job the shim's `cuda_to_cpu` hook runs
    such code on the CPU: factories' `device=`, `.to("cuda")`, `.cuda()` of tensors and
    modules, `torch.cuda` housekeeping, and CUDA fp16 autocast (as CPU autocast, same dtype,
    where fp16 is kept: `half_to_float: false`). Without the hook, a CPU-only torch stops at the
    first CUDA call."""
    from llmcbench.methods._upstream.adapter import SHIM

    (tmp_path / "script.py").write_text(CUDA_SCRIPT)
    for on in (True, False):
        (tmp_path / f"hooks-{on}.json").write_text(json.dumps({"script": str(tmp_path / "script.py"), "cuda_to_cpu": on,
                                                                 "half_to_float": False,
                                                                 "events": str(tmp_path / f"events-{on}.jsonl")}))
    run = [subprocess.run([sys.executable, str(SHIM), "--hooks", str(tmp_path / f"hooks-{on}.json")], capture_output=True,
                          text=True, timeout=300) for on in (True, False)]
    assert run[0].returncode == 0, run[0].stderr[-2000:]
    assert "devices cpu cpu cpu cpu autocast torch.float16 peak 0" in run[0].stdout
    assert "moves Tensor False False True" in run[0].stdout, run[0].stdout
    assert shim_events(tmp_path / "events-True.jsonl")[0]["event"] == "cuda_to_cpu"
    if not torch.cuda.is_available():
        assert run[1].returncode != 0 and "CUDA" in run[1].stderr, run[1].stdout[-1000:]


PEAK_SCRIPT = """
import torch

MIB = 1 << 20


def inner():
    kept = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    return kept.numel()


def work():
    scratch = torch.empty(256 * MIB, dtype=torch.uint8, device="cuda")
    del scratch
    torch.cuda.empty_cache()
    return inner()


if __name__ == "__main__":
    loaded = torch.empty(512 * MIB, dtype=torch.uint8, device="cuda")  # the model's load: before the window
    del loaded
    torch.cuda.empty_cache()
    work()
"""


RSS_SCRIPT = """
MB = 1 << 20


def inner():
    kept = b"x" * (16 * MB)
    return len(kept)


def work():
    scratch = b"x" * (512 * MB)
    del scratch
    return inner()


if __name__ == "__main__":
    loaded = b"x" * (1024 * MB)  # the model's load: before the window
    del loaded
    work()
"""


def test_shim_takes_the_host_rss_peak_of_the_timed_functions_alone(tmp_path):
    """Track 3's host memory for the upstream engine, as the reference engine measures its own: the
    peak RSS while the timed functions ran, not the 1 GiB freed before them (the load), but the
    512 MiB scratch freed before a nested timed call, whose start must not reset the outer peak.
    (The shim's own imports, `datasets` among them, hold about 180 MiB: the sizes dwarf that.)"""
    from llmcbench.methods._upstream.adapter import SHIM

    (tmp_path / "script.py").write_text(RSS_SCRIPT)
    (tmp_path / "hooks.json").write_text(json.dumps({"script": str(tmp_path / "script.py"), "time": ["__main__:work", "__main__:inner"],
                                                     "events": str(tmp_path / "events.jsonl")}))
    proc = subprocess.run([sys.executable, str(SHIM), "--hooks", str(tmp_path / "hooks.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    peaks = {e["target"]: e["peak_rss_bytes"] for e in events if e["event"] == "timed"}
    mb = 1 << 20
    assert 512 * mb <= peaks["__main__:inner"] and 512 * mb <= peaks["__main__:work"] < 1024 * mb, peaks
    # the inner call's time is inside the outer one's: the job counts it once
    assert [e.get("nested", False) for e in events if e["event"] == "timed"] == [True, False]
    # the first event names the interpreter that ran the script
    assert events[0]["event"] == "environment" and events[0]["torch"] == torch.__version__


def test_an_upstream_interpreter_of_its_own_enters_the_job_hash(tmp_path, monkeypatch):
    """On the local runner, pointing LLMCBENCH_UPSTREAM_PYTHON at another venv (other library versions)
    is another job: its cached result is not the old venv's. Reference jobs and the harness's own
    interpreter keep their hashes; an interpreter that cannot run is a one-line error at planning."""
    from llmcbench.driver.errors import UserError
    from llmcbench.driver.runners.local import LocalRunner
    from llmcbench.methods._upstream.staging import upstream_interpreter_id

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=120)
    runner, job = LocalRunner(), job_for("wanda", "2:4", device="cpu")
    reference = job.model_copy(update={"engine": "reference"})
    monkeypatch.delenv("LLMCBENCH_UPSTREAM_PYTHON", raising=False)
    base = {j.engine: runner.environment_id(j) for j in (job, reference)}
    assert base["upstream"] == base["reference"]  # upstream's code runs on the harness's interpreter
    monkeypatch.setenv("LLMCBENCH_UPSTREAM_PYTHON", sys.executable)
    assert runner.environment_id(job) == base["upstream"]
    monkeypatch.setenv("LLMCBENCH_UPSTREAM_PYTHON", str(tmp_path / "bare" / "bin" / "python"))
    assert "torch=None" in upstream_interpreter_id()  # a bare venv: no torch of its own
    assert runner.environment_id(job) != base["upstream"] and runner.environment_id(reference) == base["reference"]
    assert job.job_hash(runner.environment_id(job)) != job.job_hash(base["upstream"])
    monkeypatch.setenv("LLMCBENCH_UPSTREAM_PYTHON", str(tmp_path / "no-such-python"))
    with pytest.raises(UserError, match="LLMCBENCH_UPSTREAM_PYTHON=.*no-such-python cannot be run"):
        runner.environment_id(job)


@pytest.mark.gpu
def test_shim_takes_the_gpu_peak_of_the_timed_functions_alone(tmp_path):
    """Track 3 on a GPU for the upstream engine: each timed function's event holds the peak memory the
    process reserved while it ran: not the 512 MiB freed before it (the load), but the 256 MiB
    scratch it freed before calling a nested timed function, whose start must not reset the
    outer peak. The job's figure is the largest of them (methods/_upstream/run.py)."""
    from llmcbench.methods._upstream.adapter import SHIM

    (tmp_path / "script.py").write_text(PEAK_SCRIPT)
    (tmp_path / "hooks.json").write_text(json.dumps({"script": str(tmp_path / "script.py"), "time": ["__main__:work", "__main__:inner"],
                                                     "events": str(tmp_path / "events.jsonl")}))
    proc = subprocess.run([sys.executable, str(SHIM), "--hooks", str(tmp_path / "hooks.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = {e["target"]: e["peak_gpu_bytes"] for e in shim_events(tmp_path / "events.jsonl") if e["event"] == "timed"}
    mib = 1 << 20
    assert 64 * mib <= peaks["__main__:inner"] and 256 * mib <= peaks["__main__:work"] < 512 * mib, peaks


WARM_UP_SCRIPT = """
import sys
print("script starts; llmcbench modules:", sorted(m for m in sys.modules if m.startswith("llmcbench")))
"""


@pytest.mark.parametrize("stack", ["project", "legacy"])
def test_shim_resolves_vml_kernels_before_upstream_runs(tmp_path, stack, request):
    """Under upstream's interpreter the shim loads driver/numerics.py by path (that interpreter has
    no llmcbench) and resolves MKL VML's kernels before the script's first op, as every job process
    does (pytorch#188792). An interpreter without torch (the legacy stack) says so and runs the script."""
    from llmcbench.methods._upstream.adapter import NUMERICS, SHIM

    python = sys.executable if stack == "project" else request.getfixturevalue("legacy_python")
    (tmp_path / "script.py").write_text(WARM_UP_SCRIPT)
    (tmp_path / "hooks.json").write_text(json.dumps({"script": str(tmp_path / "script.py"), "warm_up_vml": str(NUMERICS),
                                                      "events": str(tmp_path / "events.jsonl")}))
    proc = subprocess.run([python, str(SHIM), "--hooks", str(tmp_path / "hooks.json")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (event,) = shim_events(tmp_path / "events.jsonl")
    assert event["event"] == "vml_warm_up"
    out = proc.stdout
    assert out.index('"event": "vml_warm_up"') < out.index("script starts; llmcbench modules: []"), out
    if stack == "project":
        assert event["ops"] >= 8 and "pytorch#188792" in event["why"], event
    else:
        assert event["ops"] == 0 and event["why"].startswith("no torch"), event


HALF_SCRIPT = """
import torch
from torch import nn
torch.set_default_dtype(torch.float16)
built = nn.Linear(8, 4)  # as transformers' from_pretrained(torch_dtype=torch.float16) builds a model
torch.set_default_dtype(torch.float32)
lin = nn.Linear(8, 4).half().cuda()
x = torch.randn(2, 8, dtype=torch.float16, device="cuda")
y = torch.randn(2, 8).to(torch.float16).half().to("cuda", torch.float16).to(dtype=torch.half)
with torch.cuda.amp.autocast():
    z = lin(x) + lin(y) + built(x)
    # torch 2.1 refuses a CPU autocast at float16, even a disabled one (OmniQuant's training loop)
    cpu_autocast = (torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype())
print("dtypes", built.weight.dtype, lin.weight.dtype, x.dtype, y.dtype, z.dtype, "default", torch.get_default_dtype())
@torch.cuda.amp.autocast()
def decorated():
    return lin(x).dtype
print("cpu autocast", *cpu_autocast, "decorated", decorated())
# a module holding an fp16 Parameter as a buffer (OmniQuant's QuantLinear): .float() makes it a plain fp32 tensor
holder = nn.Module()
holder.register_buffer("w", nn.Parameter(torch.ones(2, dtype=torch.float16), requires_grad=False))
holder.float()
print("cast", type(holder.w).__name__, holder.w.dtype)
# an fp16 checkpoint (the hub's LLaMA-2, written before the shim started) reads back as its bytes say
import os, safetensors.torch
read = safetensors.torch.load_file(os.environ["FP16_CHECKPOINT"])["w"]
raw = torch.frombuffer(bytearray(torch.arange(6, dtype=torch.int16).numpy().tobytes()), dtype=torch.float16)
print("checkpoint", read.dtype, tuple(read.shape), read.float().sum().item(), "frombuffer", raw.dtype, raw.numel())
"""


@pytest.mark.parametrize("half_to_float", [None, True, False])
def test_cpu_jobs_run_upstream_fp16_as_fp32(tmp_path, half_to_float):
    """Upstream loads and runs in fp16, which the images' torch 2.1 cannot matmul on the CPU and
    AWQ's torch 2.3 does 6 times slower than fp32: on a CPU job the shim makes every fp16 request
    fp32 (`dtype=`, `.half()`, `.to()`, the default dtype, fp16 autocast), and says so in its
    event. That is the default (None: the driver's hooks say nothing); `half_to_float: false`
    keeps fp16 (this torch has the matmul). Bytes are still read as the dtype they hold: an fp16
    safetensors checkpoint loads (it failed to, as fp32, on an fp16 LLaMA)."""
    from llmcbench.methods._upstream.adapter import SHIM

    from safetensors.torch import save_file

    (tmp_path / "script.py").write_text(HALF_SCRIPT)
    save_file({"w": torch.arange(12, dtype=torch.float16).reshape(3, 4)}, tmp_path / "fp16.safetensors")
    hooks = {"script": str(tmp_path / "script.py"), "cuda_to_cpu": True, "half_to_float": half_to_float,
             "events": str(tmp_path / "events.jsonl")}
    (tmp_path / "hooks.json").write_text(json.dumps(hooks))
    run = subprocess.run([sys.executable, str(SHIM), "--hooks", str(tmp_path / "hooks.json")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "FP16_CHECKPOINT": str(tmp_path / "fp16.safetensors")})
    assert run.returncode == 0, run.stderr[-2000:]
    expected = half_to_float is not False
    event = shim_events(tmp_path / "events.jsonl")[0]
    assert event["event"] == "cuda_to_cpu" and event["half_to_float"] is expected
    dtype = "torch.float32" if expected else "torch.float16"
    assert f"dtypes {dtype} {dtype} {dtype} {dtype} {dtype} default torch.float32" in run.stdout, run.stdout
    # fp16 autocast: off when everything is fp32 (CPU autocast untouched, at its bfloat16 default); else CPU autocast at fp16
    autocast = "False torch.bfloat16" if expected else "True torch.float16"
    assert f"cpu autocast {autocast} decorated {dtype}" in run.stdout, run.stdout
    assert "cast Tensor torch.float32" in run.stdout, run.stdout
    # bytes are read as the dtype they hold, whatever the job makes of fp16 afterwards
    assert "checkpoint torch.float16 (3, 4) 66.0 frombuffer torch.float16 6" in run.stdout, run.stdout


C4_TWICE = """
import datasets, sys
def c4_validation():
    return datasets.load_dataset("allenai/c4", "allenai--c4", data_files={"validation": "v.json.gz"}, split="validation")
print("calibration loads", len(c4_validation()), flush=True)
open(sys.argv[1], "w").write("{}")  # upstream saves its model
c4_validation()  # upstream's C4 evaluation
print("evaluated C4 on the calibration slice")
"""


def test_unused_c4_split_is_served_for_calibration_only(tmp_path, data_dir):
    """A C4 split upstream loads but does not use for calibration (OmniQuant's get_c4 also
    loads validation) is served the staged slice before the model is saved; the same load
    after the save is upstream's C4 evaluation, which must not score the calibration slice as
    C4 validation: the run stops there, cleanly, with the model kept."""
    from llmcbench.methods._upstream.adapter import SHIM
    from llmcbench.methods._upstream.staging import dataset_rules, stage_data

    (tmp_path / "script.py").write_text(C4_TWICE)
    saved = tmp_path / "model" / "config.json"
    saved.parent.mkdir()
    hooks = {"script": str(tmp_path / "script.py"), "argv": [str(saved)], "events": str(tmp_path / "events.jsonl"),
             "outputs": [str(saved)], "datasets": dataset_rules(stage_data(data_dir, offline=True), unused_splits=["c4:validation"])}
    (tmp_path / "hooks.json").write_text(json.dumps(hooks))
    proc = subprocess.run([sys.executable, str(SHIM), "--hooks", str(tmp_path / "hooks.json")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "calibration loads 256" in proc.stdout and "evaluated C4" not in proc.stdout
    events = shim_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in events] == ["dataset", "stopped"]
    assert "upstream's own evaluation" in events[-1]["reason"]


def test_quick_profile_serves_upstream_own_eval_the_quick_text(tmp_path, embedded_model_dir, data_dir):
    """Upstream's own perplexity reads the whole WikiText-2 test split (148 windows of 2048 on
    SmolLM2: an hour on the images' CPU torch, past the quick profile's time limit). On quick it
    is served the shortest prefix of test rows that holds the text our quick figure scores (8
    windows of 512, the same token ids) and one window of upstream's own length; on paper the
    whole split, untouched. Real SmolLM2 tokenizer, real slice."""
    from transformers import AutoTokenizer

    from llmcbench.driver.profiles import PROFILES
    from llmcbench.methods._upstream.run import cut_own_eval_text
    from llmcbench.methods._upstream.staging import cut_wikitext_test, stage_data
    from llmcbench.methods._upstream.testing import context_for
    from llmcbench.methods.wanda.upstream import ADAPTER
    from llmcbench.tracks.performance.perplexity import encode_joined, load_texts
    from llmcbench.tracks.performance.task_table import WIKITEXT2

    quick = PROFILES["quick"]
    wanted = quick.ppl_max_windows * quick.ppl_seqlen
    source = stage_data(data_dir, offline=True).wikitext_test
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    served = cut_wikitext_test(source, tmp_path / "cut.jsonl", embedded_model_dir, wanted)
    lines, cut = source.read_text().splitlines(), (tmp_path / "cut.jsonl").read_text().splitlines()
    assert served["cut"] and cut == lines[:served["rows"]] and served["rows"] < served["rows_total"] == len(lines)
    texts = [json.loads(line)["text"] for line in cut]
    ids = encode_joined(tok, texts)
    assert ids.numel() == served["tokens"] >= wanted > encode_joined(tok, texts[:-1]).numel()  # the shortest such prefix
    ours = encode_joined(tok, load_texts(WIKITEXT2, data_dir)[0])
    assert torch.equal(ids[0, :wanted], ours[0, :wanted])  # our quick windows, token for token
    assert cut_wikitext_test(source, tmp_path / "all.jsonl", embedded_model_dir, ours.numel() + 1)["cut"] is False
    assert not (tmp_path / "all.jsonl").exists()

    for profile in ("paper", "quick"):
        ctx = context_for(job_for("wanda", "unstructured-50", profile=profile, device="cpu"), tmp_path / profile,
                          model_dir=embedded_model_dir, data_dir=data_dir)
        record = cut_own_eval_text(ctx.job, ctx, ADAPTER)
        if profile == "paper":
            assert record["cut"] is False and ctx.staged.wikitext_test == source
            continue
        # Wanda's window is the model's context (8192 for SmolLM2): longer than the quick text
        context = json.loads((embedded_model_dir / "config.json").read_text())["max_position_embeddings"]
        assert ADAPTER.own_eval_window(ctx) == max(2048, context) and record["tokens_wanted"] == max(wanted, context)
        assert record["cut"] and record["tokens"] >= record["tokens_wanted"]
        assert ctx.staged.wikitext_test.read_text().splitlines() == lines[:record["rows"]]


@pytest.mark.parametrize("mode, error_type, needle", [
    ("exit", "crash", "illegal memory access"),
    ("no_output", "crash", "upstream left no HF model directory"),
    ("pdb", "crash", "pdb.set_trace"),
    ("ptb", "bad_input", "ptb_text_only"),
])
def test_upstream_failures_are_failed_cells_with_logs(tmp_path, tiny_llama_dir, data_dir, upstream_root, mode, error_type, needle):
    """An upstream run that exits non-zero, leaves no output, drops into pdb, or needs data
    that was not staged is a failed job with its class and upstream's log; never a model."""
    result, out, _ = run_job(tmp_path, tiny_llama_dir, data_dir, upstream_root, preset="unstructured-50", mode=mode)
    assert result.status == "failed"
    assert result.error.type == error_type, result.error
    assert needle in result.error.message, result.error.message
    assert (out / "upstream" / "prune.log").stat().st_size > 0
    assert not (out / "model").exists()
    assert result.metrics["upstream"]["environment"]["torch"] == torch.__version__  # what the failed step ran on


def test_upstream_hang_is_a_timeout(tmp_path, tiny_llama_dir, data_dir, upstream_root):
    """An upstream process that never returns is killed at the job's time limit; the job
    itself still writes its failed result (class timeout) with upstream's log."""
    result, out, wall = run_job(tmp_path, tiny_llama_dir, data_dir, upstream_root, preset="unstructured-50",
                                mode="hang", time_limit_s=45)
    assert result.status == "failed" and result.error.type == "timeout", result.error
    assert wall < 120
    assert "pruning starts" in (out / "upstream" / "prune.log").read_text()
    assert not (out / ".upstream-work").exists()  # upstream's copies of the model go; its log stays


def test_missing_or_unpinned_checkout_is_bad_input(tmp_path, tiny_llama_dir, data_dir, upstream_root):
    result, _, _ = run_job(tmp_path / "a", tiny_llama_dir, data_dir, tmp_path / "nowhere")
    assert result.status == "failed" and result.error.type == "bad_input"
    assert "llmcbench images build wanda" in result.error.message
    assert result.provenance.upstream_commit is None  # no checkout: nothing ran

    other = tmp_path / "other"
    shutil.copytree(upstream_root, other)
    (other / "wanda" / ".llmcbench-commit").write_text("0" * 40 + "\n")
    result, _, _ = run_job(tmp_path / "b", tiny_llama_dir, data_dir, other)
    assert result.status == "failed" and result.error.type == "bad_input"
    assert "pins 8e8fc87b4a2f" in result.error.message
    assert result.provenance.upstream_commit == "0" * 40  # the provenance is the checkout's, not the pin


def test_parity_command_compares_both_engines(tmp_path, tiny_llama_dir, upstream_root, run_cli):
    """`llmcbench parity wanda` runs both engines on the same model and reports the WikiText-2
    ppl of each artifact and their mask agreement, which this test recomputes from the two
    artifacts itself."""
    from llmcbench.driver.parity import ParityRecord
    from llmcbench.driver.contract import read_record as read
    from llmcbench.methods._engine.testing import block_linears, load

    env = {"LLMCBENCH_UPSTREAM_DIR": str(upstream_root), "OMP_NUM_THREADS": "1"}
    proc = run_cli("parity", "wanda", "--preset", "2:4", "--model", str(tiny_llama_dir), "--runs-dir", str(tmp_path / "runs"),
                   "--device", "cpu", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mask agreement" in proc.stdout and "upstream" in proc.stdout
    [record_path] = (tmp_path / "runs" / "parity").glob("*.json")
    rec = read(record_path, ParityRecord)
    assert set(rec.engines) == {"reference", "upstream"}
    for side in rec.engines.values():
        assert side.measured_sparsity == pytest.approx(0.5) and 1 < side.wikitext2_ppl < float("inf")
        assert side.device == "cpu" and side.gpu_name is None and side.compress_peak_gpu_bytes is None
    # both sides name the upstream commit their method pins (the reference engine is its clean-room reading)
    from llmcbench.driver.registry import get_method
    assert {s.upstream_commit for s in rec.engines.values()} == {get_method("wanda").upstream.commit}
    assert rec.engines["upstream"].upstream_reported["wikitext_ppl"] > 1
    assert any(n.startswith("upstream_reported:") and "WikiText-2's first" in n and "quick profile" in n for n in rec.notes)
    assert any("mapped its hard-coded CUDA calls to the CPU" in n for n in rec.notes)

    dirs = {e: next((tmp_path / "runs").glob(f"*/{s.compress_job}")) / "model" for e, s in rec.engines.items()}
    ref, up = block_linears(load(dirs["reference"])), block_linears(load(dirs["upstream"]))
    agree = sum(int(((ref[n].weight == 0) == (up[n].weight == 0)).sum()) for n in ref)
    total = sum(ref[n].weight.numel() for n in ref)
    assert rec.mask_agreement == pytest.approx(agree / total)
    assert rec.linears_compared == len(ref) and rec.shapes_agree == 1.0
    # two different 2:4 pruners: masks overlap well above chance (0.5 for random 2:4 masks) but differ
    assert 0.5 < rec.mask_agreement < 1
    # each engine's blocks on WikiText-2 tokens: half of every 4 weights gone moves the outputs, not beyond
    # the dense blocks' own updates
    assert rec.block_tokens == 512 and set(rec.block_rel_err) == {"reference", "upstream"}
    assert all(0.01 < v < 1 for v in rec.block_rel_err.values()), rec.block_rel_err
    assert "block output error vs dense (512 WikiText-2 tokens)" in proc.stdout
