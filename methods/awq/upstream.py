"""AWQ, the upstream engine: mit-han-lab/llm-awq `awq/entry.py` at the pinned commit, unmodified.

    python -m awq.entry --model_path {model} --w_bit W --q_group_size G --run_awq --dump_awq {work}/awq.pt
    python -m awq.entry --model_path {model} --w_bit W --q_group_size G --load_awq {work}/awq.pt \
        --q_backend fake --dump_fake {work}/fake --tasks wikitext
    (W4 only) python -m awq.entry ... --load_awq {work}/awq.pt --q_backend real --dump_quant {work}/quant.pt

(run as the script `awq/entry.py` with the checkout on the path, which is what `-m` does.)

- Calibration: `run_awq(..., n_samples=128, seqlen=512)` is hard-coded in entry.py and reads
  `mit-han-lab/pile-val-backup`; offline the shim serves the staged C4 slice (recorded in the
  notes); the job's nsamples/seqlen do not reach upstream. Timed: `run_awq` (the search),
  then `apply_awq` + `pseudo_quantize_model_weight` (applying scales/clips and quantizing).
- Output: `--dump_fake` is `model.save_pretrained` of the fake-quantized fp16 model (no
  tokenizer: copied from the input). Upstream's real packing (`WQLinear`) supports 4-bit only
  ("Only 4-bit are supported for now"), so W8 is fake-quant only; for W4 the third step's
  `torch.save(model.cpu().state_dict())` (renamed `*-v2.pt` upstream) is kept as `packed/`
  in upstream's own format ("llm-awq-v2": WQLinear qweight/scales/scaled_zeros per layer).
- `--tasks wikitext` makes the second step print upstream's own WikiText-2 perplexity
  (2048-token windows) as a bare number after its progress bar.
- The compiled `awq_inference_engine` is imported unconditionally, even for fake quantization,
  but called only by upstream's real-quant inference, which no step here runs: the image builds it
  where a CUDA compiler matching torch's is at hand, else installs a stand-in that fails on any
  call (build_kernels.sh, kernels_standin.py).
"""

from __future__ import annotations

import re
import shutil

from llmcbench.driver.contract import Compression
from llmcbench.driver.jobrun import PACKED_PARTIAL

from .._engine.blockwise import UnsupportedModelError
from .._upstream.adapter import Step, UpstreamAdapter, UpstreamContext
from .._upstream.convert import hf_dir_from_upstream, quantized_layers, require
from .reference import AWQSettings

# The model_types (config.json) this adapter runs: of the registry's architectures, those llm-
# awq's auto_scale/auto_clip have a branch for (none for ChatGLM). The model registry refuses the
# others up front (driver/model_registry.py `supports`).
SUPPORTED_ARCHS = {"llama", "opt"}


ENTRY = "awq/entry.py"


def settings_for(params: dict) -> AWQSettings:
    s = AWQSettings.from_params(params)
    if s.n_grid != 20 or not s.auto_scale or not s.auto_clip:
        raise ValueError("awq upstream: the search grid (20 points) and running both scale and clip search are fixed "
                         "in upstream's run_awq; n_grid, auto_scale and auto_clip apply to the reference engine only")
    return s


def check_shapes(ctx: UpstreamContext, s: AWQSettings) -> None:
    """Upstream asserts what the reference engine handles (a shorter last group): every linear's
    input width divisible by the group size (`pseudo_quantize_tensor`), and the output width of
    every linear it clips (all but q/k) divisible by 64 (`auto_clip_layer`'s batches of output
    channels). A bare AssertionError after the model loads becomes one line before upstream starts
    (the embedded SmolLM2's hidden size 576 and group 128, say)."""
    c = ctx.input_config
    hidden, inter, heads = c.get("hidden_size"), c.get("intermediate_size"), c.get("num_attention_heads")
    if not (hidden and inter and heads):
        return
    head_dim = c.get("head_dim") or hidden // heads
    kv = (c.get("num_key_value_heads") or heads) * head_dim
    inputs = {"hidden_size": hidden, "intermediate_size": inter, "attention width (heads x head_dim)": heads * head_dim}
    problems = [f"{name} {width} is not a multiple of group_size {s.group_size}" for name, width in inputs.items()
                if s.group_size > 0 and width % s.group_size]
    outputs = {"hidden_size": hidden, "intermediate_size": inter, "v_proj's width (KV heads x head_dim)": kv}
    problems += [f"{name} {width} is not a multiple of 64 (the clip search's batches of output channels)"
                 for name, width in outputs.items() if width % 64]
    if problems:
        raise UnsupportedModelError(f"awq upstream asserts on {ctx.input_model.name}: {'; '.join(problems)}; "
                                    "use --engine reference (a shorter last group where the group size does not divide)")


class AWQUpstream(UpstreamAdapter):
    method = "awq"

    def parse_metrics(self, log: str) -> dict[str, float]:
        # entry.py: `print(ppl.item())` right after the "evaluating..." progress bar of --tasks wikitext
        m = re.findall(r"evaluating\.\.\.[^\n]*\n(?:[^\n]*evaluating\.\.\.[^\n]*\n)*([0-9.]+(?:e[+-]?\d+)?)\s*$", log, flags=re.MULTILINE)
        return {"wikitext2_ppl": float(m[-1])} if m else {}

    def steps(self, ctx: UpstreamContext) -> list[Step]:
        s = settings_for(ctx.params)
        check_shapes(ctx, s)
        base = ["--model_path", str(ctx.model_dir), "--w_bit", str(s.weight_bits), "--q_group_size", str(s.group_size)]
        awq = str(ctx.work / "awq.pt")
        steps = [
            Step("search", ENTRY, [*base, "--run_awq", "--dump_awq", awq], time=["awq.quantize.pre_quant:run_awq"]),
            Step("fake_quant", ENTRY, [*base, "--load_awq", awq, "--q_backend", "fake", "--dump_fake", str(ctx.work / "fake"),
                                       "--tasks", "wikitext"],
                 time=["awq.quantize.pre_quant:apply_awq", "awq.quantize.quantizer:pseudo_quantize_model_weight"]),
        ]
        if s.weight_bits == 4:
            steps.append(Step("pack", ENTRY, [*base, "--load_awq", awq, "--q_backend", "real", "--dump_quant",
                                              str(ctx.work / "quant.pt")]))
        return steps

    def convert(self, ctx: UpstreamContext) -> Compression:
        s = settings_for(ctx.params)
        model = hf_dir_from_upstream(ctx.work / "fake", ctx.input_model, ctx.model_out)
        layers = quantized_layers(model, s.weight_bits, s.group_size)
        packed_format = None
        if s.weight_bits == 4:
            packed = require(ctx.work / "quant-v2.pt", "real-quantized state dict (--dump_quant, renamed *-v2.pt upstream)")
            out = ctx.model_out.parent / PACKED_PARTIAL
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(packed, out / "awq-v2.pt")
            packed_format = "llm-awq-v2"
        notes = [f"upstream mit-han-lab/llm-awq entry.py --w_bit {s.weight_bits} --q_group_size {s.group_size} (zero point); "
                 "calibration: upstream's 128 x 512 tokens of pile-val, served the job's C4 documents offline",
                 "weights stored dequantized (--dump_fake)" + ("; packed/awq-v2.pt is upstream's WQLinear state dict"
                                                               if packed_format else "; W8: upstream packs 4-bit only")]
        return Compression(method="awq", engine="upstream", weight_bits=s.weight_bits, act_bits=16, group_size=s.group_size,
                           symmetric=False, act_granularity="none", smoothing_folded=True,  # run_awq's auto_scale
                           packed_format=packed_format, layers=layers, notes=notes)


ADAPTER = AWQUpstream()
