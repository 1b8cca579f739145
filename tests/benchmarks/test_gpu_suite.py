"""benchmarks/gpu_suite.py on CPU: --cpu-smoke runs every row and peer, and the DS-VisualChat peer computes MMCA."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.peers.dsvc_mmca import dsvc_masks, dsvc_mmca_attention
from megatron_visualchat.model.mmca import mmca_attention_reference
from megatron_visualchat.model.token_codes import codes_from_layout

REPO = Path(__file__).resolve().parents[2]
METHODS = {
    "a": ["ours: mmca_attention", "peer: SDPA causal", "peer: DS-VC eager MMCA", "peer: DS-VC mask build"],
    "b": ["ours: megatron-core VisualChat", "peer: HF LlamaForCausalLM"],
    "c": ["ours: KV reuse", "peer: re-encode all (DS-VC)"],
}


def test_cpu_smoke_prints_every_row_and_peer(tmp_path):
    out = tmp_path / "suite.json"
    run = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--cpu-smoke", "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    table = [row.split(" | ") for row in run.stdout.splitlines() if row.startswith("| ") and "---" not in row]
    assert table[0][0] == "| row"
    lines = json.loads(out.read_text())["lines"]
    for row, methods in METHODS.items():
        for method in methods:
            printed = [cells for cells in table if cells[0] == f"| {row}" and cells[2] == method]
            measured = [e for e in lines if e["row"] == row and e["method"] == method]
            assert printed and len(printed) == len(measured), (row, method)
            assert all(e["status"] is None and e["ms"] > 0 for e in measured), measured
    assert sum(e["row"] == "c" for e in lines) == 2 * 3  # --cpu-smoke chats 3 rounds


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_dsvc_peer_equals_reference_mmca(dtype, tol):
    """Faithful peer: where DS-VC's masks give both branches keys (every row from the first image on, the sequence
    starting with text) it is our MMCA with image_rows="self+text", combine="sum"; before the first image its image
    softmax is not empty but spread over earlier text and every image (the leak docs/design/mmca.md describes)."""
    layout = "ttt000tt11tttt2222t3t"
    modality, image_id, _ = (t[None] for t in codes_from_layout(layout))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, len(layout), 8, generator=gen).to(dtype) for h in (4, 2, 2))
    reference = mmca_attention_reference(q, k, v, modality, image_id, image_rows="self+text").float()
    peer = dsvc_mmca_attention(q, k, v, dsvc_masks(modality, dtype)).float()
    first_image = layout.index("0")
    torch.testing.assert_close(peer[:, :, first_image:], reference[:, :, first_image:], atol=tol, rtol=tol)
    assert (peer[:, :, :first_image] - reference[:, :, :first_image]).abs().amax() > 0.1
