"""AWQ's upstream adapter: the entry.py command lines per preset (against method.toml's
recorded commands), upstream's log line, and the conversion of `--dump_fake` (+ the W4
`--dump_quant` state dict kept as packed/)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcbench.driver.registry import get_method
from llmcbench.methods._upstream.convert import ConversionError
from llmcbench.methods._upstream.testing import built_commands, context_for, job_for, recorded_commands
from llmcbench.methods.awq.upstream import ADAPTER


@pytest.mark.parametrize("preset", list(get_method("awq").presets))
def test_every_preset_builds_the_recorded_commands(tmp_path, preset):
    assert built_commands(context_for(job_for("awq", preset), tmp_path)) == recorded_commands("awq", preset)


def test_settings_reach_the_commands_and_fixed_ones_are_refused(tmp_path):
    steps = ADAPTER.steps(context_for(job_for("awq", "w4a16-g128", group_size=64), tmp_path))
    assert all(s.argv[s.argv.index("--q_group_size") + 1] == "64" for s in steps)
    assert steps[0].time == ["awq.quantize.pre_quant:run_awq"] and len(steps) == 3
    assert len(ADAPTER.steps(context_for(job_for("awq", "w8a16"), tmp_path))) == 2  # upstream packs 4-bit only
    with pytest.raises(ValueError, match="fixed"):
        ADAPTER.steps(context_for(job_for("awq", "w4a16-g128", n_grid=10), tmp_path))


def test_parse_metrics_reads_upstream_print():
    # entry.py --tasks wikitext: tqdm(desc="evaluating...") then print(ppl.item())
    log = "evaluating...: 100%|##########| 166/166 [01:02<00:00,  2.65it/s]\n5.603480815887451\n"
    assert ADAPTER.parse_metrics(log) == {"wikitext2_ppl": pytest.approx(5.60348, rel=1e-5)}


def _group_fake_quant(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """awq/quantize/quantizer.py pseudo_quantize_tensor (zero point): per group of `group`
    inputs, scales = (max - min) / (2^bits - 1), zeros = -round(min / scales), clamp(round(w / scales) + zeros)."""
    g = w.reshape(-1, group)
    mx, mn = g.amax(1, keepdim=True), g.amin(1, keepdim=True)
    scales = ((mx - mn).clamp(min=1e-5) / (2 ** bits - 1))
    zeros = (-torch.round(mn / scales)).clamp(0, 2 ** bits - 1)
    return ((torch.clamp(torch.round(g / scales) + zeros, 0, 2 ** bits - 1) - zeros) * scales).reshape_as(w)


def test_convert_dump_fake_and_the_packed_state_dict(tmp_path, tiny_llama_dir, data_dir):
    """`--dump_fake DIR` is `model.save_pretrained(DIR)` of the fp16 model after apply_awq and
    pseudo_quantize_model_weight (no tokenizer); `--dump_quant X.pt` is
    `torch.save(model.cpu().state_dict(), X-v2.pt)`. Mirrored with a tiny LLaMA (groups of 32)."""
    from llmcbench.tracks.performance import wikitext2_ppl

    ctx = context_for(job_for("awq", "w4a16-g128", group_size=32), tmp_path, model_dir=tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for layer in model.model.layers:
        for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
            linear.weight.data = _group_fake_quant(linear.weight.data, 4, 32)
    model.half().save_pretrained(ctx.work / "fake")
    with pytest.raises(ConversionError, match="quant-v2.pt"):
        ADAPTER.convert(ctx)  # W4 needs the packed state dict too
    torch.save({"model.layers.0.self_attn.q_proj.qweight": torch.zeros(64, 8, dtype=torch.int32)}, ctx.work / "quant-v2.pt")
    declaration = ADAPTER.convert(ctx)
    assert (declaration.weight_bits, declaration.group_size, declaration.symmetric, declaration.smoothing_folded) == (4, 32, False, True)
    assert declaration.packed_format == "llm-awq-v2" and (tmp_path / ".packed.partial" / "awq-v2.pt").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(ctx.model_out, dtype=torch.float32)
    ppl = wikitext2_ppl(loaded, AutoTokenizer.from_pretrained(ctx.model_out), data_dir=data_dir, seqlen=128, max_windows=2)
    assert 1 < ppl["ppl"] < float("inf")


def test_unquantized_output_is_refused(tmp_path, tiny_llama_dir):
    ctx = context_for(job_for("awq", "w8a16", group_size=32), tmp_path, model_dir=tiny_llama_dir)
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(ctx.work / "fake")
    with pytest.raises(ConversionError, match="grid"):
        ADAPTER.convert(ctx.__class__(**{**ctx.__dict__, "params": {**ctx.params, "weight_bits": 4}}))


def _upstream_venv(tmp_path):
    """A venv like the image's upstream venv (no pip; the harness's site-packages behind its own,
    as images/Dockerfile.method's layers are): torch imports, and what the build installs lands
    in the new venv only."""
    import subprocess
    import sys
    import sysconfig

    venv = tmp_path / "upstream-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['platlib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "harness.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return venv


def _build_kernels(venv, checkout, **env):
    import os
    import subprocess

    from llmcbench.driver import images
    from llmcbench.driver.registry import get_method

    spec = get_method("awq")
    cfg = images.upstream_image_config(spec)
    files = images.upstream_layer_files(images.ImageSpec(role="method", name="method-awq", requirements=[],
                                                         python=images.python_version(), method="awq", upstream_image=cfg))
    layer = checkout.parent / "upstream-layer"
    for name, text in files.items():
        (layer / name).parent.mkdir(parents=True, exist_ok=True)
        (layer / name).write_text(text)
    # build.sh as images/Dockerfile.method runs it, but with this test's layer folder
    script = files["build.sh"].replace("/tmp/upstream-layer/files", str(layer / "files"))
    run_env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", **env}
    return subprocess.run(["sh", "-c", script], cwd=checkout, env=run_env, capture_output=True, text=True)


def test_image_build_installs_the_kernel_stand_in_where_torch_has_no_cuda(tmp_path):
    """methods/awq/build_kernels.sh run as the image build runs it ([upstream.image].build with its
    build_files), here with a CPU torch: the kernels cannot be compiled, so the stand-in is what
    `import awq_inference_engine` finds in the upstream venv, and it refuses any kernel call; with
    LLMCBENCH_AWQ_KERNELS=build the same machine fails in one line instead."""
    import subprocess

    venv, checkout = _upstream_venv(tmp_path), tmp_path / "checkout"
    (checkout / "awq" / "kernels").mkdir(parents=True)
    forced = _build_kernels(venv, checkout, LLMCBENCH_AWQ_KERNELS="build")
    assert forced.returncode == 1 and "awq-kernels: cannot build: torch" in forced.stderr and "not a CUDA build" in forced.stderr
    probe = "import awq_inference_engine as k; print(k.STAND_IN); k.gemm_forward_cuda_new"
    before = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True)
    assert before.returncode == 1 and "ModuleNotFoundError" in before.stderr

    built = _build_kernels(venv, checkout)
    assert built.returncode == 0, built.stderr
    assert "awq-kernels: not built (torch" in built.stdout
    used = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True)
    assert used.stdout.strip() == "True"
    assert "RuntimeError: awq_inference_engine.gemm_forward_cuda_new: llm-awq's CUDA kernels were not built" in used.stderr
    # upstream's own import line, and the probes tools make, still work
    ok = subprocess.run([str(venv / "bin" / "python"), "-c", "import awq_inference_engine as k; print(hasattr(k, '__path__'))"],
                        capture_output=True, text=True)
    assert ok.stdout.strip() == "False", ok.stderr


def test_shapes_upstream_asserts_on_are_refused_up_front(tmp_path, embedded_model_dir):
    """Upstream asserts that the group size divides every linear's input width and that the
    clipped linears' output widths are multiples of 64; the embedded SmolLM2 (hidden 576) with
    group 128 is refused in one line before upstream starts, and so is a narrow v_proj; a model
    whose widths fit (LLaMA-2's shape, scaled down) is not."""
    from llmcbench.methods._engine.blockwise import UnsupportedModelError

    with pytest.raises(UnsupportedModelError) as refused:
        ADAPTER.steps(context_for(job_for("awq", "w8a16"), tmp_path, model_dir=embedded_model_dir))
    message = str(refused.value)
    assert "hidden_size 576 is not a multiple of group_size 128" in message and "intermediate_size" not in message
    assert "\n" not in message and "--engine reference" in message

    import json

    def model(**config):
        d = tmp_path / "m{}".format(len(list(tmp_path.glob("m*"))))
        d.mkdir()
        base = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4,
                "num_key_value_heads": 4}
        (d / "config.json").write_text(json.dumps({**base, **config}))
        return d

    assert len(ADAPTER.steps(context_for(job_for("awq", "w4a16-g128"), tmp_path, model_dir=model()))) == 3
    with pytest.raises(UnsupportedModelError, match=r"v_proj's width \(KV heads x head_dim\) 32 is not a multiple of 64"):
        ADAPTER.steps(context_for(job_for("awq", "w4a16-g128"), tmp_path, model_dir=model(num_key_value_heads=2, head_dim=16,
                                                                                          num_attention_heads=16)))
