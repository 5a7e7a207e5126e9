"""From job results to scoring records: the one place that maps what a job measured
(`result.json` metrics, in bytes and seconds) to the catalogue's metrics and units
(`tracks.scoring.METRICS`: %, ppl, GB, TMACs, minutes)."""

from __future__ import annotations

from typing import Any

from .scoring import METRICS, MetricRecord

GB = 1e9


def eval_records(metrics: dict[str, Any], model: str, method: str, setting: str) -> list[MetricRecord]:
    out: list[MetricRecord] = []

    def add(track: int, metric: str, value: float) -> None:
        out.append(MetricRecord(track=track, model=model, method=method, setting=setting, metric=metric, value=float(value)))

    t1 = metrics.get("track1")
    if t1:
        for dataset, r in t1["tasks"].items():
            add(1, dataset, r["accuracy_pct"])
        add(1, "wikitext2_ppl", t1["wikitext2"]["ppl"])
    t2 = metrics.get("track2")
    if t2:
        add(2, "wikitext2_ppl", t2["wikitext2"]["ppl"])
    t4 = metrics.get("track4")
    if t4:
        add(4, "gpu_memory_gb", t4["inference_memory_bytes"] / GB)
        add(4, "model_size_gb", t4["model_size_bytes"] / GB)
        add(4, "tmacs", t4["macs"]["effective_macs"] / 1e12)
    t5 = metrics.get("track5")
    if t5:  # decode tokens/s at batch 1, under the backend's own name
        add(5, t5["backend"], t5["tokens_per_s"])
    # Tracks 6 and 7 record their metrics under the catalogue's names (in %, or judge scores);
    # a metric the evaluation could not score (e.g. no judge configured) is absent, not 0.
    for track in (6, 7):
        for metric, value in (metrics.get(f"track{track}") or {}).items():
            if (track, metric) in METRICS and isinstance(value, (int, float)):
                add(track, metric, value)
    return out


def track4_memory_note(metrics: dict[str, Any]) -> str | None:
    """How a compressed model's track-4 inference memory was measured, where it is not simply
    its checkpoint as loaded (tracks.inference.measure.eval_inference_memory)."""
    t4 = metrics.get("track4") or {}
    if t4.get("inference_memory_checkpoint_bytes") is not None:
        kernel = t4["inference_memory_form"].removeprefix("packed export on ")
        return (f"track 4: the inference memory is the packed export's, held as integer codes on torch's kernels "
                f"({kernel}); the dequantized checkpoint, which the accuracy tracks run, takes "
                f"{t4['inference_memory_checkpoint_bytes'] / GB:.4f} GB")
    if t4.get("inference_memory_note"):
        return f"track 4: {t4['inference_memory_note']}"
    return None


def judge_records(judged: dict | None, model: str, method: str, setting: str) -> tuple[list[MetricRecord], list[MetricRecord]]:
    """(dense, compressed) records of a pairwise judgement (`judge.json` beside the compressed
    track-7 result): each answer pair is scored together, so the compressed model's mean score
    is recorded in % of the dense model's in the same judgement, and dense is 100."""
    if not judged or not judged.get("mean_a") or not judged.get("mean_b"):
        return [], []
    metric = judged.get("metric", "kick_instruction")
    return ([MetricRecord(track=7, model=model, method="dense", setting="dense", metric=metric, value=100.0)],
            [MetricRecord(track=7, model=model, method=method, setting=setting, metric=metric,
                          value=100.0 * judged["mean_a"] / judged["mean_b"])])


def compress_records(metrics: dict[str, Any], model: str, method: str, setting: str) -> list[MetricRecord]:
    """Track 3: time of the compression step alone and its peak memory: the GPU's where it ran
    on one (SPEC 5: the peak reserved by the process), the host's on a CPU. A CUDA run without
    a GPU figure (a result from before the upstream engine's shim took one) gets no memory
    cell: its host RSS beside other methods' GPU memory would set or skew M_max, so its
    OM_train is left unscored rather than computed from the wrong quantity."""
    t3 = metrics["track3"]
    out = [MetricRecord(track=3, model=model, method=method, setting=setting, metric="compress_time_min", value=t3["compress_s"] / 60)]
    gpu = t3.get("compress_peak_gpu_bytes")
    if gpu or not str(t3.get("device", "")).startswith("cuda"):
        memory = gpu or t3["compress_peak_rss_bytes"]
        out.append(MetricRecord(track=3, model=model, method=method, setting=setting, metric="compress_memory_gb", value=memory / GB))
    return out
