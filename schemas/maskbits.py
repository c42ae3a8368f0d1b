"""Mask bits shared by every stage, defined once.

A bad value is always ``ivar = 0`` plus one or more of these bits, never a NaN in a table.
Pixel-level bits (2D) and spectrum-level bits (1D) share one namespace so a 1D mask is the OR
of the 2D bits that fed it plus the 1D-only bits.
"""

from __future__ import annotations

from enum import IntFlag

import numpy as np

MASK_DTYPE = np.uint32


class Mask(IntFlag):
    """Bitmask values for pixels and spectral bins."""

    BADPIX = 1 << 0
    """Detector defect or pixel with no valid inverse variance."""
    SATURATED = 1 << 1
    """Raw value at or above the ADC saturation level."""
    COSMIC = 1 << 2
    """Flagged as a cosmic-ray hit."""
    NONFINITE = 1 << 3
    """Input value was NaN or infinite."""
    OFFCCD = 1 << 4
    """Aperture or wavelength falls (partly) off the CCD."""
    DEADFIBER = 1 << 5
    """Fiber has no light on the master flat (broken or unplugged)."""
    LOWFLAT = 1 << 6
    """Fiber-flat response below threshold; flux not trustworthy."""
    SOMEBADPIX = 1 << 7
    """Some (not all) pixels in the aperture were masked."""
    ALLBADPIX = 1 << 8
    """Every pixel in the aperture was masked."""
    BADSKY = 1 << 9
    """Sky model could not be built at this wavelength."""
    EXTRAPWAVE = 1 << 10
    """Wavelength outside the range constrained by arc lines."""
    BAD2DFIT = 1 << 11
    """Profile (optimal / deconvolution) fit has a large chi^2 here."""
    FLUXFALLBACK = 1 << 12
    """Flux calibrated with the night's mean response (the exposure had too few good standards)."""
    NOFLUXCAL = 1 << 13
    """No response to calibrate with (no standards this night or before): flux 0, ivar 0."""
    TELLURIC = 1 << 14
    """Telluric absorption deeper than the flag level was divided out here."""
    NODATA = 1 << 15
    """No camera covers this bin of a joined or coadded spectrum (a gap between the arms, a
    missing camera, or every exposure masked here): flux 0, ivar 0."""

    @classmethod
    def describe(cls, value: int) -> list[str]:
        """Names of the bits set in ``value``.

        Examples
        --------
        >>> Mask.describe(5)
        ['BADPIX', 'COSMIC']
        """
        return [m.name for m in cls if int(value) & int(m)]


# Bits that make a value unusable (ivar is forced to zero when any is set).
FATAL = Mask.BADPIX | Mask.SATURATED | Mask.COSMIC | Mask.NONFINITE | Mask.OFFCCD | Mask.DEADFIBER | Mask.ALLBADPIX
