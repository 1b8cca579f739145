"""Replay scripted multi-round, multi-image conversations (DS-VisualChat's ``eval/eval_data/*.json``) through a
chat session, write every round to CSV and JSONL, score rounds that carry a reference, and summarise.

Input: a JSON object ``{conversation name: [round, ...]}``. A round is DS-VisualChat's list form
``[question]`` / ``[question, "img1.jpg img2.jpg"]`` (paths separated by spaces), or an object

    {"question": str, "images": "a.jpg b.jpg" | [paths], "answer": str | [str, ...] | [x1, y1, x2, y2],
     "scorer": "exact_match" | "vqa_accuracy" | "box_iou", "box_format": "pixel" | "normalized",
     "box_image": k, "box_text": "norm3" | "qwen" | "pixel"}

``answer`` is the reference; without ``scorer`` a 4-number answer is scored with ``box_iou`` and text with
``exact_match``. A box refers to image ``box_image`` of the conversation (1-based; default the last one shown).
``box_text`` names the format a grounding-trained model writes boxes in (``data/boxes.py``): the answer's box is
read in the encoder's frame and mapped back to the source image through the session's preprocessing; the summary
gives such rounds' accuracy@IoU>=0.5 and mean IoU (REC, ``docs/grounding.md``).
Image paths are resolved against ``image_root`` (DS-VisualChat's files use paths relative to its repo) and must
stay inside it, symlinks resolved, and be regular files within the chat's byte cap: ``../``, an absolute path
elsewhere, a FIFO or a device is an error naming the file, conversation and round. The file must be UTF-8 JSON.

Each conversation starts from a cleared session, and each round's answer (the model's own) stays in the history,
as in DS-VisualChat's ``batch_generation.py``. A round whose input fails (missing image, context full) is written
with its error and the conversation goes on. Images a drawing model writes (``OUTPUT#k`` in the answer) are saved
as ``<image_dir>/<conversation number>-<name>-r<round>-<k>.png`` and listed in the record's ``output_images``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from megatron_visualchat.data.boxes import BOX_FORMATS as BOX_TEXT_FORMATS
from megatron_visualchat.data.files import FileRefused, check_regular, confined
from megatron_visualchat.data.images import DEFAULT_MAX_IMAGE_BYTES
from megatron_visualchat.data.lazy import load_json
from megatron_visualchat.inference.scoring import BOX_FORMATS, ScoreContext, get_scorer
from megatron_visualchat.inference.session import ChatInputError, ChatSession

_ROUND_KEYS = {"question", "images", "answer", "scorer", "box_format", "box_image", "box_text"}


@dataclass(frozen=True)
class EvalRound:
    question: str
    images: tuple[str, ...] = ()
    reference: object = None
    scorer: Optional[str] = None
    box_format: str = "pixel"
    box_image: Optional[int] = None
    box_text: Optional[str] = None


@dataclass(frozen=True)
class EvalConversation:
    name: str
    rounds: tuple[EvalRound, ...]


def _is_box(value) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)


def _image_path(name: str, where: str, image_root: Path) -> str:
    """The image's real path inside ``image_root``. A file that is there must be a regular file within the byte
    cap; a missing one is left to the replay (that round records the error and the conversation goes on)."""
    try:
        path = confined(os.path.join(image_root, name), str(image_root))
        if os.path.exists(path):
            check_regular(path, DEFAULT_MAX_IMAGE_BYTES)
    except FileRefused as e:
        raise ValueError(f"{where}: image {name!r}: {e}") from None
    return path


def _parse_round(raw, where: str, image_root: Path) -> EvalRound:
    if isinstance(raw, list):
        if not 1 <= len(raw) <= 2 or not all(isinstance(x, str) for x in raw):
            raise ValueError(f"{where}: a list round is [question] or [question, 'image paths'], got {raw!r}")
        raw = {"question": raw[0], "images": raw[1] if len(raw) > 1 else ""}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a round is a list or an object, got {type(raw).__name__}")
    unknown = set(raw) - _ROUND_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_ROUND_KEYS)}")
    question = raw.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    images = raw.get("images", [])
    images = images.split() if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError(f"{where}: 'images' must be a string of space-separated paths or a list of paths")
    reference, scorer = raw.get("answer"), raw.get("scorer")
    if scorer is not None and reference is None:
        raise ValueError(f"{where}: scorer {scorer!r} needs a reference 'answer'")
    if reference is not None and scorer is None:
        scorer = "box_iou" if _is_box(reference) else "exact_match"
    if scorer is not None:
        try:
            get_scorer(scorer)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    box_format = raw.get("box_format", "pixel")
    if box_format not in BOX_FORMATS:
        raise ValueError(f"{where}: box_format={box_format!r} is not one of {list(BOX_FORMATS)}")
    box_image = raw.get("box_image")
    if box_image is not None and (not isinstance(box_image, int) or box_image < 1):
        raise ValueError(f"{where}: box_image={box_image!r} must be an image number >= 1")
    box_text = raw.get("box_text")
    if box_text is not None and (box_text not in BOX_TEXT_FORMATS or scorer != "box_iou"):
        raise ValueError(f"{where}: box_text={box_text!r} needs a box answer and is one of "
                         f"{sorted(BOX_TEXT_FORMATS)}")
    paths = tuple(_image_path(p, where, image_root) for p in images)
    return EvalRound(question, paths, reference, scorer, box_format, box_image, box_text)


def load_eval_file(path: Union[str, Path], image_root: Union[str, Path, None] = None) -> list[EvalConversation]:
    path = Path(path)
    try:
        data = load_json(str(path))
    except (OSError, ValueError) as e:  # missing, not a regular file, not UTF-8, not JSON: each names the place
        raise ValueError(f"cannot read the evaluation file: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty object {{conversation name: [rounds]}}")
    root = Path(image_root) if image_root is not None else Path.cwd()
    conversations = []
    for name, rounds in data.items():
        if not isinstance(rounds, list) or not rounds:
            raise ValueError(f"{path}: conversation {name!r} must be a non-empty list of rounds")
        conversations.append(EvalConversation(name, tuple(
            _parse_round(r, f"{path}: conversation {name!r} round {i}", root) for i, r in enumerate(rounds, 1))))
    return conversations


@dataclass
class RoundRecord:
    conversation: str
    round: int  # 1-based
    images: list[str]
    image_numbers: list[int]
    question: str
    answer: str = ""
    reference: object = None
    scorer: Optional[str] = None
    score: Optional[float] = None
    score_detail: str = ""
    iou: Optional[float] = None
    finish_reason: str = ""
    prompt_positions: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    error: str = ""
    output_images: list[str] = field(default_factory=list)  # PNG files of the images the answer drew, in order


def _score(session: ChatSession, rnd: EvalRound, answer: str):
    number = rnd.box_image or len(session.image_sizes)
    size = session.image_sizes[number - 1] if 1 <= number <= len(session.image_sizes) else None
    geometry = None
    if rnd.box_text is not None and size is not None:
        preprocess = getattr(session.image_transform, "preprocess", None)
        if preprocess is None:
            raise ValueError("box_text needs the session's image transform to declare its preprocessing")
        geometry = preprocess.geometry(*size)
    return get_scorer(rnd.scorer)(answer, rnd.reference, ScoreContext(size, rnd.box_format, rnd.box_text, geometry))


def _save_images(turn, image_dir: Optional[Path], stem: str) -> list[str]:
    if not turn.images or image_dir is None:
        return []
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = [image_dir / f"{stem}-{k}.png" for k in range(1, len(turn.images) + 1)]
    for picture, path in zip(turn.images, paths):
        picture.save(path, format="PNG")
    return [str(p) for p in paths]


def replay(session: ChatSession, conversations: list[EvalConversation],
           on_record: Optional[Callable[[RoundRecord], None]] = None,
           image_dir: Union[str, Path, None] = None) -> list[RoundRecord]:
    """``image_dir``: where drawn images are written (none are without it: tensor-parallel ranks but the first)."""
    image_dir = None if image_dir is None else Path(image_dir)
    records = []
    for number, conv in enumerate(conversations, start=1):
        session.clear()
        for index, rnd in enumerate(conv.rounds, start=1):
            rec = RoundRecord(conv.name, index, list(rnd.images), [], rnd.question, reference=rnd.reference,
                              scorer=rnd.scorer)
            try:
                turn = session.ask(rnd.question, rnd.images)
            except ChatInputError as e:
                rec.error = str(e)
            else:
                rec.answer, rec.image_numbers = turn.answer, turn.new_image_numbers
                rec.finish_reason, rec.prompt_positions = turn.finish_reason, turn.prompt_positions
                rec.new_tokens, rec.seconds = len(turn.token_ids), turn.seconds
                safe_name = re.sub(r"[^\w.-]+", "_", conv.name)[:64]
                rec.output_images = _save_images(turn, image_dir, f"{number:03d}-{safe_name}-r{index}")
                if rnd.scorer:
                    try:
                        score = _score(session, rnd, turn.answer)
                    except ValueError as e:
                        rec.error = f"cannot score: {e}"
                    else:
                        rec.score, rec.score_detail, rec.iou = score.value, score.detail, score.iou
            records.append(rec)
            if on_record is not None:
                on_record(rec)
    return records


CSV_COLUMNS = ("conversation", "round", "images", "image_numbers", "question", "answer", "reference", "scorer",
               "score", "score_detail", "iou", "finish_reason", "prompt_positions", "new_tokens", "seconds", "error",
               "output_images")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(map(str, value)) if all(isinstance(v, (str, int)) for v in value) else json.dumps(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_csv(records: list[RoundRecord], path: Union[str, Path]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for rec in records:
            row = asdict(rec)
            if isinstance(rec.reference, list) and not _is_box(rec.reference):
                row["reference"] = json.dumps(rec.reference)
            writer.writerow([_cell(row[c]) for c in CSV_COLUMNS])


def write_jsonl(records: list[RoundRecord], path: Union[str, Path]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(asdict(rec), ensure_ascii=False) + "\n")


def summarize(records: list[RoundRecord]) -> list[dict]:
    """One row per scorer (in order of first use) and one for all rounds; box rows add the mean IoU (a failed or
    box-less round counts 0)."""
    groups: dict[str, list[RoundRecord]] = {}
    for rec in records:
        if rec.scorer:
            groups.setdefault(rec.scorer, []).append(rec)
    groups["all rounds"] = records
    rows = []
    for name, recs in groups.items():
        ok = [r for r in recs if not r.error]
        scored = [r.score for r in ok if r.score is not None]
        rows.append(dict(
            scorer=name, rounds=len(recs), errors=len(recs) - len(ok),
            score=(100.0 * sum(scored) / len(recs)) if name != "all rounds" and recs else None,
            mean_iou=(sum(r.iou or 0.0 for r in recs) / len(recs)) if name == "box_iou" and recs else None,
            seconds_per_round=sum(r.seconds for r in ok) / len(ok) if ok else None,
            new_tokens=sum(r.new_tokens for r in ok), images=sum(len(r.output_images) for r in ok)))
    return rows


def summary_table(rows: list[dict]) -> str:
    """Markdown table of ``summarize``'s rows. A round that failed counts as a miss in its scorer's score. An
    ``images`` column (images drawn) appears when a model drew any."""
    drew = any(r.get("images") for r in rows)
    lines = ["| scorer | rounds | errors | score (%) | s / round | new tokens | mean IoU |" + " images |" * drew,
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * drew]
    for r in rows:
        score = "" if r["score"] is None else f"{r['score']:.1f}"
        secs = "" if r["seconds_per_round"] is None else f"{r['seconds_per_round']:.3f}"
        iou = "" if r.get("mean_iou") is None else f"{r['mean_iou']:.3f}"
        lines.append(f"| {r['scorer']} | {r['rounds']} | {r['errors']} | {score} | {secs} | {r['new_tokens']} "
                     f"| {iou} |" + f" {r['images']} |" * drew)
    return "\n".join(lines) + "\n"
