"""The reduction's parameter sets: declared once, validated, hashed as documented, and fed to the stages."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from fiberlake.jobs.cli import build_parser
from fiberlake.jobs.cli_params import params_from_args
from fiberlake.processors import ccd, extract, fiberflat, psf, sky, tracing, wavecal
from fiberlake.processors.deconv import DeconvParams
from fiberlake.processors.params import ReductionParams
from fiberlake.processors.pipeline import deconv_params, rectify_config
from fiberlake.processors.rectify import RectifyConfig
from fiberlake.processors.rectify_map import MapConfig
from fiberlake.schemas.parset import ParameterError, flag_name


def _kwdefaults(fn) -> dict:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_every_parameter_is_declared_with_a_description_and_a_unique_flag():
    rows = ReductionParams.describe()
    assert len(rows) >= 80
    assert all(row["description"] and row["allowed"] for row in rows)
    flags = [flag_name(row["path"]) for row in rows]
    assert len(set(flags)) == len(flags)
    assert {"--extract", "--cosmics", "--rectify", "--chunk-fibers", "--deconv-device"} <= set(flags)


@pytest.mark.parametrize("stage, fn, renames", [
    ("tracing", tracing.trace_fibers, {}),
    ("wavecal", wavecal.calibrate_wavelength, {}),
    ("optimal", extract.optimal_extract, {}),
    ("box", extract.box_extract, {}),
    ("fiberflat", fiberflat.compute_fiberflat, {}),
    ("sky", sky.sky_model, {}),
    ("psf", psf.fit_psf, {}),
    ("profile", extract.measure_profile, {}),
])
def test_declared_defaults_agree_with_the_stage_functions(stage, fn, renames):
    """A stage function's keyword default and the parameter that feeds it are one value."""
    declared = getattr(ReductionParams(), stage).to_dict()
    defaults = _kwdefaults(fn)
    shared = [name for name in declared if renames.get(name, name) in defaults]
    assert shared, f"no parameter of {stage} reaches {fn.__name__}"
    for name in shared:
        value = defaults[renames.get(name, name)]
        value = value[0] if isinstance(value, tuple) and name == "deg" else value
        assert declared[name] == value, f"{stage}.{name}: declared {declared[name]!r}, {fn.__name__} {value!r}"


def test_ccd_deconv_and_rectify_settings_reach_their_objects_unchanged_by_default():
    params = ReductionParams()
    defaults = ccd.CCDParams(gain=1.0, read_noise=1.0, datasec=(slice(0, 1), slice(0, 1)),
                             biassec=(slice(0, 1), slice(1, 2)))
    from fiberlake.processors.pipeline import camera_ccd_params

    assert camera_ccd_params(defaults, params) == defaults
    assert _kwdefaults(ccd.combine_frames)["sigma"] == params.ccd.combine_sigma
    assert deconv_params(params) == DeconvParams()
    assert rectify_config(params) == RectifyConfig(map=MapConfig())
    changed = params.updated({"deconv.patch_fibers": 5, "execution.deconv_device": "cpu", "rectify.mlp_epochs": 3})
    assert deconv_params(changed).fibers_per_patch == 5 and deconv_params(changed).device == "cpu"
    assert rectify_config(changed).map.epochs == 3


def test_values_are_validated_with_a_sentence_naming_the_flag_and_the_range():
    with pytest.raises(ParameterError, match=r"--deconv-patch-fibers\) = 0 .*1 \.\. 1000 \(fibers\)"):
        ReductionParams().updated({"deconv.patch_fibers": 0})
    with pytest.raises(ParameterError, match="one of legendre, mlp"):
        ReductionParams().updated({"rectify.map": "spline"})
    with pytest.raises(ParameterError, match="expected an integer"):
        ReductionParams().updated({"wavecal.deg": True})
    with pytest.raises(ParameterError, match="expected a finite number"):
        ReductionParams().updated({"sky.clip_sigma": float("nan")})
    with pytest.raises(ParameterError, match="one of box, optimal, deconv"):
        ReductionParams().updated({"extractions": ("box", "horne")})
    with pytest.raises(ParameterError, match="unknown parameter 'degree' in wavecal"):
        ReductionParams.from_dict({"wavecal": {"degree": 3}})
    assert ReductionParams().updated({"tracing.max_offset": None}).tracing.max_offset is None


def test_cli_flags_come_from_the_declarations():
    parser = build_parser()
    args = parser.parse_args(["process", "--night", "2026-11-21", "--extract", "box,deconv", "--no-cosmics",
                              "--wavecal-tol-final", "0.5", "--chunk-fibers", "10", "--psf-invariant",
                              "--tracing-max-offset", "none"])
    params = params_from_args(args)
    assert params.extractions == ("box", "deconv") and not params.cosmics.enabled
    assert params.wavecal.tol_final == 0.5 and params.execution.chunk_fibers == 10 and params.psf.invariant
    assert params_from_args(parser.parse_args(["process", "--night", "2026-11-21"])) == ReductionParams()
    bad = parser.parse_args(["process", "--night", "2026-11-21", "--deconv-patch-fibers", "0"])
    with pytest.raises(ParameterError, match="allowed range 1 .. 1000"):
        params_from_args(bad)
    help_text = parser._subparsers._group_actions[0].choices["process"].format_help()
    assert "[default box,optimal;" in " ".join(help_text.split())


def test_params_file_round_trips_and_flags_override_it(tmp_path):
    params = ReductionParams().updated({"optimal.reject_sigma": 4.0, "execution.chunk_margin": 3})
    path = tmp_path / "p.json"
    path.write_text(json.dumps(params.to_dict()))
    args = build_parser().parse_args(["process", "--night", "2026-11-21", "--params", str(path), "--sky-clip-sigma", "2.5"])
    got = params_from_args(args)
    assert got.optimal.reject_sigma == 4.0 and got.execution.chunk_margin == 3 and got.sky.clip_sigma == 2.5
    assert ReductionParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params


def test_hashes_follow_what_each_product_depends_on():
    base = ReductionParams()
    execution = base.updated({"execution.chunk_fibers": 5, "execution.deconv_device": "cpu"})
    assert execution.digest() == base.digest()
    assert execution.calibration_digest() == base.calibration_digest()
    assert all(execution.extraction_digest(m) == base.extraction_digest(m) for m in ("box", "optimal", "deconv"))
    wave = base.updated({"wavecal.tol_final": 0.5})
    assert wave.calibration_digest() != base.calibration_digest()
    assert wave.extraction_digest("box") != base.extraction_digest("box")
    skyp = base.updated({"sky.clip_sigma": 4.0})
    assert skyp.calibration_digest() == base.calibration_digest()
    assert skyp.extraction_digest("box") != base.extraction_digest("box")
    dec = base.updated({"deconv.patch_rows": 20, "psf.order": 6})
    assert dec.extraction_digest("box") == base.extraction_digest("box")
    assert dec.method_digest("deconv") != base.method_digest("deconv")
    assert dec.calibration_digest() == base.calibration_digest()
    assert "execution" not in base.science_dict() and "execution" in base.to_dict()


def test_every_stage_set_is_frozen_and_nested_once():
    stages = [f.name for f in dataclasses.fields(ReductionParams) if dataclasses.is_dataclass(f.default_factory)
              if f.default_factory is not dataclasses.MISSING]
    # the reduction's 13 and the products above the frame (fluxcal, coadd, denoise, ...): each once
    assert len(stages) == len(set(stages)) >= 16
    assert {"ccd", "box", "optimal", "deconv", "fluxcal", "coadd", "denoise", "execution"} <= set(stages)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ReductionParams().box.halfwidth = 3.0  # type: ignore[misc]


def test_readme_parameter_section_is_generated_from_the_declarations():
    from pathlib import Path

    from fiberlake.jobs.runs import format_parameter_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("<!-- params:begin -->\n")[1].split("<!-- params:end -->")[0]
    assert section.strip() == format_parameter_markdown().strip(), "run: fiberlake params --markdown"
