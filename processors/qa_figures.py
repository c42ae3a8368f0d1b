"""The nightly QA figures and the target plot: arrays in, a matplotlib ``Figure`` out.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so
nothing depends on a display or on global state; the caller saves them (``fig.savefig(path)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from fiberlake.processors.qa_stats import SkyResiduals, SnrModel

WIDTH = 7.5
"""Figure width in inches (at 100 dpi, 750 px: two fit side by side on a wide screen)."""


def new_figure(height: float = 4.0, width: float = WIDTH) -> Figure:
    """An empty figure with the Agg canvas attached."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _exposure_colors(expids: np.ndarray) -> dict[int, tuple]:
    from matplotlib import colormaps

    unique = sorted(set(int(e) for e in expids))
    cmap = colormaps["tab10"]
    return {e: cmap(i % 10) for i, e in enumerate(unique)}


def snr_vs_mag(mag: np.ndarray, snr: np.ndarray, expid: np.ndarray, objtype: Sequence[str],
               models: Mapping[int, SnrModel | None], *, title: str) -> Figure:
    """Measured S/N per bin against catalogue magnitude, one colour per exposure, with the expected relation.

    Parameters
    ----------
    mag, snr, expid : ndarray
        One entry per spectrum (sky fibers excluded by the caller).
    objtype : sequence of str
        ``TGT`` (circles) or ``STD`` (stars).
    models : mapping of expid to SnrModel or None
        The expected relation of each exposure (its exposure time and sky set it), fitted on its
        points; drawn as a line of the exposure's colour.
    title : str
    """
    fig = new_figure(4.2)
    ax = fig.add_subplot()
    colors = _exposure_colors(expid)
    objtype = np.asarray(objtype)
    good = np.isfinite(mag) & (snr > 0)
    for e, color in colors.items():
        for kind, marker in (("TGT", "o"), ("STD", "*")):
            sel = good & (expid == e) & (objtype == kind)
            if sel.any():
                ax.scatter(mag[sel], snr[sel], s=28 if kind == "TGT" else 70, marker=marker, color=color,
                           edgecolor="k", linewidth=0.3, label=f"{e} {kind}", zorder=3)
    for e, model in models.items():
        sel = good & (expid == e)
        if model is None or not sel.any():
            continue
        m = np.linspace(np.nanmin(mag[sel]) - 0.3, np.nanmax(mag[sel]) + 0.3, 200)
        ax.plot(m, model(m), color=colors[int(e)], lw=1.3, zorder=2,
                label=f"{e} expected S/\u221a(S+B), B={model.background:.3g} e\u00b2")
    ax.set_yscale("log")
    ax.set_xlabel("catalogue magnitude")
    ax.set_ylabel("median S/N per bin")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    return fig


def sky_residuals(wave: np.ndarray, sky: np.ndarray, stats: SkyResiduals, *, title: str) -> Figure:
    """Sky model and the sky fibers' residuals after subtraction, by wavelength.

    Parameters
    ----------
    wave : ndarray (nwave,)
    sky : ndarray (nwave,)
        Median sky model subtracted (electrons per Angstrom).
    stats : SkyResiduals
        Residuals in units of their noise (chi).
    title : str
    """
    fig = new_figure(4.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1.4])
    top.plot(wave, sky, color="tab:blue", lw=0.7)
    top.set_ylabel("sky (e\u207b/\u00c5)")
    top.set_title(f"{title}  ({stats.n} sky spectra)")
    bottom.fill_between(wave, stats.p16, stats.p84, color="tab:orange", alpha=0.35, lw=0, label="16-84%")
    bottom.plot(wave, stats.median, color="tab:red", lw=0.7, label="median")
    bottom.plot(wave, stats.rms, color="k", lw=0.5, alpha=0.6, label="rms")
    for level in (-1, 0, 1):
        bottom.axhline(level, color="grey", lw=0.6, ls=":" if level else "-")
    finite = np.concatenate([v[np.isfinite(v)] for v in (stats.p16, stats.p84, stats.rms)] + [np.zeros(1)])
    lim = max(3.0, float(np.percentile(np.abs(finite), 99.5)) * 1.1)
    bottom.set_ylim(-lim, lim)
    bottom.set_ylabel("residual / \u03c3")
    bottom.set_xlabel("wavelength (\u00c5)")
    bottom.legend(fontsize=7, ncol=3, loc="upper right")
    return fig


def fiber_diagnostics(fiber: np.ndarray, wave_rms: np.ndarray, trace_offset: np.ndarray, expid: np.ndarray, *,
                      title: str) -> Figure:
    """Wavelength-solution RMS and trace offset per fiber (one colour per exposure).

    Parameters
    ----------
    fiber, wave_rms, trace_offset, expid : ndarray
        One entry per spectrum.
    title : str
    """
    fig = new_figure(4.4)
    top, bottom = fig.subplots(2, 1, sharex=True)
    colors = _exposure_colors(expid)
    for ax, values in ((top, wave_rms), (bottom, trace_offset)):
        lim = _robust_limit(values)
        for e, color in colors.items():
            sel = expid == e
            ax.plot(fiber[sel], np.clip(values[sel], -lim, lim), "o", ms=3.5, color=color, label=str(e))
        out = np.isfinite(values) & (np.abs(values) > lim)
        for f in np.unique(fiber[out]):
            v = values[out & (fiber == f)]
            worst = float(v[np.argmax(np.abs(v))])
            ax.plot([f], [np.sign(worst) * lim], "^" if worst > 0 else "v", ms=8, color="tab:red")
            ax.annotate(f"{worst:.3g}", (f, np.sign(worst) * lim), textcoords="offset points",
                        xytext=(6, -10 if worst > 0 else 4), fontsize=7, color="tab:red")
        if out.any():
            ax.set_ylim(-1.12 * lim if values[np.isfinite(values)].min() < 0 else None, 1.12 * lim)
    top.set_ylabel("wavelength RMS (\u00c5)")
    top.set_title(title)
    bottom.axhline(0, color="grey", lw=0.6)
    bottom.set_ylabel("trace offset (px)")
    bottom.set_xlabel("fiber")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(fontsize=7, ncol=4, title="exposure", title_fontsize=7)
    return fig


def _robust_limit(values: np.ndarray) -> float:
    """An axis limit that keeps the bulk of ``values`` readable: beyond it points are drawn clipped, in red."""
    finite = np.abs(values[np.isfinite(values)])
    if not finite.size:
        return 1.0
    med = float(np.median(finite))
    spread = float(np.percentile(finite, 90))
    return max(8 * med, 2 * spread, float(finite.max()) if finite.max() <= max(8 * med, 2 * spread) else 0.0, 1e-3)


def response_curves(wave: np.ndarray, curves: Mapping[str, np.ndarray], telluric: Mapping[str, np.ndarray], *,
                    title: str) -> Figure:
    """The flux-calibration response of each exposure (and the night's mean), and its telluric bands.

    Parameters
    ----------
    wave : ndarray (nwave,)
    curves : mapping of label to ndarray (nwave,)
        Response (e- s^-1 A^-1 per erg s^-1 cm^-2 A^-1); a label ``mean`` is drawn dashed.
    telluric : mapping of label to ndarray (nwave,)
        Transmission divided out.
    title : str
    """
    fig = new_figure(4.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1.6, 1])
    for label, resp in curves.items():
        style = {"ls": "--", "color": "k", "lw": 1.2} if label.startswith("mean") else {"lw": 1.0}
        top.plot(wave, resp, label=label, **style)
    top.set_ylabel("response\n(e\u207b s\u207b\u00b9 \u00c5\u207b\u00b9 / erg s\u207b\u00b9 cm\u207b\u00b2 \u00c5\u207b\u00b9)",
                   fontsize=8)
    top.set_title(title)
    top.legend(fontsize=7, ncol=2)
    top.grid(alpha=0.3)
    for label, t in telluric.items():
        bottom.plot(wave, t, lw=0.8, label=label, **({"ls": "--", "color": "k"} if label.startswith("mean") else {}))
    if not any(np.any(np.asarray(t) < 0.999) for t in telluric.values()):
        bottom.text(0.5, 0.5, "no telluric band in this range", transform=bottom.transAxes, ha="center", va="center",
                    fontsize=8, color="0.4")
    bottom.set_ylabel("telluric")
    bottom.set_xlabel("wavelength (\u00c5)")
    bottom.set_ylim(min(0.5, float(np.nanmin([np.nanmin(t) for t in telluric.values()] or [1.0])) - 0.05), 1.05)
    bottom.grid(alpha=0.3)
    return fig


def confusion_matrix(counts: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, title: str,
                     xlabel: str = "type from the pixels", ylabel: str = "type in the header") -> Figure:
    """A confusion matrix with the counts written in the cells."""
    fig = new_figure(0.9 + 0.42 * len(rows) + 1.2, width=max(4.8, 1.6 + 0.75 * len(cols)))
    ax = fig.add_subplot()
    shown = np.where(counts > 0, counts, np.nan)
    ax.imshow(shown, cmap="Blues", norm=LogNorm(vmin=1, vmax=max(2, int(counts.max(initial=1)))), aspect="auto")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            if counts[i, j]:
                off = rows[i] != cols[j]             # a disagreement: red, bold
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=10 if off else 9,
                        color="tab:red" if off else "white" if counts[i, j] > 0.5 * counts.max() else "black",
                        weight="bold" if off else "normal")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


def processing_times(labels: Sequence[str], seconds: np.ndarray, groups: Sequence[str], *, title: str) -> Figure:
    """Wall time of each reduction, one bar per frame, coloured by group (camera)."""
    from matplotlib import colormaps

    fig = new_figure(3.6, width=max(WIDTH, 0.22 * len(labels) + 2))
    ax = fig.add_subplot()
    unique = list(dict.fromkeys(groups))
    cmap = colormaps["tab20"]
    colors = [cmap(unique.index(g) % 20) for g in groups]
    ax.bar(np.arange(len(labels)), seconds, color=colors)
    ax.set_xticks(np.arange(len(labels)), labels, rotation=90, fontsize=6)
    for g in unique:
        ax.bar([np.nan], [np.nan], color=cmap(unique.index(g) % 20), label=g)
    ax.set_ylabel("seconds")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if len(unique) <= 20:
        ax.legend(fontsize=7, ncol=min(8, len(unique)))
    return fig


def spectrum_plot(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, *, title: str,
                  sky: Sequence[tuple[np.ndarray, np.ndarray, str]] = (), flux_label: str = "flux") -> Figure:
    """A spectrum with its 1-sigma band, masked bins shaded and the sky on a second axis.

    Parameters
    ----------
    wave, flux, ivar, mask : ndarray (nwave,)
        A bin with ``ivar`` 0 is masked (shaded grey, flux not drawn); one with ``ivar > 0`` and
        mask bits set (e.g. ``TELLURIC``) is flagged (shaded orange, drawn).
    title : str
        Label, S/N and provenance, written above the axes.
    sky : sequence of (wave, sky, label)
        Sky spectra drawn on the right axis (e.g. per camera, electrons per Angstrom).
    flux_label : str
        Y-axis label of the flux.
    """
    fig = new_figure(4.4, width=10)
    ax = fig.add_subplot()
    bad = ~(np.asarray(ivar) > 0)
    flagged = (np.asarray(mask) != 0) & ~bad
    sigma = np.where(~bad, 1.0 / np.sqrt(np.where(ivar > 0, ivar, 1.0)), np.nan)
    shown = np.where(bad, np.nan, flux)
    if sky:
        ax2 = ax.twinx()
        for w, s, label in sky:
            ax2.plot(w, s, color="tab:green", lw=0.5, alpha=0.5)
        ax2.set_ylabel("sky (e\u207b/\u00c5)", color="tab:green")
        ax2.tick_params(axis="y", colors="tab:green")
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
    ax.fill_between(wave, shown - sigma, shown + sigma, color="tab:blue", alpha=0.3, lw=0, label="\u00b11\u03c3")
    ax.plot(wave, shown, color="k", lw=0.6, label="flux")
    for bins, color, label in ((bad, "0.6", "masked (ivar 0)"), (flagged, "tab:orange", "flagged (mask bits)")):
        _shade(ax, wave, bins, color)
        if bins.any():
            ax.axvspan(np.nan, np.nan, color=color, alpha=0.3, label=label)
    good = shown[np.isfinite(shown)]
    if good.size:
        lo, hi = np.percentile(good, [0.5, 99.5])
        pad = 0.15 * (hi - lo or abs(hi) or 1.0)
        ax.set_ylim(min(lo - pad, 0), hi + pad)
    ax.set_xlim(wave[0], wave[-1])
    ax.set_xlabel("wavelength (\u00c5, air)")
    ax.set_ylabel(flux_label)
    ax.set_title(title, fontsize=9, loc="left")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    return fig


def _shade(ax, wave: np.ndarray, bins: np.ndarray, color: str) -> None:
    """Shade the runs of ``bins`` (bin edges half way to the neighbours)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], bins.astype(int), [0]])))
    for start, stop in zip(edges[::2], edges[1::2]):
        lo = wave[start] - 0.5 * (wave[min(start + 1, wave.size - 1)] - wave[start])
        hi = wave[stop - 1] + 0.5 * (wave[stop - 1] - wave[max(stop - 2, 0)])
        ax.axvspan(lo, hi, color=color, alpha=0.3, lw=0)
