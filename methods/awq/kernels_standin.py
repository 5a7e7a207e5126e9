"""Stand-in for llm-awq's compiled CUDA kernels (`awq_inference_engine`), installed under that
name where they could not be built (no CUDA compiler matching torch's: a CPU base image, a
machine without nvcc).

Why it is enough: upstream imports the kernels unconditionally (awq/quantize/qmodule.py), even
for the scale search and fake quantization, but calls them only in `WQLinear.forward`, upstream's
own real-quant inference, which no job of this harness runs (searching, fake quantization and
packing are PyTorch code). Any call fails loudly, so no result can ever come from a missing
kernel. `methods/awq/build_kernels.sh` installs it in method images; benchmarks/device_check.sh
on a lent machine until its awq-kernels part compiles the real ones.
"""

STAND_IN = True


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)  # the import system's and tools' probes (__path__, __wrapped__, ...)
    raise RuntimeError(f"awq_inference_engine.{name}: llm-awq's CUDA kernels were not built here (no CUDA compiler "
                       "matching torch's when this environment was made); only upstream's real-quant inference needs them")
