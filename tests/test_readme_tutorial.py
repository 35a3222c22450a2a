"""The README's "add your own use case" tutorial, run as written (in a temporary HOME and MLOPS_HOME,
with `uv run` as the project's environment and its own free port)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from mlops.core.environment import PROJECT_ROOT, TELEMETRY_OFF
from tests.servers import free_port

pytestmark = pytest.mark.slow


def tutorial_commands() -> str:
    readme = (PROJECT_ROOT / "README.md").read_text()
    match = re.search(r"<!-- tutorial: use case -->\n```bash\n(.*?)\n```", readme, flags=re.DOTALL)
    assert match, "README.md lost its use-case tutorial block"
    return match.group(1)


def test_the_use_case_tutorial_works_as_written(tmp_path):
    commands = tutorial_commands()
    port = str(free_port())
    script = commands.replace("uv run ", f"{Path(sys.executable).parent}/").replace("3002", port)
    env = {**os.environ, **TELEMETRY_OFF, "HOME": str(tmp_path / "user"), "MLOPS_HOME": str(tmp_path / "home")}
    for name in ("MLOPS_USECASE_PATHS", "DAGSTER_HOME", "MLOPS_SERVING_DIR"):
        env.pop(name, None)
    (tmp_path / "user").mkdir()
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=PROJECT_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for leftover in psutil.process_iter(["cmdline"]):  # the server the tutorial put in the background
            if "bentoml" in " ".join(leftover.info["cmdline"] or []) and port in (leftover.info["cmdline"] or []):
                leftover.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "spend: Customer spend forecast (regression" in out
    assert "[shopco] spend_pipeline ok" in out
    assert "spend-shopco: champion=1 challenger=1" in out
    # The server runs in the tutorial's foreground shell: its log lines share stdout with curl's answer.
    answer = re.search(r'\{"prediction_id".*?\}', out)
    assert answer, out[-3000:]
    prediction = json.loads(answer.group(0))
    assert prediction["customer_id"] == "shopco-c00042" and prediction["model_version"] == "1"
    assert isinstance(prediction["score"], float)
