"""Training commands shown in the docs run as dry runs, so a renamed flag or a broken layout in them fails here."""

import re
from pathlib import Path

from tests.examples.launch import REPO, parse_reports, run_launch


def torchrun_command(doc: Path, section: str) -> str:
    """The first ``torchrun`` command (continuation lines joined) of the first bash block under ``section``."""
    text = doc.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(section):], re.S).group(1)
    command = block.replace("\\\n", " ").splitlines()[0]
    assert "torchrun" in command, command
    return command


def test_lora_tiny_run_in_docs(tmp_path):
    command = torchrun_command(REPO / "docs" / "lora.md", "## A tiny run on CPU")
    command = re.sub(r"\S*torchrun", '"$TORCHRUN"', command).replace("runs/lora/", f"{tmp_path}/")
    result = run_launch(command, {})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (report,) = parse_reports(result.stdout)
    assert report["ok"] and sorted(report["ranks"]) == [0, 1]
    assert 0 < report["trainable"] < report["total"]
