"""DS-VisualChat's LLaVA-Otter blend: synthetic multi-round, multi-image samples from LLaVA + MIMIC-IT CGD.

Both datasets use COCO images. For each CGD sample (a group of related instructions about a pair of COCO images),
a blended sample is:
1. for each CGD image in order, 1..n LLaVA conversations about that image (0..n for the last image), the first of
   them introducing the image (``### Image k:``), later ones continuing without repeating it;
2. 1..m CGD turns (in random order); the first of them introduces the images not shown yet.
CGD samples whose images (all but the last) have no LLaVA conversation cannot keep the image order and are left out
when the source is built. The draws use the ``rng`` the dataset passes (seeded by blend seed and sample position),
so a run is deterministic by seed. CGD image ids map to COCO files with ``cgd_image_filename``
(``CGD_IMG_000000000139`` -> ``000000000139.jpg``); LLaVA records are matched by their ``image`` file name.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from ..conversation import Round
from .base import ConversationSource
from .llava import LlavaSource
from .mimicit import MimicItSource

log = logging.getLogger("megatron_visualchat.data")


class LlavaOtterBlendSource(ConversationSource):
    def __init__(
        self,
        path: str,
        *,
        llava: list[str] | str,
        images: str,
        cgd_image_filename: str = "{id_suffix}.jpg",
        max_llava_per_image: int | None = None,
        max_cgd_turns: int | None = None,
        max_rounds: int | None = None,
    ):
        """``path``: CGD_instructions.json; ``llava``: LLaVA json file(s); ``images``: the COCO image directory."""
        super().__init__(path, max_rounds=max_rounds)
        for name, value in (("max_llava_per_image", max_llava_per_image), ("max_cgd_turns", max_cgd_turns)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1 or None")
        self.cgd = MimicItSource(path, images=images, image_filename=cgd_image_filename)
        self.llava = [LlavaSource(p, images=images) for p in ([llava] if isinstance(llava, str) else llava)]
        self.max_llava_per_image = max_llava_per_image
        self.max_cgd_turns = max_cgd_turns
        by_image: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for s, source in enumerate(self.llava):
            for r in range(len(source)):
                names = source.image_names(r)
                if len(names) == 1:
                    by_image[names[0]].append((s, r))
        self._by_image = dict(by_image)
        self._groups = [g for g in range(len(self.cgd)) if self._eligible(g)]
        if len(self._groups) < len(self.cgd):
            log.info("%s: %d of %d CGD samples have LLaVA conversations for their images and are blended",
                     path, len(self._groups), len(self.cgd))

    def _names(self, group: int) -> list[str]:
        return [self.cgd.store.ref(i).name for i in self.cgd.image_ids(group)]

    def _eligible(self, group: int) -> bool:
        names = self._names(group)
        return bool(names) and all(n in self._by_image for n in names[:-1])

    def __len__(self):
        return len(self._groups)

    def where(self, index):
        return f"{self.cgd.where(self._groups[index])} (llava_otter blend)"

    def _rounds(self, index, rng):
        cgd = self.cgd.conversation(self._groups[index])
        images = cgd.rounds[0].images
        rounds: list[Round] = []
        for k, image in enumerate(images):
            candidates = self._by_image.get(image.name, [])
            most = min(len(candidates), self.max_llava_per_image or len(candidates))
            least = min(1 if k < len(images) - 1 else 0, most)
            show = (image,)
            for s, r in rng.sample(candidates, rng.randint(least, most)):
                for rnd in self.llava[s].conversation(r).rounds:
                    rounds.append(Round(rnd.question, rnd.answer, show))
                    show = ()
            if show:  # the last image had no LLaVA conversation drawn: the CGD turns introduce it
                break
        shown = sum(len(r.images) for r in rounds)
        turns = list(cgd.rounds)
        count = rng.randint(1, min(len(turns), self.max_cgd_turns or len(turns)))
        for n, t in enumerate(rng.sample(range(len(turns)), count)):
            rounds.append(Round(turns[t].question, turns[t].answer, images[shown:] if n == 0 else ()))
        return rounds
