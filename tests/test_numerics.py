"""MKL VML's first-call race (driver/numerics.py): the premise, the replayed damage, the warm-up.

The race itself cannot be triggered on demand (pytorch/pytorch#188792 needed thousands of
spawned processes; 180 fresh processes on this 2-core machine gave none), so these tests check
what the fix rests on: torch computes `cos` with MKL VML at high accuracy, VML's low-accuracy
kernel gives other floats, one such chunk of a LLaMA's rotary table changes SparseGPT's weights,
and every job warms VML up before its first multi-threaded op.
"""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

from llmcbench.driver.numerics import VML_OPS, WARM_UP_VALUES, warm_up_vml

VML_HA, VML_EP = 0x2, 0x3  # mkl_vml_defines.h


def _vml_cos(x: torch.Tensor, mode: int) -> torch.Tensor:
    """MKL's own vsCos (its Fortran entry, which the torch wheel exports) on a contiguous float32 tensor."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    entry = getattr(lib, "VMSCOS_", None)
    if entry is None:
        pytest.skip("this torch build exports no MKL VML entry points to compare with")
    out = torch.empty_like(x)
    n, m = ctypes.c_int(x.numel()), ctypes.c_longlong(mode)
    entry(ctypes.byref(n), ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.byref(m))
    return out


@pytest.fixture(scope="module")
def rotary_angles():
    """The embedded SmolLM2's rotary angles for 128 positions (theta 1e5, head dim 64): 8192 values."""
    if not torch.backends.mkl.is_available():
        pytest.skip("torch without MKL: no VML, nothing to race")
    inv = 1.0 / (100000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    return torch.outer(torch.arange(128, dtype=torch.float32), inv).repeat(1, 2).contiguous()


def _one_kernel_for_every_mode(angles: torch.Tensor) -> bool:
    """On some CPUs (the AMD EPYC of some CI machines) MKL computes the same floats at every
    accuracy mode: there the race has no other kernel to run."""
    return torch.equal(_vml_cos(angles, VML_EP), _vml_cos(angles, VML_HA))


def test_torch_computes_cos_with_mkl_vml_at_high_accuracy(rotary_angles):
    assert torch.equal(rotary_angles.cos(), _vml_cos(rotary_angles, VML_HA))  # VML's HA kernel, bit for bit


def test_the_low_accuracy_kernel_a_race_can_run_gives_other_floats(rotary_angles):
    if _one_kernel_for_every_mode(rotary_angles):
        pytest.skip("MKL computes cos with one kernel at every accuracy mode on this CPU: the race "
                    "cannot give other floats here (seen on an AMD EPYC)")
    err = (_vml_cos(rotary_angles, VML_EP) - _vml_cos(rotary_angles, VML_HA)).abs()
    assert err.max() > 1e-5 and (err > 0).float().mean() > 0.5


def _low_accuracy_cos(angles: torch.Tensor) -> torch.Tensor:
    """VML's EP kernel where this CPU has one; where MKL runs one kernel for every mode, a stand-in
    of the same size of error: cos rounded to float16 (errors up to 2.4e-4; EP's reach 1.5e-4)."""
    if _one_kernel_for_every_mode(angles):
        return angles.cos().half().float()
    return _vml_cos(angles, VML_EP)


def test_one_low_accuracy_rotary_chunk_changes_sparsegpt_weights(tiny_llama_dir):
    """SparseGPT's reference engine on the tiny LLaMA, its first `cos` right and then with the
    second thread's half from VML's EP kernel (the damage the race did in CI; a stand-in of its
    size on a CPU where MKL has one kernel): other weights."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    from llmcbench.methods.sparsegpt.reference import compress

    calibration = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    original = modeling_llama.LlamaRotaryEmbedding.forward

    def run(damage: bool) -> dict[str, torch.Tensor]:
        first = [True]

        def forward(self, x, position_ids):
            cos, sin = original(self, x, position_ids)
            if damage and first[0]:
                first[0] = False
                freqs = (self.inv_freq[None, :, None].float() @ position_ids[:1, None, :].float()).transpose(1, 2)
                angles = torch.cat((freqs, freqs), dim=-1).contiguous()
                assert torch.equal(angles.cos() * self.attention_scaling, cos[:1])
                flat = cos.clone().reshape(-1)
                half = flat.numel() // 2
                low = _low_accuracy_cos(angles)
                assert 1e-5 < (low - angles.cos()).abs().max() < 1e-3
                flat[half:] = (low * self.attention_scaling).reshape(-1).repeat(cos.shape[0])[half:]
                cos = flat.reshape(cos.shape)
            return cos, sin

        modeling_llama.LlamaRotaryEmbedding.forward = forward
        try:
            model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
            compress(model, calibration, {"pattern": "unstructured", "sparsity": 0.5}, torch.device("cpu"))
        finally:
            modeling_llama.LlamaRotaryEmbedding.forward = original
        return {k: v.clone() for k, v in model.state_dict().items()}

    clean, again, damaged = run(False), run(False), run(True)
    assert all(torch.equal(clean[k], again[k]) for k in clean)  # deterministic without the race
    assert any(not torch.equal(clean[k], damaged[k]) for k in clean)


def test_warm_up_resolves_the_ops_llama_models_use():
    if not torch.backends.mkl.is_available():
        pytest.skip("torch without MKL: warm_up_vml has nothing to do")
    called = warm_up_vml()
    assert {"cos", "sin", "exp", "log", "sqrt", "rsqrt", "tanh", "erf"} <= set(called)
    assert set(called) <= set(VML_OPS)
    assert WARM_UP_VALUES < 2048  # below ATen's parallel grain: one thread makes each first call
