"""HF LLaVA (``LlavaForConditionalGeneration``: CLIP tower, two-layer GELU projector, LLaMA) -> this project's
checkpoints, streamed like ``hf-to-megatron``; ``megatron-visualchat import-hf``.

The language model goes through the LLaMA converter's own writer (``convert.write_megatron``) behind a renaming
view, so the reader (``HFWeights``: one tensor's bytes at a time) and the fusions are the LLaMA converter's. The
vision tower is matched to a registered encoder (``model/vision`` ENCODERS) by its config, LLaVA's feature choice
becomes the encoder's options (``vision_feature_layer`` -> ``feature_layer``, ``vision_feature_select_strategy``
"default" -> ``drop_cls``) and ``multi_modal_projector.linear_1/act/linear_2`` the ``mlp`` projector.

Two outputs:

* training layout (default): ``OUT/`` is a converted base LLM at ``--tp/--pp`` (``--llm-load OUT``), plus
  ``OUT/vision/`` (a HF CLIPVisionModel directory for ``--vision-weights``), ``OUT/projector.safetensors`` (the
  projector's own state dict, for ``--projector-weights``), ``OUT/chat_tokenizer/`` (``--tokenizer-dir``) and
  ``OUT/llava_import.json``, which records the training flags that rebuild this model.
* ``--chat``: a chat checkpoint (``checkpoint/chat.py`` file names and config; ``attention.mode`` "causal", which
  is LLaVA's plain causal attention), its one weights file written tensor by tensor.

LLaVA-1.5's release configs leave out every key equal to transformers' default, so the defaults below fill them;
the shape check of every tensor against the config catches a wrong guess before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

from megatron_visualchat.argtypes import int_list
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.config import (
    DTYPES, LLM_FROM_CHECKPOINT, AttentionConfig, ConfigError, LLMConfig, VisionConfig, VisualChatConfig,
)

ARCHITECTURES = ("LlavaForConditionalGeneration",)
# transformers' defaults for keys LLaVA-1.5's release config.json leaves out (LlamaConfig, CLIPVisionConfig,
# LlavaConfig).
LLAMA_DEFAULTS = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                  "vocab_size": 32000, "hidden_act": "silu", "tie_word_embeddings": False}
CLIP_VISION_DEFAULTS = {"model_type": "clip_vision_model", "hidden_size": 768, "intermediate_size": 3072,
                        "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
                        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3}
LLAVA_DEFAULTS = {"image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
                  "vision_feature_select_strategy": "default", "multimodal_projector_bias": True,
                  "tie_word_embeddings": False}
SELECT_STRATEGIES = {"default": True, "full": False}  # LLaVA's vision_feature_select_strategy -> drop_cls
# LLaVA's projector activation -> ours: the ``mlp`` projector is timm's Mlp with nn.GELU (exact erf GELU).
PROJECTOR_ACTS = {"gelu": "mlp"}
PROJECTOR_TENSORS = {"mlp.fc1.weight": "linear_1.weight", "mlp.fc1.bias": "linear_1.bias",
                     "mlp.fc2.weight": "linear_2.weight", "mlp.fc2.bias": "linear_2.bias"}
VISION_DIR, PROJECTOR_FILE, TOKENIZER_OUT, RECORD = "vision", "projector.safetensors", "chat_tokenizer", \
    "llava_import.json"
CHAT_PREFIXES = {"llm": "language_model.", "encoder": "vision.encoder.model.", "projector": "vision.projector."}


@dataclass(frozen=True)
class LlavaLayout:
    """Where a LLaVA checkpoint keeps each part: release checkpoints (and transformers' own save_pretrained) use
    ``language_model.model.*`` / ``language_model.lm_head``; the LlavaModel layout ``model.language_model.*``."""

    language: str
    lm_head: str
    vision: str
    projector: str

    def hf_name(self, llama_name: str) -> str:
        """HF LLaMA name (``model.layers.0...``, ``lm_head.weight``) -> this checkpoint's name."""
        if llama_name.startswith("lm_head."):
            return self.lm_head + llama_name.removeprefix("lm_head.")
        return self.language + llama_name.removeprefix("model.")

    def llama_name(self, name: str) -> Optional[str]:
        if name.startswith(self.lm_head):
            return "lm_head." + name.removeprefix(self.lm_head)
        if name.startswith(self.language):
            return "model." + name.removeprefix(self.language)
        return None


LAYOUTS = (LlavaLayout("language_model.model.", "language_model.lm_head.", "vision_tower.", "multi_modal_projector."),
           LlavaLayout("model.language_model.", "lm_head.", "model.vision_tower.", "model.multi_modal_projector."))


class Renamed(Mapping[str, torch.Tensor]):
    """A lazy view of the tensors of ``weights`` (an ``HFWeights``) whose names ``rename`` maps (None: left out),
    under the new names; the same ``weight_map`` / ``shapes`` interface, so the LLaMA converter's checks apply."""

    def __init__(self, weights, rename: Callable[[str], Optional[str]]):
        self._weights, self._rename = weights, rename
        self._original = {new: old for old in weights.weight_map if (new := rename(old)) is not None}
        self.weight_map = {new: weights.weight_map[old] for new, old in self._original.items()}

    def shapes(self, file: Path) -> dict[str, tuple[int, ...]]:
        return {new: shape for old, shape in self._weights.shapes(file).items()
                if (new := self._rename(old)) is not None}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._weights[self._original[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._original

    def __iter__(self) -> Iterator[str]:
        return iter(self._original)

    def __len__(self) -> int:
        return len(self._original)


# ------------------------------------------------------------------------------------------ the plan

@dataclass
class LlavaImport:
    """Everything ``import-hf`` derives from the directory, checked before anything is written."""

    hf: object  # convert.HFCheckpoint of the LLaVA directory, its weights renamed to the language model's
    layout: LlavaLayout
    llm: LLMConfig
    text_config: dict  # as a LlamaForCausalLM config.json, for megatron-to-hf
    vision_config: dict
    vision: VisionConfig
    tokenizer: object  # VisualChatTokenizer
    all_weights: object  # HFWeights of the whole directory

    @property
    def config(self) -> VisualChatConfig:
        return VisualChatConfig(llm=self.llm, attention=AttentionConfig(mode="causal"), vision=self.vision)


def _refuse(source, key, value, why) -> CheckpointError:
    return CheckpointError(f"{source}: {key}={value!r} is not supported ({why})")


def _detect_layout(weight_map: Mapping[str, Path], source: str) -> LlavaLayout:
    for layout in LAYOUTS:
        if layout.hf_name("model.embed_tokens.weight") in weight_map:
            return layout
    raise CheckpointError(f"{source}: no language-model embedding under any known LLaVA layout (looked for "
                          f"{[lay.hf_name('model.embed_tokens.weight') for lay in LAYOUTS]})")


def match_encoder(vision_config: Mapping, source: str) -> str:
    """The registered encoder whose architecture the HF vision config describes (built on the meta device)."""
    from megatron_visualchat.model.vision import ENCODERS
    from megatron_visualchat.model.vision.checkpoint_formats import convert_vit

    tried = []
    for name, spec in ENCODERS.items():
        if spec.convert_checkpoint is not convert_vit or spec.check_hf_config is None or \
                (spec.hidden_size, spec.image_size) != (vision_config["hidden_size"], vision_config["image_size"]):
            continue  # the cheap checks first: building even on the meta device takes time
        with torch.device("meta"):
            model = spec.builder()
        try:
            spec.check_hf_config(vision_config, model, source)
        except ValueError:
            tried.append(name)
            continue
        if model.blocks[0].norm1.eps == vision_config["layer_norm_eps"]:
            return name
        tried.append(name)
    raise CheckpointError(f"{source}: vision_config (hidden_size={vision_config['hidden_size']}, layers="
                          f"{vision_config['num_hidden_layers']}, image_size={vision_config['image_size']}, patch_size="
                          f"{vision_config['patch_size']}, hidden_act={vision_config['hidden_act']!r}) matches no "
                          f"registered ViT encoder (same width and image size: {tried or 'none'}); register it in "
                          "model/vision/encoders.py ENCODERS")


def plan_import(hf_dir: Union[str, Path], *, make_vocab_size_divisible_by: int = 128) -> LlavaImport:
    from megatron_visualchat.checkpoint.convert import HFCheckpoint
    from megatron_visualchat.checkpoint.hf_llama import llm_config_from_hf
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.data.tokenizer import MODEL_FILE
    from megatron_visualchat.model.vision import ENCODERS, EncoderOptions

    hf = HFCheckpoint(hf_dir)
    source = str(hf.config_path)
    config = {**LLAVA_DEFAULTS, **hf.config}
    archs = config.get("architectures") or []
    if config.get("model_type") != "llava" or (archs and list(archs) != list(ARCHITECTURES)):
        raise _refuse(source, "architectures", archs or config.get("model_type"),
                      f"import-hf reads {list(ARCHITECTURES)} (model_type 'llava'); for a LLaMA model use "
                      "hf-to-megatron")
    layer = config["vision_feature_layer"]
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise _refuse(source, "vision_feature_layer", layer, "one feature layer; concatenated layers are not built")
    strategy = config["vision_feature_select_strategy"]
    if strategy not in SELECT_STRATEGIES:
        raise _refuse(source, "vision_feature_select_strategy", strategy, f"one of {sorted(SELECT_STRATEGIES)}")
    act = config["projector_hidden_act"]
    if act not in PROJECTOR_ACTS:
        raise _refuse(source, "projector_hidden_act", act, f"the mlp projector uses {sorted(PROJECTOR_ACTS)}")
    if not config["multimodal_projector_bias"]:
        raise _refuse(source, "multimodal_projector_bias", False, "the mlp projector's linears have biases")
    vision_config = {**CLIP_VISION_DEFAULTS, **config.get("vision_config", {})}
    if vision_config["model_type"] != "clip_vision_model":
        raise _refuse(source, "vision_config.model_type", vision_config["model_type"], "the CLIP tower imports")
    text_config = {**LLAMA_DEFAULTS, **config.get("text_config", {})}
    if config["tie_word_embeddings"]:
        text_config["tie_word_embeddings"] = True
    text_config["architectures"] = ["LlamaForCausalLM"]
    llm = llm_config_from_hf(text_config, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                             source=f"{source} (text_config)")

    encoder = match_encoder(vision_config, f"{source} (vision_config)")
    options = {"feature_layer": layer, "drop_cls": SELECT_STRATEGIES[strategy]}
    vision = VisionConfig(encoder=encoder, projector=PROJECTOR_ACTS[act], encoder_options=options)
    tokens, _ = ENCODERS[encoder].output_tokens(EncoderOptions.parse(encoder, options))
    seq = config.get("image_seq_length", tokens)
    if seq != tokens:
        raise _refuse(source, "image_seq_length", seq, f"the tower gives {tokens} tokens per image with "
                      f"vision_feature_select_strategy={strategy!r}")

    tok_file = hf.dir / MODEL_FILE
    if not tok_file.is_file():
        raise CheckpointError(f"{tok_file} not found: the LLaVA directory needs its sentencepiece tokenizer.model")
    tokenizer = VisualChatTokenizer.from_model_file(str(tok_file))
    if config["image_token_index"] != tokenizer.image_id:
        raise _refuse(source, "image_token_index", config["image_token_index"],
                      f"this project's <image> id is the sentencepiece vocabulary size, {tokenizer.image_id}")
    if llm.vocab_size < tokenizer.vocab_size:
        raise _refuse(source, "text_config.vocab_size", llm.vocab_size,
                      f"smaller than the tokenizer with <image> and <pad> ({tokenizer.vocab_size})")

    layout = _detect_layout(hf.weights.weight_map, source)
    stray = [n for n in hf.weights.weight_map
             if not n.startswith((layout.language, layout.lm_head, layout.vision, layout.projector))]
    if stray:
        raise CheckpointError(f"{hf.dir}: tensors outside the language model, vision tower and projector (would be "
                              f"dropped): {stray[:8]}")
    all_weights = hf.weights
    hf.weights = Renamed(all_weights, layout.llama_name)
    plan = LlavaImport(hf=hf, layout=layout, llm=llm, text_config=text_config, vision_config=vision_config,
                       vision=vision, tokenizer=tokenizer, all_weights=all_weights)
    _check_vision(plan)
    return plan


# ------------------------------------------------------------------------------------------ vision side

def _vision_view(plan: LlavaImport) -> Renamed:
    prefix = plan.layout.vision
    return Renamed(plan.all_weights, lambda n: n.removeprefix(prefix) if n.startswith(prefix) else None)


def _projector_view(plan: LlavaImport) -> Renamed:
    ours = {f"{plan.layout.projector}{theirs}": mine for mine, theirs in PROJECTOR_TENSORS.items()}
    return Renamed(plan.all_weights, lambda n: ours.get(n, n if n.startswith(plan.layout.projector) else None))


def _meta_tower(plan: LlavaImport):
    from megatron_visualchat.model.vision import build_vision_tower

    v = plan.vision
    with torch.device("meta"):
        return build_vision_tower(v.encoder, v.projector, plan.llm.hidden_size, encoder_options=v.encoder_options)


def _check_vision(plan: LlavaImport) -> None:
    """The tower's and the projector's tensors against the matched encoder and projector, on the meta device."""
    from megatron_visualchat.model.vision.weights import check_state_matches

    tower = _meta_tower(plan)
    source = str(plan.hf.dir)
    for view, module, what in ((_vision_view(plan), tower.encoder.model, "vision tower"),
                               (_projector_view(plan), tower.projector, "multi_modal_projector")):
        shapes = {n: s for f in set(view.weight_map.values()) for n, s in view.shapes(f).items()}
        meta = {n: torch.empty(s, device="meta") for n, s in shapes.items()}
        state = tower.encoder.spec.convert_checkpoint(meta, module) if what == "vision tower" else meta
        check_state_matches(module.state_dict(), state, f"{source} {what} -> {plan.vision.encoder}/{plan.vision.projector}")


def _encoder_state(plan: LlavaImport, target: torch.dtype) -> dict[str, torch.Tensor]:
    """The encoder's own (timm) state dict, by the encoder family's converter (the tower is small next to the LLM)."""
    from megatron_visualchat.model.vision import get_encoder_spec

    spec = get_encoder_spec(plan.vision.encoder)
    with torch.device("meta"):
        model = spec.builder()
    return {k: v.to(target) for k, v in spec.convert_checkpoint(_vision_view(plan), model).items()}


# ------------------------------------------------------------------------------------------ writers

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors_streamed(path: Path, layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                               tensors: Iterator[tuple[str, torch.Tensor]], metadata: Mapping[str, str]) -> None:
    """A safetensors file written tensor by tensor in ``layout``'s order (header first, from shapes), so only the
    tensor being written is in memory; every tensor of ``layout`` must come exactly once, with its shape."""
    header, offset = {}, 0
    for name, (shape, dtype) in layout.items():
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps({"__metadata__": dict(metadata), **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    written = set()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        start = f.tell()
        for name, tensor in tensors:
            shape, dtype = layout[name]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype or name in written:
                raise RuntimeError(f"{path}: {name} {tuple(tensor.shape)} {tensor.dtype} does not fit its slot "
                                   f"{tuple(shape)} {dtype}, or came twice")
            f.seek(start + header[name]["data_offsets"][0])
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            written.add(name)
    missing = sorted(set(layout) - written)
    if missing:
        raise RuntimeError(f"{path}: tensors never written: {missing[:8]}")


def _chat_tensors(plan: LlavaImport, target: torch.dtype):
    """(layout, generator) of the chat checkpoint's tensors: the language model at TP=1 by the LLaMA converter's
    maps (vocabulary padded for TP=1, as save_chat_checkpoint writes it), then the encoder and the projector."""
    from megatron_visualchat.checkpoint.hf_llama import hf_tensor_shapes, rank_parts, stage_state_keys
    from megatron_visualchat.config import ParallelConfig

    llm, weights = plan.llm, plan.hf.weights
    keys = [(k, m) for k, m in stage_state_keys(llm, ParallelConfig(), 0) if m is not None]
    shapes = hf_tensor_shapes(llm)
    layout = {}
    for key, tmap in keys:
        parts = rank_parts(tmap, [torch.empty(shapes[n], device="meta") for n in tmap.hf], llm, 1, 0)
        layout[CHAT_PREFIXES["llm"] + key] = ((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), target)
    encoder = _encoder_state(plan, target)
    layout.update({CHAT_PREFIXES["encoder"] + k: (tuple(v.shape), target) for k, v in encoder.items()})
    projector = _projector_view(plan)
    layout.update({CHAT_PREFIXES["projector"] + k: (tuple(s), target) for f in set(projector.weight_map.values())
                   for k, s in projector.shapes(f).items()})

    def generate():
        for key, tmap in keys:
            parts = rank_parts(tmap, [weights[n].to(target) for n in tmap.hf], llm, 1, 0)
            yield CHAT_PREFIXES["llm"] + key, torch.cat(parts) if len(parts) > 1 else parts[0]
        for k, v in encoder.items():
            yield CHAT_PREFIXES["encoder"] + k, v
        for k in projector:
            yield CHAT_PREFIXES["projector"] + k, projector[k].to(target)

    return layout, generate()


def import_chat(plan: LlavaImport, out_dir: Union[str, Path], *, dtype: str = "bf16") -> Path:
    """Write ``plan`` as a chat checkpoint (``checkpoint/chat.py``'s files, checksums last, renamed into place)."""
    from megatron_visualchat.checkpoint.chat import CONFIG_FILE, WEIGHTS_FILE, check_export_dir, config_to_dict
    from megatron_visualchat.checkpoint.layout import checksummed_dir

    check_export_dir(out_dir)
    layout, tensors = _chat_tensors(plan, DTYPES[dtype])
    with checksummed_dir(out_dir) as tmp:
        write_safetensors_streamed(tmp / WEIGHTS_FILE, layout, tensors,
                                   {"format": "pt", "producer": "megatron_visualchat import-hf"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_dict(plan.config), indent=2) + "\n")
        plan.tokenizer.save(str(tmp))
    return Path(out_dir)


def training_flags(plan: LlavaImport, out: Path) -> list[str]:
    """pretrain_vchat.py flags that rebuild the imported model from the training layout in ``out``."""
    v = plan.vision
    return ["--llm-load", str(out), "--vision-encoder", v.encoder, "--vision-weights", str(out / VISION_DIR),
            "--vision-encoder-options", json.dumps(v.encoder_options), "--projector", v.projector,
            "--projector-weights", str(out / PROJECTOR_FILE), "--tokenizer-dir", str(out / TOKENIZER_OUT),
            "--template", "llava_v1", "--attention-mode", "causal", "--model-preset", LLM_FROM_CHECKPOINT]


def import_training(plan: LlavaImport, out_dir: Union[str, Path], *, tp: int = 1, pp: int = 1,
                    pp_layers: Optional[Sequence[int]] = None, dtype: str = "bf16", force: bool = False) -> Path:
    """Write ``plan`` as the training layout (module docstring): the LLM through the LLaMA converter's writer,
    the tower, projector and tokenizer beside it before the conversion record and tracker."""
    from safetensors.torch import save_file

    from megatron_visualchat.checkpoint.convert import write_megatron

    target = DTYPES[dtype]

    def also(out: Path) -> None:
        vision = _vision_view(plan)
        (out / VISION_DIR).mkdir()
        write_safetensors_streamed(
            out / VISION_DIR / "model.safetensors",
            {k: (s, target) for f in set(vision.weight_map.values()) for k, s in vision.shapes(f).items()},
            ((k, vision[k].to(target)) for k in vision), {"format": "pt"})
        (out / VISION_DIR / "config.json").write_text(json.dumps(
            {**plan.vision_config, "architectures": ["CLIPVisionModel"]}, indent=2, sort_keys=True) + "\n")
        projector = _projector_view(plan)
        save_file({k: projector[k].to(target).contiguous() for k in projector}, str(out / PROJECTOR_FILE),
                  metadata={"format": "pt"})
        plan.tokenizer.save(str(out / TOKENIZER_OUT))
        (out / RECORD).write_text(json.dumps({"source": str(plan.hf.dir), "vision": dataclasses.asdict(plan.vision),
                                              "train_flags": training_flags(plan, out)}, indent=2) + "\n")

    return write_megatron(plan.hf, plan.llm, out_dir, tp=tp, pp=pp, pp_layers=pp_layers, dtype=dtype, force=force,
                          hf_config=plan.text_config, also=also,
                          also_outputs=(VISION_DIR, PROJECTOR_FILE, TOKENIZER_OUT, RECORD))


# ------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-visualchat import-hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="LlavaForConditionalGeneration directory (config.json, weights, "
                                                   "tokenizer.model)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--chat", action="store_true", help="write a chat checkpoint instead of the training layout")
    p.add_argument("--tp", type=int, default=1, help="training layout: tensor-parallel size of the LLM shards")
    p.add_argument("--pp", type=int, default=1, help="training layout: pipeline-parallel size")
    p.add_argument("--pp-layers", type=int_list, default=None, help="training layout: layers per stage")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the written weights")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="vocab padded to a multiple of this x TP (Megatron's default 128)")
    p.add_argument("--force", action="store_true", help="training layout: replace a previous import in --out")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.chat and (args.tp, args.pp, args.pp_layers, args.force) != (1, 1, None, False):
            raise ConfigError("--chat writes one full checkpoint that loads at any TP size and replaces an earlier "
                              "one in --out by itself: drop --tp/--pp/--pp-layers/--force")
        plan = plan_import(args.hf_dir, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
        if args.chat:
            out = import_chat(plan, args.out, dtype=args.dtype)
        else:
            out = import_training(plan, args.out, tp=args.tp, pp=args.pp, pp_layers=args.pp_layers,
                                  dtype=args.dtype, force=args.force)
    except (CheckpointError, ConfigError) as e:
        print(f"import-hf: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # not a refusal: the machine failed the write (ENOSPC, EIO, ...); the partial output is gone
        print(f"import-hf: error: {e.strerror or e} ({e.filename or args.out}); nothing was left in {args.out}: "
              "fix the cause and run the import again", file=sys.stderr)
        return 1
    print(f"import-hf: wrote {out} in {time.perf_counter() - start:.1f}s")
    if not args.chat:
        print("train from it with: " + " ".join(training_flags(plan, Path(out))))
    return 0
