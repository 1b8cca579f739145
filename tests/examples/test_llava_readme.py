"""The README's "Start from LLaVA-1.5" commands on a tiny random LLaVA: import-hf for real, the fine-tune as a
dry run (every flag, path and the imported checkpoint checked, the model built at TP=2 on the meta device), then
import --chat and export-hf for real (the export of the fine-tune's output is skipped: the dry run writes none). Only sizes and paths are swapped for the tiny model's."""

import json
import re

from tests.checkpoint.test_hf_llava import _tiny_llava
from tests.examples.launch import REPO, parse_reports, run_launch

SWAPS = {  # README value -> the tiny model's (the tiny LLaVA has the tiny CLIP and 512 positions)
    "clip-vit-l-14-336": "tiny",
    "--data llava:/data/multi_image.json": "--synthetic 40",
    "--seq-length 2048": "--seq-length 256",
    "--global-batch-size 32": "--global-batch-size 2",
}


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index("## Start from LLaVA-1.5"):], re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line and not line.startswith("#")]


def test_llava_readme_sequence(tmp_path):
    llava = _tiny_llava(tmp_path)
    script = []
    for command in readme_commands():
        if command.startswith("megatron-visualchat chat "):
            continue  # interactive
        if "--load runs/llava-mmca/chat" in command:
            continue  # the fine-tune is a dry run and writes no model; tests/checkpoint/test_hf_remote_export.py
            # exports MMCA chat models like it through this command's code
        for old, new in SWAPS.items():
            command = command.replace(old, new)
        command = re.sub(r"^LLAVA=\S+ OUT=\S+", f"LLAVA={llava} OUT={tmp_path}/out", command)
        command = re.sub(r"^torchrun", '"$TORCHRUN"', command.replace("runs/", f"{tmp_path}/runs/"))
        script.append(command + (f" --data-cache-dir {tmp_path}/data" if "pretrain_vchat.py" in command else ""))
    result = run_launch(" && ".join(script), {"OMP_NUM_THREADS": "1"}, timeout=900)  # four processes in a row
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (report,) = parse_reports(result.stdout)
    assert report["ok"] and sorted(report["ranks"]) == [0, 1]
    assert 0 < report["trainable"] < report["total"]
    config = json.loads((tmp_path / "runs" / "llava-hf" / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["vision_feature_layer"] == -2
