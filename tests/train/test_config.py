"""``ModelConfig`` is ``TransformerConfig``'s fields plus ``kind``: every model field is a
flag with help, reaches the model, and saved or older ``--config`` files still load."""

import dataclasses
import json

import pytest

from unitscale_jax import nn, train
from unitscale_jax.train import build
from unitscale_jax.train.config import SET_BY_RUN
from unitscale_jax.train.flags import flag_name, parse_train_args, train_parser


def test_model_config_is_transformer_config_but_what_the_run_sets():
    model = {f.name for f in dataclasses.fields(train.ModelConfig)}
    model_net = {f.name for f in dataclasses.fields(nn.TransformerConfig)}
    assert model - model_net == {"kind"}
    assert model_net - model == set(SET_BY_RUN)  # a new model field becomes a flag by itself
    assert set(build.SHARED_FIELDS) == model - {"kind"}


def test_every_model_field_has_a_flag_with_help():
    text = " ".join(train_parser(train.get_preset("tiny")).format_help().split())
    for f in dataclasses.fields(train.ModelConfig):
        assert f.metadata["help"], f.name
        assert flag_name(f) in text, f.name
    assert "--rope-theta FLOAT RoPE base (default: 10000.0)" in text
    assert "--model {decoder,encoder,encdec}" in text
    assert "10% of steps" in text  # help text is not a format string


def test_every_model_field_reaches_the_transformer_config():
    cfg = train.resolve(parse_train_args([
        "--rope-theta", "500", "--norm-eps", "1e-6", "--d-ff", "48", "--check-ids",
        "--residual-attn-ratio", "0.25", "--mlp", "gelu", "--norm", "layer", "--bias",
        "--parametrization", "sp", "--sp-init-std", "none", "--no-scan-layers", "--remat",
        "--attention-impl", "chunked"]))
    tc = build.transformer_config(cfg, 260)
    assert (tc.rope_theta, tc.norm_eps, tc.d_ff, tc.check_ids) == (500.0, 1e-6, 48, True)
    for name in build.SHARED_FIELDS:
        want = getattr(cfg.model, name)
        if name == "parametrization":  # the config's name becomes the object
            want = nn.get_parametrization(want)
        assert getattr(tc, name) == want, name
    assert tc.rope is False and tc.vocab_size == 260 and tc.max_seq_len == cfg.data.seq_len
    assert tc.attention_impl == "chunked"
    with pytest.raises(train.UsageError, match="d_ff must be a positive int"):
        build.transformer_config(cfg.replace(model={"d_ff": 0}), 260)


def test_config_files_round_trip_and_older_files_load(tmp_path):
    cfg = parse_train_args(["--preset", "small", "--d-ff", "96", "--lr", "2^-2"])
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    again = parse_train_args(["--config", str(path), "--steps", "7"])
    assert again == cfg.replace(training={"steps": 7}) and again.preset == "small"
    old = cfg.to_dict()
    for name in ("d_ff", "rope_theta", "check_ids", "norm_eps"):  # before they were flags
        del old["model"][name]
    path.write_text(json.dumps(old))
    assert parse_train_args(["--config", str(path)]).model.d_ff is None
    old["model"]["d_fff"] = 3
    path.write_text(json.dumps(old))
    with pytest.raises(train.UsageError, match=r"unknown field\(s\) \['d_fff'\]"):
        parse_train_args(["--config", str(path)])
