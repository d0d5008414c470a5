"""Hugging Face Llama-family checkpoints as this codebase's layers, and back.

A checkpoint directory holds config.json and one or more *.safetensors files (sharded ones with
model.safetensors.index.json). Llama 2, 3, 3.1 and 3.2, Mistral and Qwen2 compute exactly what
layers.Block computes (RMSNorm, RoPE on split halves, grouped-query attention, SwiGLU), given
Llama 3.1's RoPE scaling and Qwen2's query/key/value biases; anything else a config asks for is
an error naming it. Tensors are read one at a time, as stored (bfloat16 included), and kept as
float32 parameters.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from hiermodel.config import ModelConfig, RopeScalingConfig
from hiermodel.errors import UserError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"


def read_config(directory: str | Path) -> dict:
    """config.json of a supported checkpoint; an unsupported feature is a UserError naming it."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; a Hugging Face checkpoint directory has config.json and "
                        "*.safetensors") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({str(e).splitlines()[0][:120]})") from None
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise UserError(f"{path}: architecture {architecture} is not supported (supported: {', '.join(ARCHITECTURES)})")
    heads, width = config["num_attention_heads"], config["hidden_size"]
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']} (only silu)")
    if config.get("head_dim") not in (None, width // heads):
        problems.append(f"head_dim={config['head_dim']} is not hidden_size / num_attention_heads")
    if config.get("mlp_bias"):
        problems.append("mlp_bias=true")
    if config.get("attention_bias") and architecture != "Qwen2ForCausalLM":
        problems.append("attention_bias=true (an output projection bias)")
    if set(config.get("layer_types") or ["full_attention"]) != {"full_attention"}:
        problems.append(f"layer_types={sorted(set(config['layer_types']))} (only full_attention)")
    if config.get("sliding_window") and config.get("use_sliding_window", True) is not False:
        problems.append(f"sliding_window={config['sliding_window']} (the backbone attends to every earlier position)")
    kind = _rope(config).get("rope_type", _rope(config).get("type", "default"))
    if kind not in ("default", "llama3"):
        problems.append(f"rope_scaling type {kind} (only Llama 3.1's llama3)")
    if problems:
        raise UserError(f"{path}: unsupported {'; '.join(problems)}")
    return config


def _rope(config: dict) -> dict:
    """RoPE settings: transformers 5 writes rope_parameters (theta inside), earlier releases
    rope_theta beside rope_scaling."""
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def model_settings(config: dict) -> dict:
    """The ModelConfig values (backbone shapes and layer options) of a checkpoint's config.json."""
    scaling = _rope(config)
    llama3 = scaling.get("rope_type", scaling.get("type")) == "llama3"
    return {
        "backbone_dim": config["hidden_size"],
        "backbone_layers": config["num_hidden_layers"],
        "backbone_heads": config["num_attention_heads"],
        "backbone_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "backbone_mlp_dim": config["intermediate_size"],
        "rope_theta": float(scaling.get("rope_theta", config.get("rope_theta", 10000.0))),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_scaling": {"factor": float(scaling["factor"]), "low_freq_factor": float(scaling["low_freq_factor"]),
                         "high_freq_factor": float(scaling["high_freq_factor"]),
                         "original_context": int(scaling["original_max_position_embeddings"])}
        if llama3 else {"factor": 0.0},
        "attention_bias": config["architectures"][0] == "Qwen2ForCausalLM",
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "vocab_size": config["vocab_size"],
    }


class Tensors:
    """The checkpoint's tensors by name, each read from its file when asked for."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.exists():
            self.files = {name: self.directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.files = {}
            for file in sorted(self.directory.glob("*.safetensors")):
                with safe_open(file, framework="numpy") as f:
                    self.files.update({name: file for name in f.keys()})
        if not self.files:
            raise UserError(f"{self.directory}: no *.safetensors weights")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, shape: tuple) -> np.ndarray:
        if name not in self.files:
            raise UserError(f"{self.directory}: the checkpoint has no tensor {name}")
        with safe_open(self.files[name], framework="numpy") as f:
            value = f.get_tensor(name).astype(np.float32)
        if value.shape != shape:
            raise UserError(f"{self.files[name]}: {name} has shape {value.shape}, config.json says {shape}")
        return value


def _layer_names(i: int) -> dict:
    prefix = f"model.layers.{i}."
    return {name: prefix + hf for name, hf in (
        ("attn_norm", "input_layernorm.weight"), ("mlp_norm", "post_attention_layernorm.weight"),
        ("wq", "self_attn.q_proj.weight"), ("wk", "self_attn.k_proj.weight"), ("wv", "self_attn.v_proj.weight"),
        ("wo", "self_attn.o_proj.weight"), ("bq", "self_attn.q_proj.bias"), ("bk", "self_attn.k_proj.bias"),
        ("bv", "self_attn.v_proj.bias"), ("w_gate", "mlp.gate_proj.weight"), ("w_up", "mlp.up_proj.weight"),
        ("w_down", "mlp.down_proj.weight"))}


def block_params(tensors: Tensors, i: int, settings: dict) -> dict:
    """Layer i as a layers.Block's parameters. Hugging Face keeps linear weights as [out, in]."""
    d, heads, kv = settings["backbone_dim"], settings["backbone_heads"], settings["backbone_kv_heads"]
    dh, f = d // heads, settings["backbone_mlp_dim"]
    names = _layer_names(i)
    linear = lambda name, out, into: tensors.get(names[name], (out, into)).T
    attn = {"wq": linear("wq", heads * dh, d).reshape(d, heads, dh),
            "wk": linear("wk", kv * dh, d).reshape(d, kv, dh),
            "wv": linear("wv", kv * dh, d).reshape(d, kv, dh),
            "wo": linear("wo", d, heads * dh).reshape(heads, dh, d)}
    if settings["attention_bias"]:
        attn.update({"bq": tensors.get(names["bq"], (heads * dh,)).reshape(heads, dh),
                     "bk": tensors.get(names["bk"], (kv * dh,)).reshape(kv, dh),
                     "bv": tensors.get(names["bv"], (kv * dh,)).reshape(kv, dh)})
    return {"attn_norm": {"scale": tensors.get(names["attn_norm"], (d,))},
            "mlp_norm": {"scale": tensors.get(names["mlp_norm"], (d,))},
            "attn": attn,
            "mlp": {"w_gate": linear("w_gate", f, d), "w_up": linear("w_up", f, d), "w_down": linear("w_down", d, f)}}


def stack_params(tensors: Tensors, settings: dict) -> tuple[dict, dict]:
    """(the layers as {i: Block parameters}, the final norm's parameters)."""
    blocks = {i: block_params(tensors, i, settings) for i in range(settings["backbone_layers"])}
    return blocks, {"scale": tensors.get("model.norm.weight", (settings["backbone_dim"],))}


def language_model_params(tensors: Tensors, settings: dict) -> dict:
    """The whole checkpoint as a byte.TransformerLM's parameters (the subword kind)."""
    v, d = settings["vocab_size"], settings["backbone_dim"]
    blocks, norm = stack_params(tensors, settings)
    params = {"embed": tensors.get("model.embed_tokens.weight", (v, d)), "blocks": blocks, "norm": norm}
    if not settings["tie_embeddings"]:
        params["head"] = tensors.get("lm_head.weight", (v, d)).T
    return params


def export(params: dict, settings: dict, directory: str | Path, bos_id: int | None) -> None:
    """A TransformerLM's parameters as a LlamaForCausalLM checkpoint (config.json, model.safetensors)."""
    d, heads, kv = settings["backbone_dim"], settings["backbone_heads"], settings["backbone_kv_heads"]
    if settings["attention_bias"]:
        raise UserError("export: attention biases have no place in a LlamaForCausalLM checkpoint")
    array = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
    tensors = {"model.embed_tokens.weight": array(params["embed"]), "model.norm.weight": array(params["norm"]["scale"])}
    if not settings["tie_embeddings"]:
        tensors["lm_head.weight"] = array(np.asarray(params["head"]).T)
    for i, block in params["blocks"].items():
        names, attn, mlp = _layer_names(int(i)), block["attn"], block["mlp"]
        tensors.update({
            names["attn_norm"]: array(block["attn_norm"]["scale"]), names["mlp_norm"]: array(block["mlp_norm"]["scale"]),
            names["wq"]: array(np.asarray(attn["wq"]).reshape(d, -1).T),
            names["wk"]: array(np.asarray(attn["wk"]).reshape(d, -1).T),
            names["wv"]: array(np.asarray(attn["wv"]).reshape(d, -1).T),
            names["wo"]: array(np.asarray(attn["wo"]).reshape(-1, d).T),
            names["w_gate"]: array(np.asarray(mlp["w_gate"]).T), names["w_up"]: array(np.asarray(mlp["w_up"]).T),
            names["w_down"]: array(np.asarray(mlp["w_down"]).T)})
    scaling = settings["rope_scaling"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": d, "num_hidden_layers": settings["backbone_layers"], "num_attention_heads": heads,
        "num_key_value_heads": kv, "intermediate_size": settings["backbone_mlp_dim"],
        "rope_theta": settings["rope_theta"], "rms_norm_eps": settings["norm_eps"],
        "tie_word_embeddings": settings["tie_embeddings"], "vocab_size": settings["vocab_size"],
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32", "max_position_embeddings": 8192,
        "rope_scaling": {"rope_type": "llama3", "factor": scaling["factor"],
                         "low_freq_factor": scaling["low_freq_factor"],
                         "high_freq_factor": scaling["high_freq_factor"],
                         "original_max_position_embeddings": scaling["original_context"]}
        if scaling["factor"] else None,
        "bos_token_id": bos_id,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


BACKBONE_SETTINGS = ("backbone_dim", "backbone_layers", "backbone_heads", "backbone_kv_heads", "backbone_mlp_dim",
                     "rope_theta", "norm_eps", "attention_bias")


def with_backbone_from(model: ModelConfig) -> ModelConfig:
    """A HAT config whose backbone shapes and layer options are those of model.backbone_from
    (RoPE and the norms' epsilon apply to the byte stacks too); other configs as they are."""
    if not model.backbone_from:
        return model
    if model.kind != "hat":
        raise UserError(f"model.backbone_from={model.backbone_from}: only a hat model takes a pretrained backbone "
                        f"(model.kind={model.kind}); import a checkpoint as a subword run with hiermodel import")
    settings = model_settings(read_config(model.backbone_from))
    return dataclasses.replace(model, **{k: settings[k] for k in BACKBONE_SETTINGS},
                               rope_scaling=RopeScalingConfig(**settings["rope_scaling"]))


def backbone_params(model: ModelConfig) -> dict:
    """The HAT parameters a pretrained backbone provides: its layers and its final norm."""
    settings = model_settings(read_config(model.backbone_from))
    blocks, norm = stack_params(Tensors(model.backbone_from), settings)
    return {"backbone": blocks, "backbone_norm": norm}
