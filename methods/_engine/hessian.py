"""The layer Hessian shared by the second-order (OBS-family) reference engines: SparseGPT
and GPTQ.

Both methods minimise, per linear layer with weights W (out x in) and calibration inputs X
(in x tokens), the reconstruction error ||W X - W' X||^2 row by row. Its Hessian with
respect to a row is H = 2 X X^T, the same for every row, and both algorithms walk the
columns of W with the Cholesky factor of H^-1. Two pieces are the same in both upstream
files (IST-DASLab/sparsegpt `sparsegpt.py` and IST-DASLab/gptq `gptq.py`), so they live here:

- `LayerHessian.add_batch`: upstream `add_batch`. H is kept as the running mean over
  calibration sequences of 2 x x^T (summed over each sequence's tokens): with n sequences
  seen, H_n = 2/n * sum_s X_s X_s^T. Upstream feeds one sequence at a time; a batch of
  sequences here only changes the float summation order.
- `prepare_hessian` + `inverse_hessian_cholesky`: upstream's preamble of
  `fasterprune`/`fasterquant`. An input channel that never fired (H_jj == 0, "dead") gets
  H_jj = 1 and its weights are zeroed by the caller; H is dampened by `percdamp` times its
  mean diagonal (lambda in the GPTQ paper, section 3 "Cholesky reformulation"); the result
  is the upper Cholesky factor U of (H + lambda I)^-1, i.e. U^T U = H^-1. Row i of U, from
  the diagonal on, is exactly the vector OBS needs when column i is eliminated after
  columns 0..i-1 (GPTQ paper eq. 3 and the Cholesky form of section 3).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class HessianError(ValueError):
    """The dampened Hessian is not positive definite."""


class LayerHessian:
    """H = 2/n sum_s X_s X_s^T over the n calibration sequences a linear has seen
    (upstream `add_batch`), in float32 on the linear's device."""

    def __init__(self, linear: nn.Linear):
        columns = linear.in_features
        self.hessian = torch.zeros((columns, columns), dtype=torch.float32, device=linear.weight.device)
        self.nsamples = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        sequences = inputs.shape[0] if inputs.ndim == 3 else 1
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        self.hessian *= self.nsamples / (self.nsamples + sequences)
        self.nsamples += sequences
        x = math.sqrt(2 / self.nsamples) * x
        self.hessian.addmm_(x.t(), x)


def prepare_hessian(hessian: torch.Tensor) -> torch.Tensor:
    """Mark the dead input channels (H_jj == 0) and set their H_jj to 1, in place.
    Returns the dead mask; the caller zeroes those columns of W, as upstream does."""
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    return dead


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float, layer: str = "layer") -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1 with lambda = percdamp * mean(diag H).

    Dampens `hessian` in place (upstream consumes its H the same way). A factorisation
    failure is re-raised as a `HessianError` naming the layer and the fix.
    """
    damp = percdamp * torch.mean(torch.diag(hessian))
    diagonal = torch.arange(hessian.shape[0], device=hessian.device)
    hessian[diagonal, diagonal] += damp
    try:
        lower = torch.linalg.cholesky(hessian)
        inverse = torch.cholesky_inverse(lower)
        return torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError:
        raise HessianError(
            f"{layer}: the dampened Hessian is not positive definite: raise percdamp (now {percdamp}) "
            "or calibrate on more tokens"
        ) from None
