"""Parameter checks every reference engine's `Settings.from_params` shares: the unknown-key
check, the speed-only `calibration_batch_size`, and the pruning engines' sparsity pattern
("unstructured", "n:m", or upstream's "2:4" spelling). Error messages start with the method's
name, as the driver shows them to the user."""

from __future__ import annotations

from typing import Any


def reject_unknown(method: str, params: dict[str, Any], allowed: set[str]) -> None:
    """A ValueError naming every key of `params` not in `allowed`."""
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"{method}: unknown parameter(s) {', '.join(unknown)}: allowed are {', '.join(sorted(allowed))}")


def calibration_batch_size(method: str, params: dict[str, Any]) -> int | None:
    """`calibration_batch_size`: None (the runner's default) or a positive integer."""
    batch = params.get("calibration_batch_size")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"{method}: calibration_batch_size must be a positive integer, got {batch!r}")
    return batch


def sparsity_pattern(method: str, params: dict[str, Any]) -> tuple[str, Any, Any]:
    """(pattern, n, m): pattern "unstructured" or "n:m"; an N:M spelling like "2:4" (upstream's
    --sparsity_type / --prunen --prunem) sets n and m, which must then agree with any given.
    n and m are returned unchecked (see `check_n_m`)."""
    pattern = str(params.get("pattern", "unstructured")).strip().lower()
    n, m = params.get("n"), params.get("m")
    if ":" in pattern and pattern != "n:m":
        try:
            pn, pm = (int(x) for x in pattern.split(":"))
        except ValueError:
            raise ValueError(f"{method}: pattern '{pattern}' is not 'unstructured', 'n:m' or N:M like '2:4'") from None
        if (n is not None and n != pn) or (m is not None and m != pm):
            raise ValueError(f"{method}: pattern '{pattern}' contradicts n={n}, m={m}")
        pattern, n, m = "n:m", pn, pm
    if pattern not in ("unstructured", "n:m"):
        raise ValueError(f"{method}: pattern '{pattern}' is not 'unstructured', 'n:m' or N:M like '2:4'")
    return pattern, n, m


def check_n_m(method: str, n: Any, m: Any) -> None:
    """N:M pruning needs positive integers n < m."""
    for key, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{method}: N:M pruning needs positive integers n and m, got {key}={value!r}")
    if n >= m:
        raise ValueError(f"{method}: N:M pruning needs n < m, got {n}:{m}")


def sparsity_value(method: str, sparsity: Any) -> float:
    """The target sparsity, a number in [0, 1) (None: not given)."""
    if sparsity is None:
        raise ValueError(f"{method}: unstructured pruning needs a sparsity in [0, 1), e.g. 0.5")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"{method}: sparsity must be a number in [0, 1), got {sparsity!r}")
    sparsity = float(sparsity)
    if not 0 <= sparsity < 1:
        raise ValueError(f"{method}: sparsity {sparsity} is out of range: it must be in [0, 1)")
    return sparsity


def blocksize(method: str, params: dict[str, Any]) -> int:
    """The OBS engines' lazy-batch `blocksize` (upstream 128)."""
    value = params.get("blocksize", 128)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{method}: blocksize must be a positive integer, got {value!r}")
    return value


def percdamp(method: str, params: dict[str, Any]) -> float:
    """The OBS engines' Hessian dampening `percdamp` (upstream 0.01), as a float."""
    value = params.get("percdamp", 0.01)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{method}: percdamp must be a positive number (upstream 0.01), got {value!r}")
    return float(value)
