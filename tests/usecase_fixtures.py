"""A small use case that tests declare in a temporary folder: a regression ("how much will this
customer spend in the next 14 days?") over its own raw tables, with its own feature SQL, label SQL
and simulator. Its files are the README tutorial's example (docs/examples/usecases/spend): adding a
use case to the platform is adding such a folder."""

from __future__ import annotations

import shutil
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "usecases" / "spend"
USECASE_YAML = (EXAMPLE / "usecase.yaml").read_text()
FEATURES_SQL = (EXAMPLE / "features.sql").read_text()
LABELS_SQL = (EXAMPLE / "labels.sql").read_text()
SIMULATOR_PY = (EXAMPLE / "simulator.py").read_text()


def write_spend_usecase(root: Path) -> Path:
    """Write the ``spend`` use case into ``root/spend`` (``root`` is a use-case root) and return its folder."""
    folder = Path(root) / "spend"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("usecase.yaml", "features.sql", "labels.sql", "simulator.py"):
        shutil.copyfile(EXAMPLE / name, folder / name)
    return folder
