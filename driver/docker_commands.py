"""CLI commands for containers: `llmcbench images build|list|lock` and `llmcbench doctor`.

Registered onto the main Typer app by driver/cli.py (`register(app)`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .consoles import console, print_error
from .errors import UserError

images_app = typer.Typer(no_args_is_help=True, help="Container images: base, one per method, eval (images/).")


def _fail(exc: Exception) -> None:
    print_error(str(exc))
    raise typer.Exit(getattr(exc, "exit_code", 2))


def _log(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}", soft_wrap=True)


@images_app.command("build")
def images_build(
    targets: Optional[list[str]] = typer.Argument(None, help="method names, eval, base, all (default: base, eval and every method), or a deploy backend image: deploy-vllm, deploy-vllm-cpu, deploy-tensorrt_llm, deploy-mlc_llm"),
    force: bool = typer.Option(False, "--force", help="rebuild even if an image with the same inputs exists (no layer cache)"),
    upstream: bool = typer.Option(True, "--upstream/--no-upstream", help="try to fetch the upstream repository into method images"),
):
    """Build images, tagged by the hash of their inputs; images already built for the same inputs are reused."""
    from . import images

    t0 = time.perf_counter()
    try:
        for target in targets or ["all"]:  # every typo said before the first build (they take minutes)
            images.resolve_target(target)
        built, seen = [], set()
        for target in targets or ["all"]:
            for b in images.build(target, force=force, upstream=upstream, log=_log):
                if b.spec.tag not in seen:
                    seen.add(b.spec.tag)
                    built.append(b)
    except UserError as e:
        _fail(e)
    t = Table(title=f"images ({time.perf_counter() - t0:.0f} s)")
    for col in ("image", "id", "size", "build", "upstream"):
        t.add_column(col)
    for b in built:
        up = "" if not b.upstream else ("fetched" if b.upstream.get("fetched") else "not fetched (reference engine only)")
        t.add_row(b.spec.tag, b.id.removeprefix("sha256:")[:12], f"{b.size_bytes / 1e9:.2f} GB",
                  "reused" if b.cached else f"{b.build_s:.0f} s", up)
    console.print(t)


@images_app.command("list")
def images_list():
    """The images for the current sources and pins: built or not."""
    from . import images
    from .dockerhost import connect

    try:
        client = connect()
        specs = images.specs_for(client, "all")
    except UserError as e:
        _fail(e)
    t = Table(title="images for the current sources")
    for col in ("target", "image", "state", "size"):
        t.add_column(col)
    for s in specs:
        iid = images._image_id(client, s.tag)
        size = f"{client.images.get(iid).attrs.get('Size', 0) / 1e9:.2f} GB" if iid else ""
        t.add_row(s.target, s.tag, "[green]built[/green]" if iid else f"[red]missing[/red] (llmcbench images build {s.target})", size)
    console.print(t)


@images_app.command("prune")
def images_prune():
    """Remove this project's images built from other sources or pins than the current ones (a
    target's newest old image stays until its current one is built: that build reuses its layers),
    and first the job containers no driver runs (a dead driver's), which would keep their images."""
    from . import images
    from .dockerhost import connect
    from .runners.docker import remove_left_containers

    try:
        client = connect()
        containers = remove_left_containers(client, log=_log)
        removed = images.prune(client, log=_log)
    except UserError as e:
        _fail(e)
    console.print(f"removed {len(containers)} job container(s) left by a driver that died and {len(removed)} image tag(s); "
                  "`docker image prune` frees their untagged layers")


@images_app.command("lock")
def images_lock():
    """Rewrite images/constraints.txt: the image layers' packages pinned to this host's versions."""
    from . import images

    try:
        images.lock(_log)
    except UserError as e:
        _fail(e)


def doctor(runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="the result store (for its free disk)")):
    """What this machine can run: Docker, NVIDIA runtime, GPUs, disk, images; which runners and engines, and why not."""
    from .doctor import diagnose

    d = diagnose(runs_dir)
    t = Table(title="llmcbench doctor")
    t.add_column("check")
    t.add_column("")
    t.add_column("detail", overflow="fold")
    mark = {True: "[green]ok[/green]", False: "[red]no[/red]", None: "[dim]-[/dim]"}
    for c in d.checks:
        t.add_row(c.name, mark[c.ok], escape(c.detail))
    console.print(t)
    v = Table(title="what this machine can use")
    v.add_column("runner / engine")
    v.add_column("")
    v.add_column("why", overflow="fold")
    for x in d.verdicts:
        v.add_row(x.what, "[green]yes[/green]" if x.usable else "[red]no[/red]", escape(x.why))
    console.print(v)


def register(app: typer.Typer) -> None:
    app.add_typer(images_app, name="images")
    app.command("doctor")(doctor)
