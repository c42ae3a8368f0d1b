"""Arrow schemas of every lake table, declared once.

Every table is partitioned by ``night`` (``YYYY-MM-DD``) and keyed as listed in :data:`KEYS`.
Array columns (``flux``, ``ivar``, ``mask``) hold one spectrum per row on the camera's linear
wavelength grid ``wave_min + dwave * arange(nwave)``; ``nwave`` is the same for every arm of an
instrument, so readers may view them as fixed-size arrays (the Python API does). They are stored
as Arrow ``list`` columns because the Delta Lake protocol has no fixed-size list type.
"""

from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")


def _schema(fields: list[tuple[str, pa.DataType, str]]) -> pa.Schema:
    return pa.schema(
        [pa.field(name, dtype, nullable=True, metadata={"description": doc}) for name, dtype, doc in fields]
    )


EXPOSURES = _schema([
    ("night", pa.string(), "observing night YYYY-MM-DD (partition)"),
    ("expid", pa.int64(), "exposure id"),
    ("camera", pa.string(), "camera name <arm><spectrograph>"),
    ("spectrograph", pa.int16(), "spectrograph number, 1-based"),
    ("arm", pa.string(), "arm, b or r"),
    ("obstype", pa.string(), "frame type from the header: BIAS DARK FLAT ARC SCIENCE STANDARD"),
    ("exptime", pa.float32(), "exposure time (s)"),
    ("mjd_obs", pa.float64(), "MJD of exposure start"),
    ("date_obs", pa.string(), "UTC start, ISO 8601"),
    ("instrument", pa.string(), "INSTRUME keyword"),
    ("filename", pa.string(), "name of the delivered file"),
    ("file_sha256", pa.string(), "SHA-256 of the delivered file's bytes: the frame's identity"),
    ("file_size", pa.int64(), "size of the delivered file (bytes)"),
    ("file_version", pa.int32(), "1 for the first file of this (night, expid, camera), +1 per changed re-delivery"),
    ("pixel_sha256", pa.string(), "SHA-256 of the raw pixel array (C order, little-endian uint16)"),
    ("raw_path", pa.string(), "Zarr array of the pixels, relative to the lake root"),
    ("ny", pa.int32(), "rows of the raw array"),
    ("nx", pa.int32(), "columns of the raw array (including overscan)"),
    ("gain", pa.float32(), "GAIN keyword (e-/ADU)"),
    ("read_noise", pa.float32(), "RDNOISE keyword (e-)"),
    ("header_json", pa.string(), "the full primary header as JSON (cards in order)"),
    ("ingested_at", TS, "time the row was committed"),
])

QUARANTINE = _schema([
    ("night", pa.string(), "night of the delivery directory (partition)"),
    ("filename", pa.string(), "name of the delivered file"),
    ("file_sha256", pa.string(), "SHA-256 of the bytes (empty file: hash of nothing)"),
    ("file_size", pa.int64(), "bytes"),
    ("reason", pa.string(), "why the frame was refused, in words"),
    ("error_class", pa.string(), "short machine-readable class, e.g. truncated, missing_keyword"),
    ("stored_path", pa.string(), "copy of the refused bytes, relative to the lake root"),
    ("quarantined_at", TS, "time the row was committed"),
])

FIBERMAP = _schema([
    ("night", pa.string(), "night (partition)"),
    ("expid", pa.int64(), "exposure id"),
    ("spectrograph", pa.int16(), "spectrograph number"),
    ("fiber", pa.int16(), "fiber index within the spectrograph, 0-based"),
    ("targetid", pa.int64(), "target id"),
    ("ra", pa.float64(), "right ascension (deg)"),
    ("dec", pa.float64(), "declination (deg)"),
    ("mag", pa.float32(), "catalogue magnitude (r-like; the simulator's: photon-counting AB through a 5600-6900 A "
                          "top hat, 99 for sky fibers)"),
    ("objtype", pa.string(), "TGT, SKY or STD"),
    ("mag_g", pa.float32(), "blue catalogue magnitude (photon-counting AB, top hat 4000-5500 A in the simulator; "
                            "null when the fiber map has none or NaN)"),
    ("mag_i", pa.float32(), "red catalogue magnitude (photon-counting AB, top hat 7000-8500 A in the simulator; "
                            "null when the fiber map has none or NaN)"),
])

SPECTRA_META = [
    ("night", pa.string(), "night (partition)"),
    ("expid", pa.int64(), "exposure id"),
    ("camera", pa.string(), "camera"),
    ("spectrograph", pa.int16(), "spectrograph number"),
    ("arm", pa.string(), "arm"),
    ("fiber", pa.int16(), "fiber index within the spectrograph"),
    ("targetid", pa.int64(), "target id from the fiber map (-1 when unknown)"),
    ("objtype", pa.string(), "TGT, SKY, STD (from the fiber map)"),
    ("obstype", pa.string(), "SCIENCE or STANDARD"),
    ("extraction", pa.string(), "box or optimal"),
    ("run_id", pa.string(), "run that produced the row (see table runs)"),
    ("wave_min", pa.float64(), "wavelength of the first bin centre (Angstrom, air)"),
    ("dwave", pa.float64(), "bin width (Angstrom)"),
    ("nwave", pa.int32(), "number of bins"),
    ("fiber_status", pa.int32(), "OR of mask bits that apply to the whole fiber (e.g. DEADFIBER)"),
]

SPECTRA_RESOLUTION = [
    ("resolution", pa.list_(pa.float32()),
     "extraction 'deconv' only (null otherwise): band of the fiber's resolution matrix on the CCD "
     "row grid, row-major [resolution_ndiag, ny] flattened; element [k, r] is the weight of the "
     "pre-LSF row flux F[r + k - h] (h = (resolution_ndiag - 1) / 2) in the extracted row flux "
     "(before fiber flat and resampling); see processors.deconv"),
    ("resolution_ndiag", pa.int16(), "number of diagonals 2h+1 of resolution (null when absent)"),
    ("resolution_wave", pa.list_(pa.float64()),
     "Legendre coefficients of the row wavelengths (Angstrom, air) of resolution's rows: "
     "wave(r) = legval(2 r / (ny - 1) - 1, coeffs), the calibration's wavelength solution"),
]
"""Nullable columns of ``SPECTRA`` holding the deconvolution's resolution data."""

SPECTRA = _schema(SPECTRA_META + [
    ("flux", pa.list_(pa.float32()), "sky-subtracted, fiber-flatted flux (electrons per Angstrom)"),
    ("ivar", pa.list_(pa.float32()), "inverse variance of flux; 0 where masked"),
    ("mask", pa.list_(pa.uint32()), "mask bits (schemas.maskbits.Mask)"),
    ("sky", pa.list_(pa.float32()), "sky model that was subtracted (electrons per Angstrom)"),
] + SPECTRA_RESOLUTION)

METRICS = _schema([
    ("night", pa.string(), "night (partition)"),
    ("expid", pa.int64(), "exposure id"),
    ("spectrograph", pa.int16(), "spectrograph number, 1-based (joins fibermap with expid and fiber)"),
    ("camera", pa.string(), "camera"),
    ("fiber", pa.int16(), "fiber index within the spectrograph"),
    ("targetid", pa.int64(), "target id from the fiber map (-1 when the exposure has none)"),
    ("extraction", pa.string(), "box, optimal or deconv"),
    ("run_id", pa.string(), "run id"),
    ("objtype", pa.string(), "TGT, SKY, STD"),
    ("snr_eq15", pa.float32(), "SNR against an 11-pixel median continuum (seed 000 eq. 15)"),
    ("variance_eq14", pa.float32(), "variance of the spectrum (seed 000 eq. 14)"),
    ("der_snr", pa.float32(), "DER_SNR (Stoehr et al. 2008)"),
    ("median_snr", pa.float32(), "median of flux * sqrt(ivar) over unmasked bins"),
    ("median_flux", pa.float32(), "median flux (electrons per Angstrom)"),
    ("frac_masked", pa.float32(), "fraction of bins with ivar 0"),
    ("wave_rms", pa.float32(), "RMS of the fiber's arc-line fit (Angstrom)"),
    ("wave_nlines", pa.int32(), "arc lines used in the fiber's wavelength solution"),
    ("trace_rms", pa.float32(), "RMS of the fiber's trace fit on the master flat (pixels)"),
    ("trace_offset", pa.float32(), "median cross-dispersion offset of this frame's light from the calibration trace (pixels)"),
    ("sky_chi2", pa.float32(), "for sky fibers: mean (residual/sigma)^2 after sky subtraction"),
    ("trace_straightness", pa.float32(), "RMS perpendicular distance (px) of the extraction trace from its TLS straight line (in the rectified frame when the aberration map was applied)"),
    ("trace_straightness_raw", pa.float32(), "same, for the trace on the distorted master flat (before aberration correction)"),
    ("map_residual", pa.float32(), "RMS distance (px) of the aberration map's image of this fiber's raw trace from its TLS labels; null when the frame was not rectified"),
])

RUNS = _schema([
    ("run_id", pa.string(), "unique id of the run"),
    ("night", pa.string(), "night processed (partition)"),
    ("command", pa.string(), "the job that ran"),
    ("code_version", pa.string(), "fiberlake version and git commit when known"),
    ("config_json", pa.string(), "every parameter of the run, one object per stage, as JSON "
     "(fiberlake runs show RUN_ID)"),
    ("config_hash", pa.string(), "SHA-256 of the science parameters of config_json (execution settings excluded)"),
    ("execution_json", pa.string(), "where and how the run executed (Ray actors, CPUs, GPUs, batch size): "
     "never changes a product"),
    ("started_at", TS, "start time"),
    ("finished_at", TS, "end time"),
    ("n_frames", pa.int32(), "frames processed"),
    ("n_failed", pa.int32(), "frames that failed (see status_json)"),
    ("status_json", pa.string(), "per-frame outcome and error text"),
])

DELIVERIES = _schema([
    ("night", pa.string(), "night of the delivery directory (partition)"),
    ("filename", pa.string(), "name of the delivered file"),
    ("file_sha256", pa.string(), "SHA-256 of the delivered bytes"),
    ("file_size", pa.int64(), "bytes"),
    ("mtime_ns", pa.int64(), "modification time of the file when it was read (ns since the epoch)"),
    ("outcome", pa.string(), "ingested, new_version, duplicate, quarantined or fibermap"),
    ("detail", pa.string(), "where the bytes went, or what they duplicate, or why they were refused"),
    ("recorded_at", TS, "time the row was committed"),
])
"""One row per delivered file (name + bytes) the lake has looked at: the ingest log. Every entry of a
night directory gets one. ``outcome`` may also be ``refused`` (not read: a link out of the night
directory, no read permission, a name that is not UTF-8; looked at again by every run) or
``ignored`` (not a delivery: another extension, a hidden file, a sub-directory); their
``file_sha256`` is empty. (The column descriptions stay as they were: Delta refuses to append to a
table whose field metadata differs.)

A re-delivery of known bytes under another name is recorded here as ``duplicate`` and adds
nothing else. A later run skips a file whose name, size and mtime match a row without reading
it, so ingesting many nights only reads what is new."""

REDUCTIONS = _schema([
    ("night", pa.string(), "night of the exposure (partition)"),
    ("expid", pa.int64(), "exposure id"),
    ("camera", pa.string(), "camera"),
    ("extraction", pa.string(), "extraction method (box, optimal, deconv): one marker per method"),
    ("file_version", pa.int32(), "file version of the raw frame that was reduced"),
    ("pixel_sha256", pa.string(), "SHA-256 of the raw pixels that were reduced"),
    ("status", pa.string(), "ok or failed"),
    ("error", pa.string(), "why the reduction failed (null when ok)"),
    ("error_kind", pa.string(), "data (the same inputs fail again; not retried without --retry-failed) or "
     "environment (no space, I/O error, lost worker: retried by the next run); null when ok"),
    ("calib_night", pa.string(), "night of the calibration set used (an earlier night when this night had none)"),
    ("calib_id", pa.string(), "id of the calibration set used (changes when the set is rebuilt)"),
    ("config_hash", pa.string(), "SHA-256 of every science parameter this extraction's spectra depend on"),
    ("run_id", pa.string(), "run that wrote the exposure's spectra and metrics"),
    ("n_spectra", pa.int32(), "spectra rows written (fibers)"),
    ("seconds", pa.float32(), "wall time of the reduction"),
    ("landed_at", TS, "when the raw frame was committed to exposures"),
    ("reduced_at", TS, "when this row was committed (spectra and metrics were committed just before)"),
])
"""One row per reduced (night, expid, camera, extraction): the commit marker of a reduction.

Written last, after the exposure's ``spectra`` and ``metrics`` rows, so a row here means those
rows are complete; a frame without one (or with other inputs) is reduced again, which replaces
its rows rather than adding to them."""

TYPE_CLASSES: tuple[str, ...] = ("bias", "dark", "flat", "arc", "science", "standard")
"""Frame types of the typer, one probability column ``p_<type>`` each in ``frames``."""

FRAMES = _schema([
    ("night", pa.string(), "night (partition)"),
    ("expid", pa.int64(), "exposure id"),
    ("camera", pa.string(), "camera"),
    ("file_version", pa.int32(), "file version of the raw frame that was typed (as in exposures)"),
    ("pixel_sha256", pa.string(), "SHA-256 of the raw pixels that were typed"),
    ("type_header", pa.string(), "OBSTYPE of the header as delivered (null when missing)"),
    ("type_pixels", pa.string(), "type from the pixels by the final scheme (3 of 4 flips agree): BIAS DARK FLAT "
     "ARC SCIENCE STANDARD, or UNKNOWN"),
] + [(f"p_{c}", pa.float32(), f"probability of {c.upper()}, softmax averaged over the 4 flips (null when not typed)")
     for c in TYPE_CLASSES] + [
    ("flips_agreeing", pa.int8(), "flips (of 4) voting for the most voted type; 0 when the frame was not typed"),
    ("confidence", pa.float32(), "mean probability of the most voted type over the 4 flips"),
    ("type_agree", pa.bool_(), "type_pixels equals type_header (false when either is missing or UNKNOWN)"),
    ("type_used", pa.string(), "the type the pipeline acts on (calibration sets, reductions): see routing"),
    ("routed_by", pa.string(), "header or pixels: where type_used came from"),
    ("type_flag", pa.string(), "null, or why a person should look: header_missing, header_overridden, "
     "disagree (header kept), untypable (no type at all), pixels_unknown (header kept, pixels undecided)"),
    ("untypable", pa.string(), "why the pixels could not be typed (blank, saturated, not finite); null otherwise"),
    ("routing", pa.string(), "routing mode: auto, header or pixels (typing.routing)"),
    ("model_id", pa.string(), "typing model (table models); null when typing was off"),
    ("typed_at", TS, "time the row was committed"),
])
"""One row per ingested frame (version): what the header says, what the pixels say, what is used."""

MODELS = _schema([
    ("night", pa.string(), "UTC date the model was registered, YYYY-MM-DD (partition)"),
    ("stage", pa.string(), "pipeline stage, e.g. typing"),
    ("model_id", pa.string(), "content hash of weights and definition: <stage>-<16 hex digits>"),
    ("architecture", pa.string(), "network, e.g. compact or paper"),
    ("n_parameters", pa.int64(), "trainable weights"),
    ("size_bytes", pa.int64(), "size of weights.safetensors"),
    ("path", pa.string(), "artifact folder relative to the lake root (models/<stage>/<model_id>)"),
    ("source", pa.string(), "trained (fiberlake train) or shipped (the package's default)"),
    ("code_version", pa.string(), "fiberlake version and git commit of the training"),
    ("heldout_accuracy", pa.float32(), "final-scheme accuracy on the held-out simulated frames"),
    ("heldout_unknown", pa.float32(), "fraction of held-out frames typed UNKNOWN"),
    ("card_json", pa.string(), "the whole model card (command, seeds, data sizes, hyper-parameters, figures)"),
    ("registered_at", TS, "time the row was committed"),
])
"""One row per model artifact the lake holds."""

FLUXCAL = _schema([
    ("night", pa.string(), "night (partition)"),
    ("expid", pa.int64(), "exposure id; 0 for the night's mean response of a camera"),
    ("camera", pa.string(), "camera"),
    ("spectrograph", pa.int16(), "spectrograph number"),
    ("extraction", pa.string(), "extraction the spectra came from (box, optimal, deconv)"),
    ("run_id", pa.string(), "run that made the row"),
    ("status", pa.string(), "ok (this exposure's standards), fallback (too few good standards: the night's mean "
     "response was applied), none (no response anywhere: spectra flux 0, ivar 0, NOFLUXCAL), mean (expid 0)"),
    ("calib_expids", pa.list_(pa.int64()), "exposures whose standards made the response that was applied"),
    ("calib_night", pa.string(), "night of the response applied (an earlier night's mean when this night had none)"),
    ("n_standards", pa.int32(), "standard-star fibers in the exposure and spectrograph"),
    ("n_used", pa.int32(), "standards fitted and kept in this camera's response"),
    ("std_fiber", pa.list_(pa.int16()), "fibers of the standards fitted"),
    ("std_teff", pa.list_(pa.float32()), "their fitted Teff (K)"),
    ("std_logg", pa.list_(pa.float32()), "their fitted log g"),
    ("std_feh", pa.list_(pa.float32()), "their fitted [Fe/H]"),
    ("std_rv", pa.list_(pa.float32()), "their fitted radial velocity (km/s)"),
    ("std_chi2", pa.list_(pa.float32()), "reduced chi^2 of each fit (model error included)"),
    ("std_ok", pa.list_(pa.bool_()), "whether each fit was usable"),
    ("exptime", pa.float32(), "exposure time (s)"),
    ("wave_min", pa.float64(), "camera grid: first bin centre (A, air)"),
    ("dwave", pa.float64(), "camera grid: bin width (A)"),
    ("nwave", pa.int32(), "camera grid: number of bins"),
    ("response", pa.list_(pa.float32()), "counts per second over flux above the atmosphere: e- s^-1 A^-1 per "
     "(erg s^-1 cm^-2 A^-1); smooth (cubic B-spline); includes the atmosphere's extinction and the mean aperture loss"),
    ("response_ivar", pa.list_(pa.float32()), "inverse variance of response"),
    ("telluric", pa.list_(pa.float32()), "telluric transmission (1 outside the O2 and H2O bands)"),
    ("telluric_ivar", pa.list_(pa.float32()), "inverse variance of telluric (0 outside the bands: not measured)"),
    ("input_hash", pa.string(), "hash of the frames' reduction markers and the parameters behind this row: the "
     "exposure's products are rebuilt when it changes"),
    ("made_at", TS, "when the row was committed (after the exposure's joined rows: the row is their marker)"),
])
"""One row per (night, expid, camera, extraction): the flux calibration applied to that camera of that
exposure, and the marker that the exposure's ``joined`` rows are complete. ``expid`` 0 rows hold the
night's mean response of a camera (from the exposures with status ok)."""

JOINED = _schema([
    ("night", pa.string(), "night (partition)"),
    ("expid", pa.int64(), "exposure id"),
    ("spectrograph", pa.int16(), "spectrograph number"),
    ("fiber", pa.int16(), "fiber index within the spectrograph"),
    ("extraction", pa.string(), "extraction the spectra came from"),
    ("targetid", pa.int64(), "target id from the fiber map (-1 when unknown)"),
    ("objtype", pa.string(), "TGT, SKY or STD"),
    ("obstype", pa.string(), "SCIENCE or STANDARD"),
    ("run_id", pa.string(), "run that made the row"),
    ("cameras", pa.string(), "cameras joined, e.g. b1,r1 (a missing camera leaves NODATA bins)"),
    ("fluxcal_status", pa.string(), "ok, fallback or none (see table fluxcal)"),
    ("loglam_min", pa.float64(), "log10 of the first bin centre (A, air)"),
    ("dloglam", pa.float64(), "log10 step of the grid: wave = 10 ** (loglam_min + dloglam * arange(nwave))"),
    ("nwave", pa.int32(), "number of bins"),
    ("flam", pa.list_(pa.float32()), "flux density above the atmosphere (erg s^-1 cm^-2 A^-1), arms joined (overlap "
     "combined by inverse variance)"),
    ("flam_ivar", pa.list_(pa.float32()), "inverse variance of flam, decorrelated: the variance a bin adds to any sum of "
     "bins (no resampling ripple); 0 where masked"),
    ("flam_mask", pa.list_(pa.uint32()), "mask bits of flam (schemas.maskbits.Mask)"),
    ("resolution", pa.list_(pa.float32()), "deconv only (null otherwise): resolution band on this grid, "
     "[resolution_ndiag, nwave] flattened; element [k, j] weighs the true flux of bin j + k - h in bin j"),
    ("resolution_ndiag", pa.int16(), "diagonals of resolution (null when absent)"),
])
"""One row per fiber per exposure and extraction: the flux-calibrated spectrum with the arms joined."""

COADDS = _schema([
    ("night", pa.string(), "night whose exposures are combined (partition); for scope 'all', the latest night"),
    ("targetid", pa.int64(), "target id"),
    ("extraction", pa.string(), "extraction the spectra came from"),
    ("scope", pa.string(), "night (that night's exposures) or all (the target's exposures of every night)"),
    ("run_id", pa.string(), "run that made the row"),
    ("objtype", pa.string(), "TGT or STD (the fiber map's)"),
    ("ra", pa.float64(), "right ascension (deg, fiber map)"),
    ("dec", pa.float64(), "declination (deg, fiber map)"),
    ("mag", pa.float32(), "catalogue magnitude (fiber map)"),
    ("healpix", pa.int64(), "HEALPix pixel of (ra, dec), nested ordering"),
    ("nside", pa.int32(), "HEALPix nside of healpix"),
    ("n_exp", pa.int32(), "exposures combined"),
    ("expids", pa.list_(pa.int64()), "those exposures"),
    ("nights", pa.list_(pa.string()), "their nights"),
    ("n_rejected", pa.int32(), "bins of single exposures rejected as outliers"),
    ("fluxcal_status", pa.string(), "ok when every exposure had its own standards, else fallback or none"),
    ("loglam_min", pa.float64(), "log10 of the first bin centre (A, air)"),
    ("dloglam", pa.float64(), "log10 step: wave = 10 ** (loglam_min + dloglam * arange(nwave))"),
    ("nwave", pa.int32(), "number of bins"),
    ("flam", pa.list_(pa.float32()), "inverse-variance mean flux density (erg s^-1 cm^-2 A^-1)"),
    ("flam_ivar", pa.list_(pa.float32()), "inverse variance of flam (sum over the exposures used)"),
    ("flam_mask", pa.list_(pa.uint32()), "mask bits of flam: NODATA where no exposure measured the bin; others OR-ed from the "
     "exposures used"),
    ("resolution", pa.list_(pa.float32()), "deconv only (null otherwise): inverse-variance mean of the exposures' "
     "resolution bands, [resolution_ndiag, nwave] flattened"),
    ("resolution_ndiag", pa.int16(), "diagonals of resolution (null when absent)"),
    ("input_hash", pa.string(), "hash of the joined inputs and parameters; the row is rebuilt when it changes"),
    ("made_at", TS, "when the row was committed"),
])
"""One row per target, night and extraction (scope night), and one per target and extraction over every
night (scope all, in the partition of its latest night): the exposures combined."""

SPECTRA_DENOISED = _schema([
    ("night", pa.string(), "night of the source row (partition)"),
    ("source", pa.string(), "joined (one exposure) or coadds (a target's exposures combined)"),
    ("extraction", pa.string(), "extraction the spectra came from"),
    ("scope", pa.string(), "exposure for joined rows; night or all for coadds (the coadd's scope)"),
    ("expid", pa.int64(), "exposure id of a joined row (0 for coadds)"),
    ("spectrograph", pa.int16(), "spectrograph of a joined row (-1 for coadds)"),
    ("fiber", pa.int16(), "fiber of a joined row (-1 for coadds)"),
    ("targetid", pa.int64(), "target id"),
    ("run_id", pa.string(), "run that made the row"),
    ("model_id", pa.string(), "denoise model (generator, KDE prior, NoiseFlow)"),
    ("status", pa.string(), "ok, or why not: no_data, few_bins, nonpositive, out_of_prior, poor_fit "
     "(processors.denoise_map.STATUSES); flux, latent and posterior are 0 where no fit was made"),
    ("wave_min", pa.float64(), "first bin centre (A) of the linear grid"),
    ("wave_max", pa.float64(), "last bin centre (A)"),
    ("nwave", pa.int32(), "bins (2048)"),
    ("flux", pa.list_(pa.float32()), "denoised spectrum G(z) at the MAP, unit absolute sum over the grid"),
    ("flux_scale", pa.float64(), "the input's flux sum over its observed bins (erg s^-1 cm^-2 A^-1 summed over bins) "
     "that normalised it"),
    ("mask", pa.list_(pa.uint32()), "NODATA (schemas.maskbits) on bins no input observed: imputed by the generator"),
    ("n_observed", pa.int32(), "observed bins of the input on the grid"),
    ("latent", pa.list_(pa.float32()), "MAP latent z of the MAP subclass"),
    ("subclass", pa.string(), "MAP subclass (null without a fit)"),
    ("class_posterior", pa.list_(pa.float32()), "posterior of every subclass of the model (its card's order)"),
    ("objective", pa.float32(), "MAP objective -log p(y|G(z)) - log p(z|C) - log p(C) (nats; 0 without a fit)"),
    ("log_prior", pa.float32(), "log p(z|C) at the MAP"),
    ("residual_rms", pa.float32(), "rms of the NoiseFlow-whitened residuals (1 for noise like the training noise)"),
    ("input_hash", pa.string(), "hash of the source row's inputs, the model and the parameters"),
    ("made_at", TS, "when the row was committed"),
])
"""One row per denoised joined spectrum or coadd (seed 004): MAP over the latent and the subclass."""

LABEL_CLASSES: tuple[str, ...] = ("A", "F", "G", "K", "M", "DA", "C")
"""Stellar classes of the ``labels`` table (DA: hydrogen white dwarf; C: carbon star), one ``p_*`` column each."""

LABELS = _schema([
    ("night", pa.string(), "night (partition)"),
    ("expid", pa.int64(), "exposure id"),
    ("spectrograph", pa.int16(), "spectrograph number"),
    ("fiber", pa.int16(), "fiber index within the spectrograph, 0-based"),
    ("targetid", pa.int64(), "target id (fibermap; -1 when unknown)"),
    ("method", pa.string(), "drcnet (2D stripes of both arms, seed 003), rcnet (1D aperture spectra) or template "
     "(chi2 template fit, radial velocity free)"),
    ("model_id", pa.string(), "classify model (drcnet, rcnet) or template grid id (template)"),
    ("class", pa.string(), "most probable class (A F G K M DA C); null when the fiber could not be labelled"),
] + [(f"p_{c.lower()}", pa.float32(), f"probability of class {c} (null without a label)")
     for c in LABEL_CLASSES] + [
    ("snr_r", pa.float32(), "median S/N per row of the red arm's sky-subtracted aperture spectrum (0 without a red arm)"),
    ("snr_b", pa.float32(), "the same for the blue arm"),
    ("arms", pa.string(), "arms the label used: br, b or r (a missing or unusable arm's input is zero)"),
    ("flag", pa.string(), "ok, one_arm (labelled from one arm), no_stripe (dead or masked in both arms: no label), "
     "low_snr (below classify.min_snr), no_fit (template fit failed: no label)"),
    ("run_id", pa.string(), "run that made the row"),
    ("input_hash", pa.string(), "hash of the exposure's frames, the model and the parameters"),
    ("made_at", TS, "when the row was committed"),
])
"""One row per star fiber, exposure, spectrograph and method: its stellar class and class probabilities."""

SCHEMAS: dict[str, pa.Schema] = {
    "exposures": EXPOSURES,
    "quarantine": QUARANTINE,
    "fibermap": FIBERMAP,
    "spectra": SPECTRA,
    "metrics": METRICS,
    "runs": RUNS,
    "reductions": REDUCTIONS,
    "deliveries": DELIVERIES,
    "frames": FRAMES,
    "models": MODELS,
    "fluxcal": FLUXCAL,
    "joined": JOINED,
    "coadds": COADDS,
    "spectra_denoised": SPECTRA_DENOISED,
    "labels": LABELS,
}

KEYS: dict[str, tuple[str, ...]] = {
    "exposures": ("night", "expid", "camera", "file_version"),
    "quarantine": ("night", "filename", "file_sha256"),
    "fibermap": ("night", "expid", "spectrograph", "fiber"),
    "spectra": ("night", "expid", "camera", "fiber", "extraction"),
    "metrics": ("night", "expid", "camera", "fiber", "extraction"),
    "runs": ("run_id", "night"),
    "reductions": ("night", "expid", "camera", "extraction"),
    "deliveries": ("night", "filename", "file_sha256"),
    "frames": ("night", "expid", "camera", "file_version"),
    "models": ("stage", "model_id"),
    "fluxcal": ("night", "expid", "camera", "extraction"),
    "joined": ("night", "expid", "spectrograph", "fiber", "extraction"),
    "coadds": ("night", "targetid", "extraction", "scope"),
    "spectra_denoised": ("night", "source", "extraction", "scope", "expid", "spectrograph", "fiber", "targetid"),
    "labels": ("night", "expid", "spectrograph", "fiber", "method"),
}

ARRAY_COLUMNS: tuple[str, ...] = ("flux", "ivar", "mask", "sky")
"""List columns that hold one value per wavelength bin."""

PARTITION_COLUMN = "night"

TABLE_DESCRIPTIONS: dict[str, str] = {
    "exposures": "one row per raw frame in the lake (file version): header values, hashes, where the pixels are",
    "quarantine": "one row per refused file: why, and where its bytes were kept",
    "fibermap": "one row per fiber per exposure: the target each fiber saw",
    "spectra": "one row per fiber, exposure, camera and extraction: calibrated flux, ivar, mask and sky",
    "metrics": "one row per spectrum: signal-to-noise, wavelength and trace quality",
    "runs": "one row per processing run and night: code version and every parameter",
    "reductions": "one row per reduced frame: the marker that its spectra and metrics are complete",
    "deliveries": "one row per delivered file looked at: the ingest log",
    "frames": "one row per ingested frame: header type, pixel type (SPIT), probabilities, the type used",
    "models": "one row per model artifact in the lake: stage, architecture, held-out figures, model card",
    "fluxcal": "one row per camera, exposure and extraction: the response and telluric applied (expid 0: the night's mean)",
    "joined": "one row per fiber, exposure and extraction: flux-calibrated spectrum, arms joined",
    "coadds": "one row per target, night (and over all nights) and extraction: exposures combined, HEALPix index",
    "spectra_denoised": "one row per denoised joined spectrum or coadd: MAP spectrum, latent, subclass posterior (seed 004)",
    "labels": "one row per star fiber, exposure and method: stellar class and probabilities (DRC-Net, RC-Net, template)",
}
"""What each table holds, in one line (``fiberlake tables``); columns carry their own description."""
