"""The input model as the upstream stacks read it (methods/_upstream/staging.stage_model).

The upstream images pin transformers 4.31-4.46 with tokenizers < 0.20; the embedded model
(and any model this harness saved) is in transformers 5's format. These tests load the staged
copy with the wanda image's own stack (transformers 4.34.1, tokenizers 0.14.1, installed by
tests/legacy-stack-setup.sh in .legacy-hf-venv; conftest.py's `legacy_python`) and ask that it reads the model as the
project's transformers reads the original: the same token ids, the same rope_theta.
That a job gives upstream the staged copy and keeps the input's own tokenizer in the artifact
is asserted in test_upstream_engine.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from llmcbench.driver.fsio import sha256_tree
from llmcbench.methods._upstream.staging import stage_model

# what upstream code does with the input model before touching weights (wanda's main.py:
# AutoTokenizer.from_pretrained(model, use_fast=False); the model's config)
READ_AS_UPSTREAM = """
import json, sys
import transformers
from transformers import AutoConfig, AutoTokenizer
model, texts = sys.argv[1], json.loads(sys.stdin.read())
config = AutoConfig.from_pretrained(model)
tokenizer = AutoTokenizer.from_pretrained(model, use_fast=False)
print(json.dumps({"transformers": transformers.__version__, "rope_theta": getattr(config, "rope_theta", None),
                  "torch_dtype": str(config.torch_dtype), "eos": tokenizer.eos_token,
                  "ids": [tokenizer(t)["input_ids"] for t in texts]}))
"""


@pytest.fixture(scope="module")
def texts(data_dir) -> list[str]:
    lines = [json.loads(line)["text"] for line in (data_dir / "hf" / "Salesforce__wikitext" / "wikitext-2-raw-v1"
                                                   / "test.jsonl").read_text().splitlines()[:40]]
    return [t for t in lines if t.strip()][:12] + ["Hello  world\n\tüber 𝔘 ümlaut — 42.5%", "<|im_start|>user\nhi<|im_end|>"]


def read_as_upstream(python: str, model: Path, texts: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    return subprocess.run([python, "-c", READ_AS_UPSTREAM, str(model)], input=json.dumps(texts), capture_output=True,
                          text=True, env=env, timeout=300)


def test_upstream_stack_reads_the_staged_model_as_we_read_the_original(tmp_path, embedded_model_dir, texts, legacy_python):
    from transformers import AutoTokenizer

    before = sha256_tree(embedded_model_dir)
    original = json.loads((embedded_model_dir / "config.json").read_text())
    staged, changes = stage_model(embedded_model_dir, tmp_path / "input")

    assert staged == tmp_path / "input" / embedded_model_dir.name  # the same name: OmniQuant's net label
    assert {c.split(":")[0] for c in changes} == {"config.json", "tokenizer.json", "tokenizer_config.json"}, changes
    weights = staged / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (embedded_model_dir / "model.safetensors").resolve()
    assert sha256_tree(embedded_model_dir) == before  # the input model is never written

    # the image's stack cannot read the original (so this test can fail) ...
    failed = read_as_upstream(legacy_python, embedded_model_dir, texts)
    assert failed.returncode != 0 and ("TokenizersBackend" in failed.stderr or "ModelWrapper" in failed.stderr), failed.stderr[-800:]

    # ... and reads the staged copy as the project's transformers reads the original
    proc = read_as_upstream(legacy_python, staged, texts)
    assert proc.returncode == 0, proc.stderr[-2000:]
    upstream = json.loads(proc.stdout.strip().splitlines()[-1])
    assert upstream["transformers"] == "4.34.1"
    assert upstream["rope_theta"] == original["rope_parameters"]["rope_theta"] == 100000.0  # not 4.x's default 10000
    assert upstream["torch_dtype"].removeprefix("torch.") == original["dtype"]  # a string here: this stack has no torch
    ours = AutoTokenizer.from_pretrained(embedded_model_dir)
    assert upstream["eos"] == ours.eos_token
    assert upstream["ids"] == [ours(t)["input_ids"] for t in texts]


def test_a_model_in_the_old_format_is_given_as_it_is(tmp_path, embedded_model_dir):
    staged, changes = stage_model(embedded_model_dir, tmp_path / "first")
    assert changes
    again, none = stage_model(staged, tmp_path / "second")
    assert (again, none) == (staged, [])
    assert not (tmp_path / "second").exists()


def test_the_artifact_keeps_the_input_tokenizer_not_upstreams_resave(tmp_path, tiny_llama_dir):
    """Upstream code that saves the tokenizer with its model (Wanda's `--save_model`) writes the
    files of the staged copy in its older stack's format; the artifact's tokenizer files are
    the input model's own, byte for byte, so the compressed model tokenizes as the dense one."""
    from transformers import AutoModelForCausalLM

    from llmcbench.methods._upstream.convert import hf_dir_from_upstream

    staged, _ = stage_model(tiny_llama_dir, tmp_path / "input")
    upstream_out = tmp_path / "upstream-save"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(upstream_out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (upstream_out / name).write_bytes((staged / name).read_bytes())  # as upstream's tokenizer.save_pretrained
        assert (upstream_out / name).read_bytes() != (tiny_llama_dir / name).read_bytes()

    hf_dir_from_upstream(upstream_out, tiny_llama_dir, tmp_path / "artifact")
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert tokenizer_files <= {p.name for p in tiny_llama_dir.iterdir()}
    for name in sorted(tokenizer_files):
        assert (tmp_path / "artifact" / name).read_bytes() == (tiny_llama_dir / name).read_bytes(), name
