"""``make lab``: JupyterLab with its news pop-up and update check off, from settings inside the repository."""

from __future__ import annotations

from pathlib import Path

from jupyterlab.commands import get_app_dir
from jupyterlab_server.settings_utils import get_settings

from mmflow.lab import SETTINGS_DIR, lab_command

ROOT = Path(__file__).resolve().parent.parent
NOTIFICATION = "@jupyterlab/apputils-extension:notification"


def test_lab_reads_settings_that_turn_off_news_and_update_checks(tmp_path):
    command = lab_command(str(ROOT / "notebooks"))
    assert f"--LabApp.app_settings_dir={SETTINGS_DIR}" in command
    assert SETTINGS_DIR.is_relative_to(ROOT)  # read from the checkout; nothing written outside it
    # what JupyterLab's settings service will serve for the notification plugin, read by jupyterlab_server itself
    settings, warnings = get_settings(
        str(SETTINGS_DIR), str(Path(get_app_dir()) / "schemas"), str(tmp_path), schema_name=NOTIFICATION
    )
    defaults = {key: spec["default"] for key, spec in settings["schema"]["properties"].items()}
    assert defaults["fetchNews"] == "false" and defaults["checkForUpdates"] is False
    assert not any(warnings)  # the overrides validate against the schema
