"""Run profiles: `paper` reproduces the paper's settings, `quick` fits the embedded default
into a few minutes on two CPU cores. Every report states the profile that produced it.

`quick` figures were chosen by measurement on the embedded model (2 cores): calibration
16 x 128 tokens of C4, 20 examples per track-1 task, WikiText-2 ppl over the first 8
windows of 512 tokens; track 6 10 examples per task, track 7 5 per task with 16-token answers. They are smoke-test settings: the numbers are noisy and are not
comparable with the paper's, only with other quick runs.
"""

from __future__ import annotations

from dataclasses import dataclass

TRACK1_TASKS = ["mmlu", "arc_c", "arc_e", "hellaswag", "piqa", "winogrande", "qnli", "mnli"]
KNOWN_TRACKS = {1, 2, 3, 4, 5, 6, 7}  # track 5 in a bench: the torch_native deploy backend (`llmcbench deploy --backend` picks others)


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
    trust_limit: int | None = None  # track 6: examples per AdvGLUE task / TruthfulQA (None: full)
    kick_limit: int | None = None  # track 7: examples per LLM-KICK task (MMLU: per subject)
    max_new_tokens: int = 32  # track 7: greedy answer budget
    deploy_new_tokens: int = 256  # track 5: decoded tokens per timed run (SPEC protocol)
    deploy_repeats: int = 5  # track 5: timed runs, the median is the figure
    deploy_batch_sizes: tuple[int, ...] = (1, 8)  # track 5: batch 1 (the figure) and a throughput batch

    def limit_for(self, tracks: list[int]) -> int | None:
        """Examples per task of one evaluation job (its tracks are one group of bench.EVAL_GROUPS)."""
        if 6 in tracks:
            return self.trust_limit
        if 7 in tracks:
            return self.kick_limit
        return self.task_limit


PROFILES = {
    "quick": Profile("quick", calib_nsamples=16, calib_seqlen=128, task_limit=20, ppl_seqlen=512, ppl_max_windows=8, batch_size=16,
                     time_limit_s=1800, trust_limit=10, kick_limit=5, max_new_tokens=16,
                     deploy_new_tokens=32, deploy_repeats=3, deploy_batch_sizes=(1, 4)),
    "paper": Profile("paper", calib_nsamples=None, calib_seqlen=None, task_limit=None, ppl_seqlen=2048, ppl_max_windows=None, batch_size=16, time_limit_s=48 * 3600),
}
