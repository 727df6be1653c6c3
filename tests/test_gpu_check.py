"""The one-command GPU check (``benchmarks/gpu_check.sh``) runs end to end as a dry run: every step is recorded
with its command and exit status in the report, and the script's exit status counts the failed steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_records_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    report = (tmp_path / "gpu_check.md").read_text()
    assert result.returncode == 0, result.stdout + result.stderr + report
    assert report.startswith("# GPU check (DRY RUN")
    for title in ("environment", "kernel tests (collected only)", "kernels.py (arguments only)",
                  "decode.py (tiny random model on CPU)"):
        assert f"## {title}" in report
    assert report.count("- exit status 0,") == report.count("## ")
    assert "| tiny | rabit-eager |" in report  # the decode step printed its table
