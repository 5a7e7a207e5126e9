"""The consoles every CLI verb prints through (stdout, and stderr for the one-line errors).

In a terminal rich fits a table to the window. Written to a file or a pipe (`llmcbench deploy
... | tee deploy.log`, a Slurm job's log, CI), rich assumes 80 columns, and a wide table such
as track 5's nine columns or the model registry's wraps every cell into a tall column that no
one can read back. There the consoles are PIPED_WIDTH wide: a table keeps its natural width
(rich tables do not expand), a long note wraps only past that. COLUMNS, when set, wins.
"""

from __future__ import annotations

import os

from rich.console import Console

PIPED_WIDTH = 320


def make_console(stderr: bool = False) -> Console:
    console = Console(highlight=False, stderr=stderr)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = PIPED_WIDTH
    return console


console = make_console()
err_console = make_console(stderr=True)


def print_error(message: str) -> None:
    """Bad input's one red line on stderr. The message is escaped: it quotes what the user typed,
    and rich would take `--device 'cuda[red]'` as a style tag and print `cuda`."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
