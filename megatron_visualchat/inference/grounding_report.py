"""The grounding quickstart's verdict: held-out REC accuracy@0.5 (IoU >= 0.5) of an ``eval-replay`` run, against
a model that ignores the image and always answers the mean training box.

    python -m megatron_visualchat.inference.grounding_report --grounding DIR --results EVAL_OUT/results.jsonl

``DIR`` is the synthetic grounding set (``train.jsonl`` boxes give the mean box, ``eval_rec.json`` the held-out
references, both in source pixels).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_visualchat.inference.scoring import box_iou

HIT = 0.5


def mean_training_box(grounding: Path) -> list[float]:
    """The mean [x1, y1, x2, y2] of the training targets (``bbox`` is COCO's [x, y, w, h])."""
    boxes = [json.loads(line)["bbox"] for line in (grounding / "train.jsonl").read_text().splitlines() if line]
    corners = [(x, y, x + w, y + h) for x, y, w, h in boxes]
    return [sum(c[i] for c in corners) / len(corners) for i in range(4)]


def baseline(grounding: Path, conversations: set[str]) -> tuple[float, float]:
    """(accuracy@0.5, mean IoU) of always answering the mean training box, over these held-out conversations."""
    box = mean_training_box(grounding)
    replay = json.loads((grounding / "eval_rec.json").read_text())
    ious = [box_iou(box, rnd["answer"]) for name, rounds in replay.items() if name in conversations for rnd in rounds]
    return sum(iou >= HIT for iou in ious) / len(ious), sum(ious) / len(ious)


def model_scores(results: Path) -> tuple[float, float, set[str]]:
    """(accuracy@0.5, mean IoU, conversations) of an eval-replay ``results.jsonl`` (a failed round counts as a miss)."""
    records = [json.loads(line) for line in results.read_text().splitlines() if line]
    ious = [r["iou"] or 0.0 for r in records]
    return sum(iou >= HIT for iou in ious) / len(ious), sum(ious) / len(ious), {r["conversation"] for r in records}


def report(grounding: Path, results: Path) -> dict:
    accuracy, iou, conversations = model_scores(results)
    base_accuracy, base_iou = baseline(grounding, conversations)
    return {"rounds": len(conversations), "accuracy": accuracy, "mean_iou": iou, "baseline_accuracy": base_accuracy,
            "baseline_mean_iou": base_iou}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grounding", type=Path, required=True, help="the synthetic grounding set's directory")
    parser.add_argument("--results", type=Path, required=True, help="eval-replay's results.jsonl")
    args = parser.parse_args()
    r = report(args.grounding, args.results)
    print(f"held-out REC accuracy@0.5 over {r['rounds']} expressions: {r['accuracy']:.1%} (mean IoU "
          f"{r['mean_iou']:.3f}); always answering the mean training box: {r['baseline_accuracy']:.1%} (mean IoU "
          f"{r['baseline_mean_iou']:.3f})")


if __name__ == "__main__":
    main()
