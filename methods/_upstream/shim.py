"""Run an upstream script unmodified, with the harness's hooks around it.

This file runs under the *upstream* interpreter (the method image's pinned venv, or any
Python that has the upstream repository's dependencies), so it imports nothing from
llmcbench and only the standard library at module level. The driver side
(`methods/_upstream/run.py`) writes a hooks file and calls

    <upstream python> shim.py --hooks hooks.json

with the job's scratch directory as the working directory and the checkout on PYTHONPATH. The hooks replace the patches one
would otherwise apply to upstream source:

- `datasets`: `datasets.load_dataset` calls for the hub datasets upstream hard-codes
  (`allenai/c4` with its removed `allenai--c4` config, `wikitext`, `ptb_text_only`,
  `bookcorpus`, `mit-han-lab/pile-val-backup`, ...) are served from files the driver
  staged from `/data`. A dataset nobody staged raises `DatasetNotStaged` unless
  `allow_hub` is set (the paper profile with hub access). A rule's `until_saved` splits are
  served only until the step's model exists (see `staging.dataset_rules`).
- `time`: functions whose wall time is the compression step (e.g. GPTQ's
  `llama_sequential`), so track 3 never counts loading or upstream's own evaluation. Their
  event also holds the process's peak host RSS while they ran and, on a GPU, the peak GPU
  memory it reserved (`timed_window`), as the reference engines measure theirs.
- `save`: after a function returns, `save_pretrained` the model it was given or returned,
  for repositories that keep the compressed weights only in memory (GPTQ, SmoothQuant,
  SparseGPT saves only after its mandatory evaluation); or `torch.save` an object
  (`"torch_save": path`) that upstream keeps in memory only (GPTQ's quantizer grids).
- `warm_up_vml`: the path of the harness's `driver/numerics.py` (stdlib and torch only), loaded by
  path and run before the script: it resolves MKL VML's kernels on one thread, so a first
  multi-threaded `cos` cannot run one thread's chunk through the low-accuracy kernel
  (pytorch/pytorch#188792; that module's docstring has the story). Upstream's own torch may bundle
  the affected oneMKL too, and on a CPU job its rotary tables are computed there.
- `no_pdb`: `pdb.set_trace()` (OmniQuant on a NaN loss) fails the job instead of waiting
  for a terminal that a container does not have.
- `cuda_to_cpu` (jobs with `device: cpu` only): the repositories hard-code `cuda:0`, so on a
  machine without a GPU they stop at their first CUDA call. A torch function mode maps every
  CUDA device a torch call names to the CPU (`.cuda()`, `.to("cuda")`, `device=` of factories;
  a move returns a new tensor, as it does on a GPU, where a Parameter's copy is a plain tensor),
  `torch.cuda` housekeeping (synchronize, empty_cache, memory counters) becomes a no-op, and
  `torch.cuda.amp.autocast` becomes CPU autocast at the same dtype. fp16 runs as fp32 on the
  CPU: `dtype=float16`, `.half()`, `.to(float16)`, `set_default_dtype(float16)` and fp16
  autocast all give fp32, and a Parameter's cast to fp32 is a new plain tensor, as it is from
  fp16 on a GPU (`half_to_float`); raw bytes are still read as the dtype they hold (an fp16
  checkpoint loads, then converts like any fp16 tensor). Why: the upstream stacks' CPU builds either have no fp16
  matmul (torch 2.1: "addmm_impl_cpu_ not implemented for 'Half'") or a slow one (torch 2.3 in
  AWQ's image: 6.3 times slower than fp32, a 4-layer search that did not finish in 15 minutes),
  and a GPU's fp16 matmul accumulates in fp32 anyway. The hooks' `half_to_float: false` keeps
  fp16. The algorithm's own code is untouched; the result records that it ran this way.

Targets are `module:function` (or `module:Class.method`). For `__main__:function` the script is split at its
top-level `if __name__ == "__main__":` guard: the definitions run first, the hooks wrap
them, then the guarded block runs. Other modules are imported and wrapped before the
script starts, so a script's `from module import function` gets the wrapped function.

If the script asks for a dataset that was not staged after the model was saved (by a save
hook, or by upstream itself into the step's declared `outputs`: the mandatory PTB/C4
evaluations of GPTQ and SparseGPT, OmniQuant's C4 perplexity, offline), the run ends there with
exit 0 and says so: what the harness needed has been produced. Before the save it is an
error. Events (this interpreter's versions, timings, saves, stops) are appended as JSON lines
to `events`. `shim.py --versions` prints the versions alone (the job hash's identity of an
upstream interpreter other than the harness's).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import json
import os
import sys
import time

EXIT_NOT_STAGED = 3
EXIT_PDB = 4


class DatasetNotStaged(RuntimeError):
    """Upstream asked for a dataset the harness did not stage (and the hub is not allowed)."""


class PdbCalled(RuntimeError):
    """Upstream called pdb.set_trace(): in a container that would hang; fail instead."""


class Hooks:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.events_path = cfg.get("events")
        self.saved = False
        self.open_windows = 0  # timed functions running now (a nested one shares the outermost one's peaks)
        self.rss_reset = False  # whether the outermost one could reset the peak RSS

    def event(self, **record) -> None:
        record["t"] = time.time()
        print(f"[llmcbench-shim] {json.dumps(record)}", flush=True)
        if self.events_path:
            with open(self.events_path, "a") as f:
                f.write(json.dumps(record) + "\n")


def interpreter_versions() -> dict:
    """The Python and the libraries upstream's code runs on here, from package metadata (importing
    none of them), with the CUDA torch was built for: the environment an upstream result records,
    which is not the harness's (an upstream stack pins, e.g., torch 2.1 and transformers 4.35)."""
    import platform
    import re
    from importlib import metadata, util

    found = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "accelerate", "datasets"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    found["cuda"] = None
    spec = util.find_spec("torch") if found["torch"] else None
    try:
        # torch/version.py: `cuda = '12.1'` (older) or `cuda: Optional[str] = '12.1'`; None on a CPU build
        with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as f:
            match = re.search(r"^cuda\b[^=\n]*=\s*'([^']+)'", f.read(), re.M)
        found["cuda"] = match.group(1) if match else None
    except (AttributeError, TypeError, OSError):  # no torch, or one without its version.py
        pass
    return found


def warm_up_vml(hooks: Hooks, numerics_path: str) -> None:
    """Run the harness's `warm_up_vml()` (driver/numerics.py, loaded by path: this interpreter has
    no llmcbench) under upstream's torch, before upstream's first op."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("llmcbench_numerics", numerics_path)
    numerics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(numerics)
    try:
        ops = numerics.warm_up_vml()
    except ImportError as e:  # an interpreter without torch computes nothing through VML
        hooks.event(event="vml_warm_up", ops=0, why=f"no torch: {e}")
        return
    hooks.event(event="vml_warm_up", ops=len(ops),
                why=numerics.RESOLVED if ops else "this torch has no MKL")


# ----------------------------------------------------------------------------- datasets

def _norm(name) -> str:
    return str(name or "").strip().lower()


def _find_rule(rules: list[dict], path, name, data_files) -> dict | None:
    path, name = _norm(path), _norm(name)
    for rule in rules:
        aliases = [_norm(a) for a in rule["match"]]
        if path in aliases or (path in ("json", "text") and data_files and rule.get("match_files")
                               and any(m in json.dumps(data_files) for m in rule["match_files"])):
            configs = rule.get("configs")
            if configs is None or name in [_norm(c) for c in configs] or not name:
                return rule
    return None


def patch_datasets(hooks: Hooks) -> None:
    rules = hooks.cfg.get("datasets") or []
    allow_hub = bool(hooks.cfg.get("allow_hub"))
    try:
        import datasets
    except ImportError:
        return
    original = datasets.load_dataset

    @functools.wraps(original)
    def load_dataset(path, name=None, *args, **kwargs):
        data_files = kwargs.get("data_files")
        rule = _find_rule(rules, path, name, data_files)
        if rule is None and _local_files(path, data_files):
            hooks.event(event="dataset", requested=[str(path), name], served="local files as given")
            return original(path, name, *args, **kwargs)
        if rule is None:
            if allow_hub:
                return original(path, name, *args, **kwargs)
            raise DatasetNotStaged(f"load_dataset({path!r}, {name!r}) is not staged for this offline run")
        if rule.get("drop_config"):
            hooks.event(event="dataset", requested=[str(path), name], served="hub without the removed config name")
            return original(path, *args, **kwargs)
        split = kwargs.get("split")
        files = rule["files"]
        wanted = _split_name(split)
        if wanted in (rule.get("until_saved") or []) and model_written(hooks):
            raise DatasetNotStaged(f"load_dataset({path!r}, {name!r}, split={split!r}) after the model was saved is upstream's "
                                   "own evaluation; that split is not staged offline")
        if wanted is not None and wanted not in files:
            raise DatasetNotStaged(f"load_dataset({path!r}, {name!r}, split={split!r}): split {wanted!r} is not staged "
                                   f"(staged: {', '.join(sorted(files))})")
        hooks.event(event="dataset", requested=[str(path), name, split], served=files if wanted is None else files[wanted])
        return original(rule.get("format", "json"), data_files=files, split=split)

    datasets.load_dataset = load_dataset


def model_written(hooks: Hooks) -> bool:
    """The step's model exists: a save hook wrote it, or upstream wrote its declared outputs."""
    outputs = hooks.cfg.get("outputs") or []
    return hooks.saved or bool(outputs and all(os.path.exists(o) for o in outputs))


def _local_files(path, data_files) -> bool:
    """A packaged loader (json, text, ...) over files that exist here: nothing to redirect."""
    if _norm(path) not in ("json", "text", "csv", "parquet") or not data_files:
        return False
    files = data_files.values() if isinstance(data_files, dict) else [data_files]
    flat = [f for item in files for f in (item if isinstance(item, (list, tuple)) else [item])]
    return all(isinstance(f, str) and os.path.isfile(f) for f in flat)


def _split_name(split) -> str | None:
    if split is None:
        return None
    return str(split).split("[")[0].split("+")[0].strip()


# ----------------------------------------------------------------------------- functions

def _sync() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _cuda(hooks: Hooks):
    """torch where this process computes on a real GPU (not one the `cuda_to_cpu` hook maps to
    the CPU, whose memory counters are constants), else None."""
    torch = sys.modules.get("torch")
    if hooks.cfg.get("cuda_to_cpu") or torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch


def _reset_peak_rss() -> bool:
    """The process's peak RSS (VmHWM) back to its current RSS (Linux: clear_refs "5", as the
    reference engines' `measure_common.reset_peak_rss`); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        return None


@contextlib.contextmanager
def timed_window(hooks: Hooks, target: str):
    """Time one call of a `time` target and take the peak memory of the process during it (SPEC 5,
    track 3): its host RSS and, on a GPU, what it reserved (the caching allocator's peak), the
    reference engines' figures. Both peaks are reset when the outermost timed call starts, so the
    model's load and anything freed before (with `empty_cache`) do not count, and a timed call
    inside another does not reset the outer one's. GPU memory is summed over the devices (a model
    upstream spreads with `device_map="auto"` is on several). None of the pinned repositories
    resets the GPU peak itself."""
    nested = hooks.open_windows > 0  # its time is inside the outer one's: counted once (run.py)
    if not nested:
        hooks.rss_reset = _reset_peak_rss()
        torch = _cuda(hooks)
        if torch is not None:
            for index in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(index)
    hooks.open_windows += 1
    try:
        _sync()
        t0 = time.perf_counter()
        yield
        _sync()
        seconds = time.perf_counter() - t0
    finally:
        hooks.open_windows -= 1
    figures = {"peak_rss_bytes": _peak_rss_bytes() if hooks.rss_reset else None, "nested": nested}
    torch = _cuda(hooks)  # a first CUDA call may have come inside the window
    if torch is not None:
        figures["peak_gpu_bytes"] = sum(torch.cuda.max_memory_reserved(index) for index in range(torch.cuda.device_count()))
    hooks.event(event="timed", target=target, seconds=seconds, **{k: v for k, v in figures.items() if v})


def _pick_model(spec: dict, args, kwargs, returned):
    if spec.get("model") == "return":
        return returned
    kw = spec.get("kw")
    if kw and kw in kwargs:
        return kwargs[kw]
    index = spec.get("arg", 0)
    if index < len(args):
        return args[index]
    raise RuntimeError(f"save hook: cannot find the model (arg {index} / kw {kw}) of {spec['after']}")


def wrap(hooks: Hooks, target: str, fn):
    timed = target in (hooks.cfg.get("time") or [])
    saves = [s for s in (hooks.cfg.get("save") or []) if s["after"] == target]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with timed_window(hooks, target) if timed else contextlib.nullcontext():
            returned = fn(*args, **kwargs)
        for spec in saves:
            obj = _pick_model(spec, args, kwargs, returned)
            if spec.get("torch_save"):
                # an in-memory object upstream never writes (GPTQ's `quantizers`: the grids)
                import torch

                torch.save(obj, spec["torch_save"])
                hooks.event(event="saved", target=target, file=spec["torch_save"])
                continue
            obj.save_pretrained(spec["dir"], safe_serialization=spec.get("safetensors", True))
            hooks.saved = True
            hooks.event(event="saved", target=target, dir=spec["dir"])
        return returned

    return wrapper


def _targets(hooks: Hooks) -> set[str]:
    return set(hooks.cfg.get("time") or []) | {s["after"] for s in hooks.cfg.get("save") or []}


def patch_modules(hooks: Hooks) -> None:
    for target in sorted(_targets(hooks)):
        module_name, _, attr = target.partition(":")
        if module_name == "__main__":
            continue
        owner = importlib.import_module(module_name)
        *path, name = attr.split(".")  # `module:Class.method` wraps a method on its class
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, wrap(hooks, target, getattr(owner, name)))


def patch_main(hooks: Hooks, namespace: dict) -> None:
    for target in sorted(_targets(hooks)):
        module_name, _, attr = target.partition(":")
        if module_name != "__main__":
            # a `from module import fn` in the script bound the wrapped function already
            continue
        if attr not in namespace:
            raise RuntimeError(f"hook target {target}: the script defines no '{attr}' before its main guard")
        namespace[attr] = wrap(hooks, target, namespace[attr])


def no_pdb() -> None:
    import pdb

    def set_trace(*_a, **_k):
        raise PdbCalled("upstream called pdb.set_trace() (OmniQuant does on a NaN loss); failing instead of hanging")

    pdb.set_trace = set_trace
    sys.breakpointhook = set_trace


# ----------------------------------------------------------------------------- cuda on cpu

def _is_cuda(device) -> bool:
    # "cuda", "cuda:0" and torch.device("cuda", 0) all print as cuda[:N]
    return str(device).partition(":")[0] == "cuda"


class NoAutocast(contextlib.ContextDecorator):
    """What a disabled `torch.cuda.amp.autocast()` is on the CPU: nothing, as a `with` or a decorator."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def cuda_to_cpu(hooks: Hooks, half_to_float: bool = True) -> None:
    """Enter, for the rest of the process, a torch function mode that runs upstream's CUDA calls on the CPU
    (and its fp16 as fp32 unless `half_to_float` is False; the module docstring says why)."""
    import torch
    from torch.overrides import TorchFunctionMode

    cpu, half, full = torch.device("cpu"), torch.float16, torch.float32
    to_methods = {torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones,
                  torch.Tensor.new_full, torch.Tensor.new_tensor}
    identity = {torch.Tensor.pin_memory}
    # reinterpretations of raw bytes keep the dtype they name: safetensors reads an fp16 checkpoint as
    # `asarray(bytes, uint8).view(dtype=float16)` (0.8; older: `frombuffer(dtype=float16)`), which as fp32 would
    # read half as many values ("shape '[32000, 2048]' is invalid", an fp16 LLaMA on a CPU job)
    reinterpret = {torch.Tensor.view, torch.frombuffer, torch.from_file}

    class CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in identity:
                return args[0]
            if func is torch.Tensor.cuda:
                return _moved(args[0])
            moved = func is torch.Tensor.to and (_is_cuda(kwargs.get("device")) or any(_is_cuda(a) for a in args[1:]))
            if _is_cuda(kwargs.get("device")):
                kwargs = {**kwargs, "device": cpu}
            if func in to_methods and any(_is_cuda(a) for a in args[1:]):
                args = tuple(cpu if _is_cuda(a) else a for a in args)
            if half_to_float:
                if func is torch.Tensor.half:
                    func, args, kwargs = torch.Tensor.float, args[:1], {}
                if kwargs.get("dtype") is half and func not in reinterpret:
                    kwargs = {**kwargs, "dtype": full}
                if func in to_methods:
                    args = (args[0], *(full if a is half else a for a in args[1:]))
            result = func(*args, **kwargs)
            recast = half_to_float and isinstance(result, torch.nn.Parameter) and _casts(func, args, kwargs)
            if args and result is args[0] and (moved or recast):
                # upstream's fp16 Parameter, fp32 here: its cast to fp32 would have been a new plain tensor on a GPU
                # (OmniQuant's `qlayer.float()` before training, which then reassigns the weights it holds as buffers)
                return _moved(result)
            return result

    def _casts(func, args, kwargs) -> bool:
        return func is torch.Tensor.float or func is torch.Tensor.to and (
            kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in args[1:]))

    def _moved(tensor):
        # on a GPU, moving a CPU tensor to CUDA makes a new tensor, and a Parameter's is a plain one: OmniQuant keeps
        # weights as buffers holding Parameters and relies on `.to(dev)` making them plain tensors it can reassign
        return tensor.clone()

    def constant(name, value):
        # one function object per name: torch._dynamo indexes torch.cuda's functions by identity
        def fn(*_a, **_k):
            return value

        fn.__name__ = fn.__qualname__ = name
        return fn

    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats", "reset_max_memory_allocated", "set_device"):
        setattr(torch.cuda, name, constant(name, None))
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved", "current_device"):
        setattr(torch.cuda, name, constant(name, 0))

    def autocast(enabled=True, dtype=torch.float16, cache_enabled=True):
        # upstream trains under CUDA fp16 autocast (OmniQuant); CPU autocast at the same dtype keeps its dtype mix legal
        if half_to_float and dtype is half:
            enabled = False  # everything is fp32 already
        if not enabled:
            # not a disabled torch.autocast: torch 2.1's CPU autocast refuses a float16 dtype even when disabled
            # ("AutocastCPU only support Bfloat16", found running OmniQuant's image)
            return NoAutocast()
        return torch.autocast("cpu", dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    torch.cuda.amp.autocast = autocast
    if half_to_float:
        set_default_dtype = torch.set_default_dtype

        def set_default(dtype):
            # transformers' from_pretrained(torch_dtype=float16) builds the model under this default
            return set_default_dtype(full if dtype is half else dtype)

        torch.set_default_dtype = set_default
    CudaToCpu().__enter__()
    hooks.event(event="cuda_to_cpu", torch=torch.__version__, half_to_float=half_to_float)


# ----------------------------------------------------------------------------- the script

def _is_main_guard(node: ast.stmt) -> bool:
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    parts = [node.test.left, *node.test.comparators]
    names = [p for p in parts if isinstance(p, ast.Name) and p.id == "__name__"]
    consts = [p for p in parts if isinstance(p, ast.Constant) and p.value == "__main__"]
    return bool(names and consts)


def run_script(hooks: Hooks, script: str, argv: list[str]) -> None:
    with open(script) as f:
        source = f.read()
    tree = ast.parse(source, filename=script)
    guard = next((i for i, node in enumerate(tree.body) if _is_main_guard(node)), None)
    if guard is None and any(t.startswith("__main__:") for t in _targets(hooks)):
        raise RuntimeError(f"{script} has no `if __name__ == '__main__':` block to hook __main__ functions into")
    head = tree.body if guard is None else tree.body[:guard]
    tail = [] if guard is None else tree.body[guard:]
    namespace = {"__name__": "__main__", "__file__": os.path.abspath(script), "__builtins__": __builtins__}
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    main_module = type(sys)("__main__")
    main_module.__dict__.update(namespace)
    namespace = main_module.__dict__
    sys.modules["__main__"] = main_module  # pickles of classes defined in the script resolve
    exec(compile(ast.Module(body=head, type_ignores=[]), script, "exec"), namespace)
    patch_main(hooks, namespace)
    if tail:
        exec(compile(ast.Module(body=tail, type_ignores=[]), script, "exec"), namespace)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run an upstream script with llmcbench hooks")
    ap.add_argument("--hooks", help="hooks JSON written by the driver")
    ap.add_argument("--versions", action="store_true", help="print this interpreter's versions as JSON and exit")
    a = ap.parse_args(argv)
    if a.versions:
        print(json.dumps(interpreter_versions()))
        return 0
    if not a.hooks:
        ap.error("--hooks is required")
    with open(a.hooks) as f:
        cfg = json.load(f)
    hooks = Hooks(cfg)
    hooks.event(event="environment", **interpreter_versions())
    # upstream's own packages (lib/, smoothquant/, awq/, LLMPruner/) come from PYTHONPATH (the checkout)
    patch_datasets(hooks)
    if cfg.get("no_pdb"):
        no_pdb()
    if cfg.get("cuda_to_cpu"):
        cuda_to_cpu(hooks, cfg.get("half_to_float", True) is not False)
    if cfg.get("warm_up_vml"):
        warm_up_vml(hooks, cfg["warm_up_vml"])
    try:
        patch_modules(hooks)
        run_script(hooks, cfg["script"], list(cfg.get("argv") or []))
    except DatasetNotStaged as e:
        if model_written(hooks):
            hooks.event(event="stopped", reason=str(e))
            print(f"[llmcbench-shim] model saved; stopping at upstream's next step: {e}", flush=True)
            return 0
        print(f"DatasetNotStaged: {e}", file=sys.stderr, flush=True)
        return EXIT_NOT_STAGED
    except PdbCalled as e:
        print(f"PdbCalled: {e}", file=sys.stderr, flush=True)
        return EXIT_PDB
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
