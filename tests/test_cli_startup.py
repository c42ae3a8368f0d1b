"""The command starts fast: building its parser imports neither torch nor Ray.

Every subprocess a run, a watcher or a test starts pays the parser's imports; torch alone costs
seconds. The neural stages import it when they run.
"""

from __future__ import annotations

import subprocess
import sys


def test_the_parser_imports_no_torch_and_no_ray():
    code = ("import sys; from fiberlake.jobs.cli import build_parser; build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_train_stage_has_its_flags():
    from fiberlake.jobs.cli import build_parser

    parser = build_parser()
    for stage, flag in (("typing", "--train-epochs"), ("denoise", "--train-ae-steps"),
                        ("deconvolve", "--train-combination"), ("classify", "--train-patience")):
        args = parser.parse_args(["train", stage, flag, "3" if flag != "--train-combination" else "PSF-iPSF1"])
        assert args.func.__name__.startswith("_cmd_train")
