"""Scores of a stellar classifier in S/N bins: the paper's Tables 4/5 and a confusion matrix. Pure numpy."""

from __future__ import annotations

import numpy as np

SNR_BINS: tuple[tuple[str, float, float], ...] = (
    (">30", 30.0, np.inf), ("20-30", 20.0, 30.0), ("10-20", 10.0, 20.0), ("<10", -np.inf, 10.0))
"""The paper's S/N_r bins (label, low, high)."""


def scores(truth: np.ndarray, predicted: np.ndarray, snr: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Accuracy and per-class precision (and recall) in each S/N bin and overall.

    Parameters
    ----------
    truth, predicted : ndarray of int, shape (n,)
        Class indices (``predicted`` -1: no label, counted as wrong).
    snr : ndarray, shape (n,)
    classes : tuple of str

    Returns
    -------
    dict
        ``{bin: {"n": .., "accuracy": .., "precision": {class: ..}, "recall": {class: ..}}}`` with
        bins of :data:`SNR_BINS` plus ``"all"``; a precision with no prediction of that class is None.
    """
    out = {}
    for name, lo, hi in SNR_BINS + (("all", -np.inf, np.inf),):
        sel = (snr > lo) & (snr <= hi) if name != "all" else np.ones(truth.shape, bool)
        t, p = truth[sel], predicted[sel]
        entry = {"n": int(sel.sum()), "accuracy": float((t == p).mean()) if sel.any() else None,
                 "precision": {}, "recall": {}}
        for k, c in enumerate(classes):
            said, real = p == k, t == k
            entry["precision"][c] = float((t[said] == k).mean()) if said.any() else None
            entry["recall"][c] = float((p[real] == k).mean()) if real.any() else None
        out[name] = entry
    return out


def confusion(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]`` (a prediction of -1 is left out)."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    ok = predicted >= 0
    np.add.at(m, (truth[ok], predicted[ok]), 1)
    return m


def format_table(results: dict[str, dict], classes: tuple[str, ...]) -> str:
    """Markdown table: one row per method and S/N bin, accuracy then each class's precision."""
    head = "| method | S/N_r | n | ACC | " + " | ".join(f"P({c})" for c in classes) + " |"
    lines = [head, "|" + "---|" * (4 + len(classes))]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for method, table in results.items():
        for name, _, _ in SNR_BINS + (("all", 0, 0),):
            e = table[name]
            lines.append(f"| {method} | {name} | {e['n']} | {fmt(e['accuracy'])} | "
                         + " | ".join(fmt(e["precision"][c]) for c in classes) + " |")
    return "\n".join(lines)


def format_confusion(matrix: np.ndarray, classes: tuple[str, ...]) -> str:
    """Markdown confusion matrix (rows: truth, columns: predicted)."""
    lines = ["| true \\ predicted | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1)]
    for c, row in zip(classes, matrix):
        lines.append(f"| {c} | " + " | ".join(str(int(v)) for v in row) + " |")
    return "\n".join(lines)
