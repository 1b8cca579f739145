"""README's main command, examples/quickstart.sh, run for real with 2 training iterations (README's way of passing
trainer flags): synthetic data, TP=2 training on 2 CPU processes, checkpoint, chat export, then
examples/answer_heldout.py answering held-out conversations from the export."""

import os
import shutil
import socket
import subprocess

from megatron_visualchat.checkpoint.chat import CONFIG_FILE
from tests.examples.launch import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_quickstart_trains_exports_and_answers(tmp_path):
    # The script byte for byte, in a copy of the checkout's layout whose tools/setup_venv.sh is a no-op: the suite
    # already runs in the .venv it would set up, and reinstalling the package under other running tests is not
    # this test's business.
    root = tmp_path / "checkout"
    (root / "examples").mkdir(parents=True)
    (root / "tools").mkdir()
    shutil.copy2(REPO / "examples" / "quickstart.sh", root / "examples" / "quickstart.sh")
    for name in ("examples/answer_heldout.py", "pretrain_vchat.py", ".venv"):
        (root / name).symlink_to(REPO / name)
    (root / "tools" / "setup_venv.sh").write_text("#!/usr/bin/env bash\n")
    (root / "tools" / "setup_venv.sh").chmod(0o755)
    out = tmp_path / "run"
    env = {**os.environ, "OUT": str(out), "MASTER_PORT": str(_free_port()), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([root / "examples" / "quickstart.sh", "--train-iters", "2", "--no-progress-bar"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (out / "chat" / CONFIG_FILE).is_file()
    conversations = [line for line in result.stdout.splitlines() if line.startswith("held-out conversation ")]
    assert len(conversations) == 3, result.stdout[-2000:]
    assert "answers correct" in result.stdout and f"--load {out}/chat" in result.stdout
