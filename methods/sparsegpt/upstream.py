"""SparseGPT, the upstream engine: IST-DASLab/sparsegpt `llama.py` at the pinned commit, unmodified.

    python llama.py {model} c4 --nsamples N --seed S --percdamp P --blocksize B \
        (--sparsity 0.5 | --prunen 2 --prunem 4) [--true-sequential]

- Calibration: `datautils.get_c4` (C4 train shard, random 2048-token windows of documents
  longer than 2048 tokens; `model.seqlen = 2048` is hard-coded in `get_llama`); it also loads
  a C4 validation shard it returns as the test loader, unused for calibration. Offline both are
  the staged C4 slice. The job's seqlen does not reach upstream (recorded in the notes).
- Upstream saves (`--save`) only after its mandatory WikiText-2 / PTB / C4 evaluation, so the
  shim saves after `__main__:llama_sequential` instead (model = its first argument) and no
  `--save` is passed; offline the evaluation then stops at PTB, which is not staged, after
  WikiText-2. `llama_sequential` is also the timed compression step.
- For N:M, `--sparsity` is not passed: upstream prunes when `args.sparsity or args.prunen`
  and ignores the ratio when `prunen` is set.
- Upstream prints `Dataset: wikitext2` then `Perplexity: <x>` (llama.py `llama_eval`).
- Tokenizer: `datautils.get_tokenizer` loads the sentencepiece `LlamaTokenizer` for any model
  path containing "llama" (`AutoTokenizer` otherwise): such a model without `tokenizer.model`
  (LLaMA-3's BPE) would stop inside sentencepiece ("TypeError: not a string"); it is refused
  in one line before upstream starts (`check_tokenizer`).
"""

from __future__ import annotations

from llmcbench.driver.contract import Compression

from .._engine.blockwise import UnsupportedModelError
from .._engine.sparsity import sparsity_declaration
from .._upstream.adapter import Step, UpstreamAdapter, UpstreamContext, switch
from .._upstream.convert import hf_dir_from_upstream
from .reference import SparseGPTSettings


# The model_types (config.json) this adapter runs: llama.py, upstream's LLaMA script (opt.py and
# bloom.py are not run). The model registry refuses the others up front (driver/model_registry.py
# `supports`).
SUPPORTED_ARCHS = {"llama"}


def check_tokenizer(ctx: UpstreamContext) -> None:
    if "llama" in str(ctx.model_dir).lower() and (ctx.input_model / "config.json").is_file() \
            and not (ctx.input_model / "tokenizer.model").is_file():
        raise UnsupportedModelError(
            f"sparsegpt upstream loads the sentencepiece LlamaTokenizer for a model path containing 'llama' ({ctx.model_dir}) "
            f"and {ctx.input_model.name} has no tokenizer.model: give the model a directory name without 'llama' "
            "(upstream then uses AutoTokenizer) or use --engine reference")


class SparseGPTUpstream(UpstreamAdapter):
    method = "sparsegpt"
    metric_patterns = (r"^Dataset: (?P<key>\S+)\n(?:.*\n)*?Perplexity: (?P<value>[0-9.eE+-]+|nan|inf)$",)

    def steps(self, ctx: UpstreamContext) -> list[Step]:
        s = SparseGPTSettings.from_params(ctx.params)
        check_tokenizer(ctx)
        cal = ctx.calibration
        pattern = ["--prunen", str(s.n), "--prunem", str(s.m)] if s.pattern == "n:m" else ["--sparsity", str(s.sparsity)]
        argv = [str(ctx.model_dir), cal.dataset, "--nsamples", str(cal.nsamples), "--seed", str(cal.seed),
                "--percdamp", str(s.percdamp), "--blocksize", str(s.blocksize), *pattern, *switch("--true-sequential", s.true_sequential)]
        save = {"after": "__main__:llama_sequential", "arg": 0, "dir": str(ctx.work / "model")}
        return [Step("prune", "llama.py", argv, time=["__main__:llama_sequential"], save=[save],
                     unused_splits=["c4:validation", "wikitext:train"])]

    def convert(self, ctx: UpstreamContext) -> Compression:
        s = SparseGPTSettings.from_params(ctx.params)
        model = hf_dir_from_upstream(ctx.work / "model", ctx.input_model, ctx.model_out)
        notes = [f"upstream IST-DASLab/sparsegpt llama.py {ctx.calibration.dataset} "
                 f"{'--prunen %d --prunem %d' % (s.n, s.m) if s.pattern == 'n:m' else '--sparsity %s' % s.sparsity}; "
                 "calibration windows of 2048 tokens (upstream's hard-coded model.seqlen), not the job's seqlen"]
        return sparsity_declaration(model, "sparsegpt", s.pattern, s.n, s.m, s.sparsity, notes=notes)


ADAPTER = SparseGPTUpstream()
