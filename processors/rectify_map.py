"""Coordinate maps from the distorted CCD frame to the rectified one, and back.

Two kinds behind one interface (:class:`CoordinateMap`), both fitted to the same
:class:`~fiberlake.processors.rectify_sampling.TrainingSet`:

* ``mlp`` (seed 000, section 4.1, Table 1): a single-hidden-layer feed-forward network,
  2 inputs (column, row), 20 ReLU units, 2 outputs, mean squared error, Adam, batches of 600,
  50 epochs, trained with torch (CUDA when present, CPU otherwise). Two changes from the
  paper, both about conditioning and neither about capacity: inputs are scaled to
  ``[-1, 1]`` over the CCD, and (``residual=True``, the default) the network predicts the
  *displacement* ``target - input`` in units of its rms rather than the target coordinates
  themselves, so it spends its 20 units on the distortion and not on reproducing the identity
  (``residual=False`` is the paper's direct form). The training is seeded (initialisation and
  batch order come from one ``torch.Generator``), so the same samples and seed give the same
  weights on CPU. The learning rate decays on a cosine schedule to 1 % of ``lr``.
* ``legendre``: the classical alternative, a 2D tensor-product Legendre polynomial of the
  displacement (degree ``deg`` in each coordinate), linear least squares on the same samples.

Each kind fits a forward map (distorted -> rectified) and an inverse map (rectified ->
distorted) as two separate regressions on the same pairs. A stored map needs only numpy to be
applied: torch is imported only to train an ``mlp``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.polynomial import legendre

from fiberlake.schemas.containers import ArrayContainer

MAP_KINDS = ("mlp", "legendre")
_CHUNK = 1 << 18  # points per block when evaluating an MLP (bounds memory on 16M-point grids)


@dataclass(frozen=True)
class MapConfig:
    """How a map is trained (stored with the map, so each map says how it was made).

    Attributes
    ----------
    kind : str
        ``mlp`` or ``legendre``.
    hidden : int
        Hidden ReLU units of the MLP (paper: 20).
    epochs : int
        Passes over the samples (paper: 50).
    batch : int
        Mini-batch size (paper: 600).
    lr : float
        Adam learning rate at the start (cosine decay to 1 % of it).
    seed : int
        Seed of the initialisation and of the batch order.
    residual : bool
        MLP predicts the displacement (True) or the target coordinates (False, the paper).
    deg : int
        Degree of the Legendre warp in each coordinate.
    device : str or None
        Torch device for training (default: CUDA when available, else CPU).
    """

    kind: str = "legendre"
    hidden: int = 20
    epochs: int = 50
    batch: int = 600
    lr: float = 1e-2
    seed: int = 0
    residual: bool = True
    deg: int = 5
    device: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in MAP_KINDS:
            raise ValueError(f"map kind {self.kind!r} not one of {MAP_KINDS}")

    def to_dict(self) -> dict:
        """JSON-serialisable fields."""
        return asdict(self)


# ------------------------------------------------------------------------------------ frame
@dataclass(frozen=True)
class Frame:
    """Pixel <-> normalised coordinates of a CCD: ``u, v`` in ``[-1, 1]`` over the pixel centres."""

    ny: int
    nx: int

    def normalise(self, col, row) -> tuple[np.ndarray, np.ndarray]:
        """Pixel (column, row) to ``(u, v)``."""
        hx, hy = (self.nx - 1) / 2.0, (self.ny - 1) / 2.0
        return (np.asarray(col, float) - hx) / hx, (np.asarray(row, float) - hy) / hy


# ----------------------------------------------------------------------------- interface
@dataclass(eq=False)
class CoordinateMap(ArrayContainer):
    """A fitted distorted <-> rectified coordinate map of one CCD.

    Stored by :class:`~fiberlake.schemas.containers.ArrayContainer`: ``frame/``, ``config/``,
    ``info`` and the subclass's weights, with the subclass's name under ``class``, so that
    ``CoordinateMap.from_arrays`` (or :func:`map_from_arrays`) rebuilds the right kind.

    Attributes
    ----------
    frame : Frame
        CCD size the map was fitted on.
    config : MapConfig
        How it was trained.
    info : dict
        Training figures: ``n_samples``, ``train_seconds``, ``fwd_rms`` / ``inv_rms`` (px,
        rms distance of the mapped samples from their labels), ``fwd_max``, ``roundtrip_rms``.
    """

    frame: Frame
    config: MapConfig
    info: dict = field(default_factory=dict)

    kind = "base"

    # subclasses implement the displacement in normalised input coordinates
    def _displacement(self, u: np.ndarray, v: np.ndarray, inverse: bool) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _apply(self, col, row, inverse: bool) -> tuple[np.ndarray, np.ndarray]:
        col = np.asarray(col, float)
        row = np.asarray(row, float)
        col, row = np.broadcast_arrays(col, row)
        u, v = self.frame.normalise(col, row)
        dc, dr = self._displacement(u.ravel(), v.ravel(), inverse)
        return col + dc.reshape(col.shape), row + dr.reshape(row.shape)

    def forward(self, col, row) -> tuple[np.ndarray, np.ndarray]:
        """Rectified (column, row) of distorted pixel coordinates."""
        return self._apply(col, row, inverse=False)

    def inverse(self, col, row) -> tuple[np.ndarray, np.ndarray]:
        """Distorted (column, row) of rectified pixel coordinates."""
        return self._apply(col, row, inverse=True)

    def forward_grid(self, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Forward map on the tensor grid ``rows x cols``; arrays of shape ``(len(rows), len(cols))``."""
        cc, rr = np.meshgrid(np.asarray(cols, float), np.asarray(rows, float))
        return self.forward(cc, rr)

    def inverse_grid(self, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse map on the tensor grid ``rows x cols`` (rectified coordinates)."""
        cc, rr = np.meshgrid(np.asarray(cols, float), np.asarray(rows, float))
        return self.inverse(cc, rr)


def map_from_arrays(arrays: dict[str, np.ndarray]) -> CoordinateMap:
    """Rebuild a map (of the kind stored) from :meth:`CoordinateMap.to_arrays` output."""
    return CoordinateMap.from_arrays(arrays)


# ------------------------------------------------------------------------------------ MLP
@dataclass(eq=False)
class MLPMap(CoordinateMap):
    """Single-hidden-layer ReLU network map (weights as numpy arrays).

    ``fwd`` / ``inv`` hold ``w1 (H, 2)``, ``b1 (H,)``, ``w2 (2, H)``, ``b2 (2,)`` and ``scale
    (2,)``: the network output times ``scale`` is the displacement in pixels (residual form) or
    the target in normalised coordinates (direct form, ``scale`` = 1).
    """

    fwd: dict[str, np.ndarray] = field(default_factory=dict)
    inv: dict[str, np.ndarray] = field(default_factory=dict)

    kind = "mlp"

    def _displacement(self, u, v, inverse):
        net = self.inv if inverse else self.fwd
        w1, b1, w2, b2, scale = (net[k] for k in ("w1", "b1", "w2", "b2", "scale"))
        dc = np.empty(u.size)
        dr = np.empty(u.size)
        hx, hy = (self.frame.nx - 1) / 2.0, (self.frame.ny - 1) / 2.0
        # hidden layer in float32 (the output is a small displacement: ~1e-6 px), as two
        # broadcast products rather than a matrix product with an inner dimension of 2
        w1f, b1f, w2f = (np.asarray(a, np.float32) for a in (w1, b1, w2))
        for s in range(0, u.size, _CHUNK):
            uu = u[s:s + _CHUNK].astype(np.float32)[:, None]
            vv = v[s:s + _CHUNK].astype(np.float32)[:, None]
            h = uu * w1f[:, 0] + vv * w1f[:, 1]
            h += b1f
            np.maximum(h, 0, out=h)
            out = ((h @ w2f.T).astype(float) + b2) * scale
            if self.config.residual:
                dc[s:s + _CHUNK], dr[s:s + _CHUNK] = out[:, 0], out[:, 1]
            else:  # direct: normalised target coordinates
                dc[s:s + _CHUNK] = (out[:, 0] - u[s:s + _CHUNK]) * hx
                dr[s:s + _CHUNK] = (out[:, 1] - v[s:s + _CHUNK]) * hy
        return dc, dr


def torch_device(name: str | None = None):
    """The torch device to train on: ``name``, else CUDA when available, else CPU."""
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _train_mlp(z: np.ndarray, y: np.ndarray, config: MapConfig) -> list[dict]:
    """Train ``m`` independent 2-H-2 ReLU networks at once (batched; e.g. forward and inverse).

    Parameters
    ----------
    z, y : ndarray, shape (m, n, 2)
        Normalised inputs and scaled targets of each network.
    config : MapConfig

    Returns
    -------
    list of dict
        ``w1, b1, w2, b2`` (float64 numpy) of each network.
    """
    import torch

    device = torch_device(config.device)
    threads = torch.get_num_threads()
    # tiny matrices: thread synchronisation costs more than it saves (measured 1.7 vs 70 ms per
    # step on a loaded 2-core machine), so train on one CPU thread
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        gen = torch.Generator(device="cpu").manual_seed(int(config.seed))
        m, n = z.shape[0], z.shape[1]
        h = int(config.hidden)
        # PyTorch's default nn.Linear initialisation (uniform +-1/sqrt(fan_in)), from our generator
        bound1, bound2 = 1.0 / np.sqrt(2.0), 1.0 / np.sqrt(h)
        init = [
            (torch.rand((m, h, 2), generator=gen, dtype=torch.float64) * 2 - 1) * bound1,
            (torch.rand((m, 1, h), generator=gen, dtype=torch.float64) * 2 - 1) * bound1,
            (torch.rand((m, 2, h), generator=gen, dtype=torch.float64) * 2 - 1) * bound2,
            (torch.rand((m, 1, 2), generator=gen, dtype=torch.float64) * 2 - 1) * bound2,
        ]
        params = [p.to(device=device, dtype=torch.float32).requires_grad_(True) for p in init]
        zt = torch.as_tensor(z, dtype=torch.float32, device=device)
        yt = torch.as_tensor(y, dtype=torch.float32, device=device)
        batch = max(1, min(int(config.batch), n))
        total = max(1, int(np.ceil(n / batch)) * int(config.epochs))
        opt = torch.optim.Adam(params, lr=float(config.lr))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.01 * float(config.lr))
        w1, b1, w2, b2 = params
        for _ in range(int(config.epochs)):
            order = torch.randperm(n, generator=gen).to(device)
            for s in range(0, n, batch):
                idx = order[s:s + batch]
                hid = torch.relu(torch.bmm(zt[:, idx], w1.transpose(1, 2)) + b1)
                loss = torch.mean((torch.bmm(hid, w2.transpose(1, 2)) + b2 - yt[:, idx]) ** 2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        out = [p.detach().to("cpu", torch.float64).numpy() for p in params]
    finally:
        torch.set_num_threads(threads)
    return [{"w1": out[0][i].copy(), "b1": out[1][i, 0].copy(), "w2": out[2][i].copy(), "b2": out[3][i, 0].copy()}
            for i in range(m)]


def fit_mlp_map(inputs: np.ndarray, targets: np.ndarray, frame: Frame, config: MapConfig) -> MLPMap:
    """Train the forward and inverse MLP maps on sample pairs.

    Parameters
    ----------
    inputs, targets : ndarray, shape (n, 2)
        Distorted and rectified (column, row) pixel coordinates of the samples.
    frame : Frame
        CCD size.
    config : MapConfig
        ``kind`` must be ``mlp``.

    Returns
    -------
    MLPMap
    """
    t0 = time.perf_counter()
    zs, ys, scales = [], [], []
    for src, dst in ((inputs, targets), (targets, inputs)):
        u, v = frame.normalise(src[:, 0], src[:, 1])
        zs.append(np.column_stack([u, v]))
        if config.residual:
            disp = dst - src
            scale = np.maximum(disp.std(axis=0), 1e-3)
            ys.append(disp / scale)
        else:
            ut, vt = frame.normalise(dst[:, 0], dst[:, 1])
            ys.append(np.column_stack([ut, vt]))
            scale = np.ones(2)
        scales.append(np.asarray(scale, float))
    fwd, inv = _train_mlp(np.stack(zs), np.stack(ys), config)
    fwd["scale"], inv["scale"] = scales
    nets = {"fwd": fwd, "inv": inv}
    import torch

    m = MLPMap(frame, config, {}, fwd=nets["fwd"], inv=nets["inv"])
    m.info = _fit_figures(m, inputs, targets) | {"train_seconds": time.perf_counter() - t0,
                                                 "torch": torch.__version__, "device": str(torch_device(config.device))}
    return m


# ------------------------------------------------------------------------------- Legendre
@dataclass(eq=False)
class LegendreMap(CoordinateMap):
    """2D tensor-product Legendre displacement map.

    ``fwd`` / ``inv`` are coefficient arrays ``(2, deg + 1, deg + 1)``: component ``k``
    (0 = column, 1 = row) of the displacement is ``sum_ij c[k, i, j] P_i(u) P_j(v)``.
    """

    fwd: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 1)))
    inv: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 1)))

    kind = "legendre"

    def _displacement(self, u, v, inverse):
        c = self.inv if inverse else self.fwd
        return legendre.legval2d(u, v, c[0]), legendre.legval2d(u, v, c[1])

    def _grid(self, c: np.ndarray, cols, rows):
        cols = np.asarray(cols, float)
        rows = np.asarray(rows, float)
        u, v = self.frame.normalise(cols, rows)
        vu = legendre.legvander(u, c.shape[1] - 1)  # (nc, I)
        vv = legendre.legvander(v, c.shape[2] - 1)  # (nr, J)
        return cols[None, :] + vv @ c[0].T @ vu.T, rows[:, None] + vv @ c[1].T @ vu.T

    def forward_grid(self, cols, rows):
        """Separable evaluation on the grid (fast: two small matrix products per component)."""
        return self._grid(self.fwd, cols, rows)

    def inverse_grid(self, cols, rows):
        """Separable evaluation of the inverse on the grid."""
        return self._grid(self.inv, cols, rows)


def _lstsq_legendre(src: np.ndarray, disp: np.ndarray, frame: Frame, deg: int) -> np.ndarray:
    u, v = frame.normalise(src[:, 0], src[:, 1])
    design = legendre.legvander2d(u, v, [deg, deg])
    coef = np.linalg.lstsq(design, disp, rcond=None)[0]  # (terms, 2)
    return coef.T.reshape(2, deg + 1, deg + 1)


def fit_legendre_map(inputs: np.ndarray, targets: np.ndarray, frame: Frame, config: MapConfig) -> LegendreMap:
    """Least-squares forward and inverse Legendre warps on sample pairs (see :func:`fit_mlp_map`)."""
    t0 = time.perf_counter()
    fwd = _lstsq_legendre(inputs, targets - inputs, frame, config.deg)
    inv = _lstsq_legendre(targets, inputs - targets, frame, config.deg)
    m = LegendreMap(frame, config, {}, fwd=fwd, inv=inv)
    m.info = _fit_figures(m, inputs, targets) | {"train_seconds": time.perf_counter() - t0}
    return m


def fit_map(inputs: np.ndarray, targets: np.ndarray, frame: Frame, config: MapConfig) -> CoordinateMap:
    """Fit the map of ``config.kind`` on sample pairs ``(n, 2)`` (column, row) in pixels."""
    inputs = np.asarray(inputs, float)
    targets = np.asarray(targets, float)
    if inputs.shape != targets.shape or inputs.ndim != 2 or inputs.shape[1] != 2:
        raise ValueError(f"inputs and targets must be (n, 2), got {inputs.shape}, {targets.shape}")
    if config.kind == "mlp":
        return fit_mlp_map(inputs, targets, frame, config)
    return fit_legendre_map(inputs, targets, frame, config)


def _fit_figures(m: CoordinateMap, inputs: np.ndarray, targets: np.ndarray) -> dict:
    fc, fr = m.forward(inputs[:, 0], inputs[:, 1])
    ic, ir = m.inverse(targets[:, 0], targets[:, 1])
    rc, rr = m.inverse(fc, fr)
    fwd = np.hypot(fc - targets[:, 0], fr - targets[:, 1])
    inv = np.hypot(ic - inputs[:, 0], ir - inputs[:, 1])
    rt = np.hypot(rc - inputs[:, 0], rr - inputs[:, 1])
    return {"n_samples": int(inputs.shape[0]), "fwd_rms": float(np.sqrt(np.mean(fwd**2))),
            "fwd_max": float(fwd.max()), "inv_rms": float(np.sqrt(np.mean(inv**2))),
            "roundtrip_rms": float(np.sqrt(np.mean(rt**2)))}
