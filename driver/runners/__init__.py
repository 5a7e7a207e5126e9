"""Runners execute one job under the volume contract: `local` here; `docker` and `slurm` plug in beside it."""

from __future__ import annotations

from ..errors import UserError


def get_runner(name: str):
    if name == "local":
        from .local import LocalRunner

        return LocalRunner()
    raise UserError(f"unknown runner '{name}': this version has 'local' (docker and slurm are planned)")
