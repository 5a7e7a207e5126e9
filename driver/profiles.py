"""Run profiles: `paper` reproduces the paper's settings, `quick` fits the embedded default
into a few minutes on two CPU cores. Every report states the profile that produced it.

`quick` figures were chosen by measurement on the embedded model (2 cores): calibration
16 x 128 tokens of C4, 20 examples per track-1 task, WikiText-2 ppl over the first 8
windows of 512 tokens. They are smoke-test settings: the numbers are noisy and are not
comparable with the paper's, only with other quick runs.
"""

from __future__ import annotations

from dataclasses import dataclass

TRACK1_TASKS = ["mmlu", "arc_c", "arc_e", "hellaswag", "piqa", "winogrande", "qnli", "mnli"]
KNOWN_TRACKS = {1, 3, 4}  # tracks this version can run; 2, 5, 6, 7 arrive with their issues


@dataclass(frozen=True)
class Profile:
    name: str
    calib_nsamples: int | None  # None: the method's upstream default
    calib_seqlen: int | None
    task_limit: int | None
    ppl_seqlen: int
    ppl_max_windows: int | None
    batch_size: int
    time_limit_s: int


PROFILES = {
    "quick": Profile("quick", calib_nsamples=16, calib_seqlen=128, task_limit=20, ppl_seqlen=512, ppl_max_windows=8, batch_size=16, time_limit_s=1800),
    "paper": Profile("paper", calib_nsamples=None, calib_seqlen=None, task_limit=None, ppl_seqlen=2048, ppl_max_windows=None, batch_size=16, time_limit_s=48 * 3600),
}
