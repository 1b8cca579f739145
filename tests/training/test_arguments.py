import json
import re

import pytest

from megatron_visualchat.config import ConfigError
from megatron_visualchat.training.arguments import build_parser, model_config, parse_args
from megatron_visualchat.training.run_config import TrainingConfig

BASE = ["--synthetic", "16", "--train-iters", "2"]


def test_defaults_follow_the_ds_visualchat_recipe():
    run = parse_args(BASE)
    opt = run.optimizer
    assert (opt.lr, opt.lr_warmup_fraction, run.batch.global_batch_size, opt.adam_beta1, opt.adam_beta2) == (
        1e-3, 0.1, 128, 0.9, 0.95)
    assert opt.lr_decay_style == "cosine"
    t = run.model.trainable
    assert t.projector and t.image_projections and not t.llm and not t.vision_encoder


@pytest.mark.parametrize("argv,message", [
    (["--train-iters", "2"], "no training data"),
    (["--synthetic", "4"], "exactly one of --train-iters and --train-epochs"),
    (BASE + ["--recompute-granularity", "full"], "needs --recompute-method and --recompute-num-layers"),
    (["--synthetic", "4", "--train-epochs", "1", "--pack"], "--train-epochs cannot set the iterations"),
])
def test_flag_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_trainable_parts_are_validated():
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--trainable", "projector,wings"])
    assert parse_args(BASE + ["--trainable", "all"]).model.trainable.llm


@pytest.mark.parametrize("extra,world,message", [
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "not divisible by micro-batch-size"),
    (["--tensor-model-parallel-size", "3"], 3, "tensor parallel size 3 does not divide num_attention_heads=4"),
    (["--tensor-model-parallel-size", "2"], 3, "world size 3 is not divisible by tp(2) x pp(1)"),
    (["--seq-length", "4096"], 1, "exceeds the model's max_position_embeddings 512"),
    (["--seq-length", "256", "--trainable", "projector,new_token_rows_only", "--weight-decay", "0.1"], 1,
     "would still shrink them: use --weight-decay 0"),
])
def test_model_config_errors_name_the_numbers(extra, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        model_config(parse_args(BASE + ["--global-batch-size", "12"] + extra), world)


def test_tokenizer_vocab_enlarges_the_preset():
    cfg = model_config(parse_args(BASE + ["--global-batch-size", "4", "--seq-length", "256"]), 1, vocab_size=514)
    assert cfg.llm.vocab_size == 514 and cfg.llm.padded_vocab_size(1) == 520


def test_every_flag_lands_in_one_typed_section():
    run = parse_args(BASE + ["--tensor-model-parallel-size", "2", "--pipeline-layers", "1,3", "--bf16",
                             "--data", "jsonl:a.jsonl:0.5", "--data", "jsonl:b.jsonl:0.5", "--keep-last", "5"])
    assert isinstance(run, TrainingConfig)
    assert run.parallelism.tensor_model_parallel_size == 2 and run.parallelism.pipeline_layers == (1, 3)
    assert run.precision.dtype_name == "bf16" and run.checkpoint.keep_last == 5
    assert run.data.data == ("jsonl:a.jsonl:0.5", "jsonl:b.jsonl:0.5")
    record = run.to_dict()
    assert json.loads(json.dumps(record)) == record  # meta.json-ready
    assert record["batch"]["train_iters"] == 2


def test_a_flag_without_a_config_field_is_caught():
    ns = build_parser().parse_args(BASE)
    ns.unheard_of = 1
    with pytest.raises(TypeError, match="unheard_of"):
        TrainingConfig.from_namespace(ns)


def test_sequence_parallel_flag_reaches_megatron_and_is_checked():
    from megatron_visualchat.config import to_transformer_config

    run = parse_args(BASE + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "64"])
    assert run.parallelism.sequence_parallel and run.to_dict()["parallelism"]["sequence_parallel"]
    cfg = model_config(run, 2)
    assert cfg.parallel.sequence_parallel and to_transformer_config(cfg).sequence_parallel
    plain = parse_args(BASE + ["--tensor-model-parallel-size", "2", "--seq-length", "64"])
    assert not to_transformer_config(model_config(plain, 2)).sequence_parallel
    with pytest.raises(ConfigError, match="needs tp >= 2 \\(tp=1\\); drop --sequence-parallel"):
        model_config(parse_args(BASE + ["--sequence-parallel", "--seq-length", "64"]), 1)
    odd = parse_args(BASE + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "63"])
    with pytest.raises(ConfigError, match="--seq-length 63 must be a multiple of --tensor-model-parallel-size 2"):
        model_config(odd, 2)
