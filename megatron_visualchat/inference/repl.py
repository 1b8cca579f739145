"""The interactive chat loop: rank 0 reads the terminal, every tensor-parallel rank runs the same session calls.

Input lines are commands or messages:

    /image PATH [PATH ...]   attach images to the next message (checked right away; quote paths with spaces)
    /images                  list the conversation's images and the attached ones
    /detach                  drop the attached images (not sent yet)
    /clear  (or clear)       start a new conversation
    /quit   (or quit, exit, end of input)
    /help
    anything else            a message: sent with the attached images, the answer streams back

Rank 0 reads image files itself and sends their bytes with the message, so other ranks need no access to them.
Images a drawing model writes (``OUTPUT#k`` in its answer) are saved by rank 0 as PNG files in ``image_dir``,
named ``<start time>-r<round>-<k>.png`` and listed after the answer.
Attached images stay attached until a message carrying them is answered: a refused message (too long for the
context, say) keeps them for the retry.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional, TextIO

from megatron_visualchat.inference.session import ChatInputError, ChatSession, load_chat_image

HELP = (
    "  /image PATH [PATH ...]  attach images to your next message\n"
    "  /images                 list images\n"
    "  /detach                 drop the attached images\n"
    "  /clear                  new conversation\n"
    "  /quit                   leave\n"
)


def broadcast_from_rank0(obj):
    """``obj`` of global rank 0 on every rank (the command a user typed)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


class ChatRepl:
    def __init__(self, session: ChatSession, *, is_main: bool, stdin: Optional[TextIO] = None,
                 stdout: Optional[TextIO] = None, sync: Callable = broadcast_from_rank0,
                 image_dir: str | Path = "chat-images"):
        self.session, self.is_main, self.sync = session, is_main, sync
        self.image_dir, self.started = Path(image_dir), time.strftime("%Y%m%d-%H%M%S")
        self.stdin, self.stdout = stdin or sys.stdin, stdout or sys.stdout
        self.attached: list[tuple[str, bytes]] = []  # rank 0 only: images waiting for the next message

    def say(self, text: str = "", end: str = "\n") -> None:
        if self.is_main:
            self.stdout.write(text + end)
            self.stdout.flush()

    def _queued(self) -> str:
        """The numbers the attached images will get, as ``+3 +4``."""
        first = len(self.session.image_names) + 1
        return " ".join(f"+{n}" for n in range(first, first + len(self.attached)))

    def _prompt(self) -> str:
        shown = " ".join(map(str, self.session.image_numbers)) or "none"
        queued = self._queued()
        return f"[images: {shown}{' | ' + queued if queued else ''}] you> "

    def _read(self) -> Optional[str]:
        if self.stdin is sys.stdin and sys.stdin.isatty():
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            try:
                return input(self._prompt())
            except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: leave (all ranks)
                return None
        self.say(self._prompt(), end="")
        line = self.stdin.readline()
        return None if line == "" else line.rstrip("\n")

    def attach(self, paths: list[str]) -> None:
        """Check and keep images for the next message (rank 0)."""
        limit = self.session.max_images - len(self.session.image_names) - len(self.attached)
        for path in paths:
            if limit <= 0:
                self.say(f"  ! not attached {path}: at most {self.session.max_images} images per conversation")
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read()
                load_chat_image((path, data))
            except (OSError, ChatInputError) as e:
                self.say(f"  ! not attached: {e}")
                continue
            self.attached.append((path, data))
            limit -= 1
            self.say(f"  attached {path} as image {len(self.session.image_names) + len(self.attached)} "
                     "(sent with your next message)")

    def _next_command(self) -> tuple:
        """Rank 0: read lines until one needs every rank (message, clear, quit)."""
        while True:
            line = self._read()
            if line is None:
                self.say()
                return ("quit",)
            text = line.strip()
            word = text.split(maxsplit=1)[0].lower() if text else ""
            if not text:
                continue
            if word in ("quit", "exit", "/quit", "/exit") and text.lower() == word:
                return ("quit",)
            if word in ("clear", "/clear") and text.lower() == word:
                self.attached = []
                return ("clear",)
            if word in ("/image", "/img"):
                try:
                    paths = shlex.split(text)[1:]
                except ValueError as e:  # e.g. an unclosed quote
                    self.say(f"  ! {e}")
                    continue
                if paths:
                    self.attach(paths)
                else:
                    self.say("  usage: /image PATH [PATH ...]")
                continue
            if word == "/images":
                shown = len(self.session.image_names)
                names = self.session.image_names + [p for p, _ in self.attached]
                listing = [f"  image {i}: {n}{'  (attached, not sent yet)' if i > shown else ''}"
                           for i, n in enumerate(names, start=1)]
                self.say("\n".join(listing) or "  no images yet")
                continue
            if word == "/detach" and text.lower() == word:
                self.say(f"  detached {len(self.attached)} image(s)" if self.attached else "  no images attached")
                self.attached = []
                continue
            if word in ("/help", "help", "?"):
                self.say(HELP, end="")
                continue
            return ("ask", text, list(self.attached))

    def run(self) -> None:
        s = self.session
        self.say(f"context {s.max_length} positions, up to {s.max_images} images; /help for commands")
        while True:
            command = self.sync(self._next_command() if self.is_main else None)
            if command[0] == "quit":
                return
            if command[0] == "clear":
                s.clear()
                self.say("  conversation cleared")
                continue
            _, text, images = command
            self.say("assistant> ", end="")
            try:
                turn = s.ask(text, images, on_text=(lambda t: self.say(t, end="")) if self.is_main else None)
            except ChatInputError as e:
                self.say(f"\n  ! {e}")
                if self.attached:
                    self.say(f"  still attached: {self._queued()} (sent with your next message; /detach drops them)")
                continue
            self.attached = []
            self._save_images(turn)
            stop = {"eos": "", "length": " · cut at max new tokens",
                    "context_full": " · context full: /clear to continue"}[turn.finish_reason]
            self.say(f"\n  [round {s.rounds} · {len(turn.token_ids)} tokens · {turn.seconds:.2f} s "
                     f"(first token {turn.seconds_to_first_token:.2f} s) · context {s.length}/{s.max_length}{stop}]")

    def _save_images(self, turn) -> None:
        """Rank 0 writes the answer's drawn images and names them (``OUTPUT#k`` in the answer is image k)."""
        if not (self.is_main and turn.images):
            return
        self.image_dir.mkdir(parents=True, exist_ok=True)
        for k, picture in enumerate(turn.images, start=1):
            path = self.image_dir / f"{self.started}-r{self.session.rounds}-{k}.png"
            picture.save(path, format="PNG")
            self.say(f"\n  OUTPUT#{k}: {path}", end="")
