"""Opening a run directory: its config, checkpoints, parameters, tokenizer and M1 fingerprint.

RUN_DIR holds config.yaml, checkpoints/STEP/{state,data,config}, metrics.jsonl and tensorboard/;
a subword run also keeps its tokenizer there, and a byte run used as an M1 its integer model.
Training, evaluation, compression and the CLI all open runs through here.
"""

import json

import numpy as np

from hiermodel import config as config_lib
from hiermodel import storage
from hiermodel.config import Config
from hiermodel.data import window_records
from hiermodel.data.documents import ByteEncoding, SubwordEncoding
from hiermodel.errors import UserError
from hiermodel.models.registry import check_kind
from hiermodel.text.pretrained_tokenizer import PretrainedTokenizer, load as load_tokenizer
from hiermodel.train import state as state_lib
from hiermodel.train.checkpoint import Checkpointer, checkpoint_dir
from hiermodel.sharding import make_mesh

TOKENIZER_FILE = "tokenizer.json"
INTEGER_M1_FILE = "m1_integer.npz"  # written by the first compression with this run as M1


def latest_config(run_dir: str) -> tuple[int, dict] | None:
    """(step, resolved config) of a run's latest complete checkpoint; None if it has none yet."""
    if not checkpoint_dir(run_dir).is_dir():
        return None
    checkpointer = Checkpointer(run_dir, read_only=True)
    step = checkpointer.latest_step()
    checkpointer.close()
    if step is None:
        return None
    config_file = checkpoint_dir(run_dir) / str(step) / "config" / "metadata"
    try:
        return step, json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{run_dir}: checkpoint {step} has no readable config; is it a hiermodel run?") from None


def open_latest(run_dir: str) -> tuple[Checkpointer, int, dict]:
    """(read-only checkpointer, latest step, resolved config) of a finished or running run."""
    if not storage.path(run_dir).is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not checkpoint_dir(run_dir).is_dir():
        raise UserError(f"{run_dir}: not a hiermodel run (no checkpoints/ directory)")
    latest = latest_config(run_dir)
    if latest is None:
        raise UserError(f"{run_dir}: the run has no complete checkpoint yet")
    return Checkpointer(run_dir, read_only=True), *latest


def load_params(run_dir: str, changes: dict | None = None):
    """(config, mesh, graphdef, params) of a run's latest checkpoint, on all local devices; the
    config's run_dir is where the run is now. changes: config values put over the saved ones
    before the model is built (a random gate's rate, say); the parameters must still fit."""
    checkpointer, step, saved = open_latest(run_dir)
    config = config_lib.from_dict(saved, f"{run_dir} checkpoint {step} config", changes)
    config.run_dir = run_dir
    check_kind(config.model)
    mesh = make_mesh(config_lib.MeshConfig(data=-1, fsdp=1, tensor=1))
    graphdef, abstract = state_lib.abstract_params(config, mesh)
    try:
        params = checkpointer.restore_params(step, abstract)
    except (ValueError, KeyError) as e:
        reason = str(e).splitlines()[0][:200]
        raise UserError(f"{run_dir}: checkpoint {step} does not hold this model's parameters ({reason})") from None
    finally:
        checkpointer.close()
    return config, mesh, graphdef, params


def tokenizer_path(config: Config) -> str:
    """The run's own copy of its tokenizer once it has one, else that of the run it continues
    (`init_from`: continued pretraining keeps the original tokenizer), else `model.tokenizer`."""
    for run_dir in (config.run_dir, config.init_from):
        if run_dir and (storage.path(run_dir) / TOKENIZER_FILE).exists():
            return str(storage.path(run_dir) / TOKENIZER_FILE)
    return config.model.tokenizer


def encoding(config: Config):
    """The kind's documents: ByteEncoding, SubwordEncoding, or for eiw a WindowEncoding."""
    if config.data.end_of_text and config.model.kind not in ("hat", "byte"):
        raise UserError(f"data.end_of_text needs a byte-level model (hat or byte), not model.kind="
                        f"{config.model.kind}: it has no end-of-text id")
    if config.model.kind == "eiw":
        return window_records.WindowEncoding(config.model.window_bits, config.model.window_token_bits)
    if config.model.kind != "subword":
        return ByteEncoding(config.data.max_word_bytes, config.data.end_of_text)
    if not config.model.tokenizer:
        raise UserError("model.kind=subword needs model.tokenizer: a file made by tools/train_tokenizer.py")
    path = tokenizer_path(config)
    tokenizer = load_tokenizer(path)
    # A pretrained model's embedding may have more rows than its tokenizer has ids (never produced).
    fits = (tokenizer.vocab_size <= config.model.vocab_size if isinstance(tokenizer, PretrainedTokenizer)
            else tokenizer.vocab_size == config.model.vocab_size)
    if not fits:
        raise UserError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size="
                        f"{config.model.vocab_size}")
    if isinstance(tokenizer, PretrainedTokenizer):
        tokenizer.pad_vocab(config.model.vocab_size)
    return SubwordEncoding(tokenizer, config.data.max_word_bytes)


def m1_fingerprint(m1_run: str) -> str:
    """The fingerprint of the integer M1 a byte run compresses with (read from its header only)."""
    path = storage.path(m1_run) / INTEGER_M1_FILE
    if not path.exists():
        raise UserError(f"{m1_run}: no {INTEGER_M1_FILE}, so it has compressed nothing; compress the data "
                        f"with hiermodel compress --m1 {m1_run}")
    try:
        with path.open("rb") as f, np.load(f, allow_pickle=False) as archive:
            return json.loads(archive["header"].tobytes())["fingerprint"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not an integer M1 file ({str(e).splitlines()[0][:120]})") from None


def compression_flops_per_byte(config: Config) -> float:
    """M1's FLOPs per raw byte for an eiw model (from its shards' summaries; counted in its
    flops_per_byte, as the paper counts them), 0 for the other kinds. An eiw run that names its
    M1 must be trained on windows that M1 made."""
    if config.model.kind != "eiw":
        return 0.0
    summaries = window_records.shard_summaries(config.data.train)
    if config.model.m1:
        fingerprint = m1_fingerprint(config.model.m1)
        for summary in summaries:
            if summary["m1_fingerprint"] != fingerprint:
                raise UserError(f"{summary['directory']}: its windows were coded by the M1 of {summary['m1_run']} "
                                f"({summary['m1_fingerprint'][:12]}), not by model.m1={config.model.m1} "
                                f"({fingerprint[:12]})")
    return window_records.m1_flops_per_byte(summaries)
