"""Hugging Face Llama-family checkpoints in and out of run directories.

`import_checkpoint` makes a subword run of a checkpoint and its own tokenizer.json: its
parameters at step 0, which `hiermodel eval` and `generate` read and `init_from` continues.
`export_run` writes a subword run back in the Hugging Face layout.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import yaml
from tokenizers import processors

from hiermodel import config as config_lib
from hiermodel import storage
from hiermodel.data.pipeline import check_shapes
from hiermodel.errors import UserError
from hiermodel.models import pretrained
from hiermodel.run import TOKENIZER_FILE, latest_config, load_params
from hiermodel.text.pretrained_tokenizer import PretrainedTokenizer, load as load_tokenizer
from hiermodel.text.subword import BOS_TOKEN, Subword, read
from hiermodel.train.checkpoint import Checkpointer


def _copy_tokenizer(source: Path, hf_config: dict, target: Path) -> Subword | PretrainedTokenizer:
    """The checkpoint's tokenizer, saved to `target`: a hiermodel BPE (an exported run) as it is; a
    pretrained one that adds no beginning-of-text token (Qwen2) gets config.json's bos_token_id,
    else its eos_token_id, since documents are scored after one."""
    tokenizer = read(source)
    if tokenizer.get_vocab().get(BOS_TOKEN) == 0:
        loaded = Subword(tokenizer, str(source))
    else:
        if json.loads(tokenizer.to_str()).get("post_processor") is None:
            bos_id = hf_config.get("bos_token_id")
            bos_id = hf_config.get("eos_token_id") if bos_id is None else bos_id
            bos_id = bos_id[0] if isinstance(bos_id, list) else bos_id
            if bos_id is None or tokenizer.id_to_token(bos_id) is None:
                raise UserError(f"{source}: it adds no beginning-of-text token and config.json names none "
                                "(bos_token_id, eos_token_id)")
            bos = tokenizer.id_to_token(bos_id)
            tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                                     special_tokens=[(bos, bos_id)])
        loaded = PretrainedTokenizer(tokenizer, str(source))
    loaded.save(target)
    return loaded


def import_checkpoint(source: str, run_dir: str, row_tokens: int = 1024) -> config_lib.Config:
    """A subword run in `run_dir` holding the checkpoint in `source` (a local directory)."""
    directory = Path(source)
    hf_config = pretrained.read_config(directory)
    if not (directory / TOKENIZER_FILE).exists():
        raise UserError(f"{directory}: no {TOKENIZER_FILE}; a subword run scores text with the model's own tokenizer")
    if latest_config(run_dir) is not None or (storage.path(run_dir) / TOKENIZER_FILE).exists():
        raise UserError(f"run_dir={run_dir} already holds a run; import into a new directory")
    settings = pretrained.model_settings(hf_config)
    run = storage.path(run_dir)
    config = config_lib.from_dict({
        "run_dir": run_dir,
        "model": {"kind": "subword", "tokenizer": str(run / TOKENIZER_FILE), **settings},
        "data": {"row_tokens": row_tokens, "row_words": row_tokens},
    }, f"{directory} config.json")
    check_shapes(config.data)
    tensors = pretrained.Tensors(directory)  # all before anything is written: no weights, no run
    run.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = _copy_tokenizer(directory / TOKENIZER_FILE, hf_config, run / TOKENIZER_FILE)
        if tokenizer.vocab_size > settings["vocab_size"] or (isinstance(tokenizer, Subword)
                                                             and tokenizer.vocab_size != settings["vocab_size"]):
            raise UserError(f"{directory}: the tokenizer has {tokenizer.vocab_size} ids, the model "
                            f"{settings['vocab_size']} embeddings")
        params = pretrained.language_model_params(tensors, settings)
        checkpointer = Checkpointer(run_dir)
        checkpointer.save_params(0, params, config_lib.to_dict(config))
        checkpointer.close()
    except BaseException:
        shutil.rmtree(run, ignore_errors=True)  # nothing half-made is left to be mistaken for a run
        raise
    (run / "config.yaml").write_text(yaml.safe_dump(config_lib.to_dict(config), sort_keys=False))
    return config


def export_run(run_dir: str, output: str) -> config_lib.Config:
    """A subword run's latest parameters as a LlamaForCausalLM checkpoint with its tokenizer.json."""
    import jax

    config, _, _, params = load_params(run_dir)
    model = config.model
    if model.kind != "subword":
        raise UserError(f"{run_dir}: model.kind={model.kind}; only subword runs export as a Llama checkpoint")
    if Path(output).exists() and any(Path(output).iterdir()):
        raise UserError(f"{output}: not empty; export into a new directory")
    settings = {**{k: getattr(model, k) for k in ("backbone_dim", "backbone_layers", "backbone_heads",
                                                   "backbone_kv_heads", "backbone_mlp_dim", "rope_theta", "norm_eps",
                                                   "attention_bias", "tie_embeddings", "vocab_size")},
                "rope_scaling": config_lib.to_dict(config)["model"]["rope_scaling"]}
    tokenizer = load_tokenizer(storage.path(run_dir) / TOKENIZER_FILE)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
    pretrained.export(host, settings, output, tokenizer.bos_id)
    tokenizer.save(Path(output) / TOKENIZER_FILE)
    return config
