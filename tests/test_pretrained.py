"""Hugging Face Llama-family checkpoints: imported layers against the reference implementation's
outputs (tests/fixtures/llama, written by tools/llama_reference.py with transformers), as a
subword run and as a HAT's backbone; the tokenizer's byte accounting; export and re-import."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx
from hypothesis import given, settings, strategies as st
from safetensors import safe_open

from tests.conftest import jit_apply, micro_config
from hiermodel import cli
from hiermodel.config import from_dict
from hiermodel.models import pretrained
from hiermodel.models.layers import run_blocks
from hiermodel.models.registry import build
from hiermodel.run import load_params
from hiermodel.text.pretrained_tokenizer import PretrainedTokenizer, load as load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "llama"
CASES = ["llama_tied", "llama_untied_bf16", "llama31_scaled", "qwen2"]


def golden(case: str):
    return np.load(FIXTURES / case / "golden.npz")


def subword_logits(model, ids):
    ids = jnp.asarray(ids)
    return np.asarray(jit_apply(lambda model, ids: model({"tokens": ids, "segments": jnp.ones_like(ids)}), model, ids))


@pytest.mark.parametrize("case", CASES)
def test_an_imported_checkpoint_reproduces_the_reference_logits(case):
    settings = pretrained.model_settings(pretrained.read_config(FIXTURES / case))
    model = build(from_dict({"model": {"kind": "subword", **settings}}).model, nnx.Rngs(0))
    nnx.update(model, pretrained.language_model_params(pretrained.Tensors(FIXTURES / case), settings))
    expected = golden(case)["logits"]
    np.testing.assert_allclose(subword_logits(model, golden(case)["ids"]), expected, atol=1e-4, rtol=0)


def test_the_fixtures_cover_what_the_issue_names():
    configs = {case: json.loads((FIXTURES / case / "config.json").read_text()) for case in CASES}
    assert configs["llama_tied"]["tie_word_embeddings"] and not configs["llama_untied_bf16"]["tie_word_embeddings"]
    assert configs["llama_untied_bf16"]["num_key_value_heads"] < configs["llama_untied_bf16"]["num_attention_heads"]
    assert configs["llama31_scaled"]["rope_scaling"]["rope_type"] == "llama3"  # the layout of Meta's releases
    assert "rope_parameters" in configs["llama_tied"]  # the layout transformers 5 writes
    assert configs["qwen2"]["architectures"] == ["Qwen2ForCausalLM"]
    settings = pretrained.model_settings(configs["llama31_scaled"])
    assert settings["rope_scaling"]["factor"] == 8.0 and settings["rope_theta"] == 500000.0


def test_rope_scaling_changes_the_outputs_so_the_golden_test_checks_it():
    case = "llama31_scaled"
    settings = pretrained.model_settings(pretrained.read_config(FIXTURES / case))
    settings["rope_scaling"] = {"factor": 0.0}
    model = build(from_dict({"model": {"kind": "subword", **settings}}).model, nnx.Rngs(0))
    nnx.update(model, pretrained.language_model_params(pretrained.Tensors(FIXTURES / case), settings))
    assert np.abs(subword_logits(model, golden(case)["ids"]) - golden(case)["logits"]).max() > 1e-2


@pytest.mark.parametrize("case", CASES)
def test_a_hat_backbone_from_a_checkpoint_reproduces_the_reference_hidden_states(case):
    config = micro_config(**{"model.backbone_from": FIXTURES / case})
    model_config = pretrained.with_backbone_from(config.model)
    hat = build(model_config, nnx.Rngs(0))
    nnx.update(hat, pretrained.backbone_params(model_config))
    inputs_BxTxD = jnp.asarray(golden(case)["inputs"])
    b, t, _ = inputs_BxTxD.shape
    positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
    hidden = hat.backbone_norm(run_blocks(hat.backbone, inputs_BxTxD, positions_BxT, jnp.ones((b, t), jnp.int32)))
    np.testing.assert_allclose(np.asarray(hidden), golden(case)["hidden"], atol=1e-4, rtol=0)


def test_the_tokenizer_spells_every_byte_and_encodes_as_the_library_does():
    tokenizer = load_tokenizer(FIXTURES / "llama_tied" / "tokenizer.json")
    assert isinstance(tokenizer, PretrainedTokenizer) and tokenizer.bos_id == 0
    text = "The quick brown fox — Čeština 日本語 <|begin_of_text|> spelled out\n"
    ids, word_lengths = tokenizer.encode_document(text.encode(), 100)
    library = tokenizers.Tokenizer.from_file(str(FIXTURES / "llama_tied" / "tokenizer.json"))
    library.encode_special_tokens = True
    assert list(ids) == library.encode(text, add_special_tokens=False).ids
    assert (word_lengths == 1).all() and tokenizer.decode(ids) == text.encode()
    broken = b"bytes \xff\xfe that are not UTF-8, and a cut \xe2\x82"
    ids, _ = tokenizer.encode_document(broken, 100)
    assert tokenizer.decode(ids) == broken and tokenizer.token_bytes[ids].sum() == len(broken)


def test_a_tokenizer_without_exact_bytes_is_refused(tmp_path):
    sentencepiece_like = tokenizers.Tokenizer(tokenizers.models.BPE())
    sentencepiece_like.decoder = tokenizers.decoders.Metaspace()
    sentencepiece_like.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(Exception, match="decoder \\(Metaspace\\) is not byte-level"):
        load_tokenizer(tmp_path / "tokenizer.json")


def _fixture_copy(tmp_path, case="llama_tied", **config_changes) -> Path:
    directory = tmp_path / case
    shutil.copytree(FIXTURES / case, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(config_changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["GemmaForCausalLM"]}, "architecture GemmaForCausalLM is not supported"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act=gelu"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type yarn"),
    ({"sliding_window": 16}, "sliding_window=16"),
    ({"head_dim": 16}, "head_dim=16 is not hidden_size / num_attention_heads"),
    ({"intermediate_size": 80}, "model.layers.0.mlp.gate_proj.weight has shape (64, 32), config.json says (80, 32)"),
])
def test_an_unsupported_or_inconsistent_checkpoint_is_one_line_and_nothing_is_made(tmp_path, capsys, changes, message):
    source = _fixture_copy(tmp_path, **changes)
    code = cli.main(["import", str(source), str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_an_imported_run_is_scored_sampled_and_refuses_to_be_resumed(tmp_path, capsys):
    run = tmp_path / "imported"
    assert cli.main(["import", str(FIXTURES / "llama_tied"), str(run), "--row-tokens", "256"]) == 0
    assert "2 layers of width 32" in capsys.readouterr().out
    config, _, graphdef, params = load_params(str(run))
    model = nnx.merge(graphdef, params)
    np.testing.assert_allclose(subword_logits(model, golden("llama_tied")["ids"]), golden("llama_tied")["logits"],
                               atol=1e-4, rtol=0)
    text = tmp_path / "en_text.txt"
    text.write_bytes("The quick brown fox jumps over the lazy dog. Čeština\n".encode() * 8)
    assert cli.main(["eval", "--checkpoint", str(run), "--data", str(text), "--output-json",
                     str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["bytes"] == text.stat().st_size and 0 < result["bpb"] < 40
    assert cli.main(["generate", "--checkpoint", str(run), "--prompt", "The", "--max-bytes", "8"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "configs/tiny_subword.yaml", f"run_dir={run}"]) == 2
    assert "holds imported weights" in capsys.readouterr().err
    assert cli.main(["import", str(FIXTURES / "llama_tied"), str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def _micro_train(run, *overrides) -> int:
    return cli.main(["train", str(Path(__file__).parent / "micro.yaml"), f"run_dir={run}",
                     f"model.backbone_from={FIXTURES / 'llama_tied'}", *overrides])


@pytest.mark.slow
def test_a_hat_on_a_pretrained_backbone_trains_frozen_then_unfrozen_and_resumes(tmp_path):
    from hiermodel.train.metrics import read_metrics

    imported = pretrained.backbone_params(pretrained.with_backbone_from(
        micro_config(**{"model.backbone_from": FIXTURES / "llama_tied"}).model))
    equal = lambda params, part: all(np.array_equal(np.asarray(a), b) for a, b in
                                     zip(jax.tree.leaves(params[part]), jax.tree.leaves(imported[part])))
    frozen, unfrozen = tmp_path / "frozen", tmp_path / "unfrozen"
    assert _micro_train(frozen, "train.freeze=backbone,backbone_norm", "train.steps=3",
                        "train.checkpoint_every=3") == 0
    config, _, _, params = load_params(str(frozen))
    assert config.model.backbone_dim == 32 and config.model.rope_theta == 500000.0  # the checkpoint's shapes
    assert equal(params, "backbone") and equal(params, "backbone_norm")
    fresh = nnx.to_pure_dict(nnx.state(build(config.model, nnx.Rngs(config.seed)), nnx.Param))
    assert not np.array_equal(np.asarray(params["encoder"][0]["mlp"]["w_up"]), fresh["encoder"][0]["mlp"]["w_up"])

    assert _micro_train(unfrozen, f"init_from={frozen}", "train.steps=4", "train.checkpoint_every=2") == 0
    _, _, _, params = load_params(str(unfrozen))
    assert not equal(params, "backbone")
    assert _micro_train(unfrozen, f"init_from={frozen}", "train.steps=6", "train.checkpoint_every=2") == 0
    logged = read_metrics(str(unfrozen))
    assert sorted(logged) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(m["loss"]) for m in logged.values())


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_any_bytes_round_trip_through_a_pretrained_tokenizer(data):
    tokenizer = load_tokenizer(FIXTURES / "llama_tied" / "tokenizer.json")
    ids, _ = tokenizer.encode_document(data, 100)
    assert tokenizer.decode(ids) == data and tokenizer.token_bytes[ids].sum() == len(data)


def test_a_subword_run_exports_to_the_llama_layout_and_imports_back_to_the_same_logits(tmp_path, capsys):
    from hiermodel.text import subword
    from hiermodel.data.sources import DocumentSource
    from hiermodel.train.loop import train

    documents = list(DocumentSource(["builtin:train"]).documents())[:200]
    tokenizer_file = tmp_path / "bpe.json"
    subword.train(documents, 300, 32).save(tokenizer_file)
    config = micro_config(**{"model.kind": "subword", "model.vocab_size": 300, "model.tokenizer": tokenizer_file,
                             "model.tie_embeddings": True, "data.row_words": 256, "train.steps": 2,
                             "run_dir": tmp_path / "trained"})
    train(config)
    exported, reimported = tmp_path / "exported", tmp_path / "reimported"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "trained"), "--output", str(exported)]) == 0
    written = json.loads((exported / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and written["tie_word_embeddings"]
    with safe_open(exported / "model.safetensors", framework="numpy") as f:
        assert "model.layers.1.mlp.down_proj.weight" in f.keys() and "lm_head.weight" not in f.keys()
    assert cli.main(["import", str(exported), str(reimported), "--row-tokens", "256"]) == 0
    ids = np.random.default_rng(0).integers(0, 300, (2, 40))
    logits = [subword_logits(nnx.merge(graphdef, params), ids)
              for _, _, graphdef, params in map(load_params, (str(tmp_path / "trained"), str(reimported)))]
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5, rtol=0)
    assert isinstance(load_tokenizer(reimported / "tokenizer.json"), subword.Subword)  # its own BPE, words and all
    assert cli.main(["export", "--checkpoint", str(tmp_path / "trained"), "--output", str(exported)]) == 2
    assert "not empty" in capsys.readouterr().err


LLAMA_3_2_1B = {  # the published config.json of Llama 3.2 1B (the shapes; no weights needed)
    "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "head_dim": 64,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_the_llama_backbone_config_states_the_checkpoints_shapes(tmp_path):
    import dataclasses

    from hiermodel.config import load

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_2_1B))
    stated = load(Path(__file__).parents[1] / "configs" / "hat_llama3.2_1b.yaml").model
    model = dataclasses.replace(stated, backbone_from=str(tmp_path))
    assert pretrained.with_backbone_from(model) == model
    assert pretrained.with_backbone_from(dataclasses.replace(model, backbone_layers=4)) == model


def test_a_checkpoint_sharded_over_files_reads_as_one(tmp_path):
    from safetensors.numpy import save_file

    case = "llama_untied_bf16"
    source = tmp_path / case
    source.mkdir()
    shutil.copy(FIXTURES / case / "config.json", source)
    with safe_open(FIXTURES / case / "model.safetensors", framework="numpy") as f:
        names = sorted(f.keys())
        halves = [{n: f.get_tensor(n) for n in names[:len(names) // 2]}, {n: f.get_tensor(n) for n in names[len(names) // 2:]}]
    weight_map = {}
    for i, half in enumerate(halves):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(half, source / file)
        weight_map.update({name: file for name in half})
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    settings = pretrained.model_settings(pretrained.read_config(source))
    model = build(from_dict({"model": {"kind": "subword", **settings}}).model, nnx.Rngs(0))
    nnx.update(model, pretrained.language_model_params(pretrained.Tensors(source), settings))
    np.testing.assert_allclose(subword_logits(model, golden(case)["ids"]), golden(case)["logits"], atol=1e-4, rtol=0)
