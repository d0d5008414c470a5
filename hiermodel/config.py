"""The one config system: typed dataclasses, YAML files, key=value overrides."""

import dataclasses
import typing
from pathlib import Path

import yaml

from hiermodel.errors import UserError


@dataclasses.dataclass
class GateConfig:
    """MrT5-style delete gate (REFERENCE.md section 2): `byte` gates bytes, `hat` gates words in its backbone."""

    layer: int = 0  # > 0: the gate reads the output of this many layers of the gated stack; 0: no gate
    # > 0: the stack's last this many layers run on every position again, after the deep update is
    # carried (an hourglass's upsampling). In a causal stack every deleted position must still
    # predict; these layers let it read the deep states of the kept positions before it does.
    full_layers: int = 0
    k: float = -30.0  # gate values lie in (k, 0); a position is deleted below k / 2
    bias: float = 1.0  # initial bias: gates start near k * sigmoid(-1), nothing deleted
    target: float = 0.5  # deletion rate the controller holds
    # > 0: the controller's target rises linearly from 0 over this many steps, so that a gate
    # trained from scratch does not delete while the layers after it are still learning.
    target_warmup: int = 0
    # PI controller gains of the regulariser weight alpha. MrT5's 0.5 and 1e-5 (fine-tuning a
    # trained model) swing between 0% and 90% deleted when training from scratch with Adam.
    kp: float = 0.02
    ki: float = 2e-4
    logit_cap: float = 10.0  # soft cap on attention logits after the gate; below |k| / 2 no logit outweighs a deletion
    capacity_slack: float = 1.15  # hard deletion keeps ceil(N * (1 - target) * slack) positions
    mode: str = "learned"  # or random: each position deleted with probability `target` (the baseline)
    # The gate reads its input without shaping it: alpha's gradient then trains only the gate.
    # Otherwise the layers under the gate learn to move every score at once, and on a HAT
    # backbone (where deleting words barely costs loss) the rate swings past the target.
    detach: bool = False
    # > 0: the gate's own parameters train by plain SGD at this learning rate, outside the
    # gradient clipping. Adam moves every gate weight a full step for any non-zero alpha, so the
    # rate answers alpha's sign, not its size, and the controller overshoots; under SGD alpha's
    # push is proportional to alpha.
    sgd_lr: float = 0.0
    # False: the gate learns only from the attention of the gated layers (deleted keys are what
    # later positions lose), as MrT5's encoder gate does. The straight-through carry otherwise
    # also rewards keeping a position whose own prediction gains from the deep layers: the hard
    # to predict ones, which then pay most for the thinner context (BENCHMARKS.md).
    carry_gradient: bool = True
    # > 0: in training steps the gate's score gets logistic noise of this scale, so a
    # learned gate's choices vary near its threshold and the layers after it see every kind of
    # position kept now and then, as random deletion's do; evaluation (soft or hard) is unchanged.
    noise: float = 0.0
    # The layers after the gate add each key's hard decision (0 kept, k deleted) to its logits in
    # the forward pass, with the gate value's gradient (straight through), as the carry does. A
    # learned gate otherwise settles its kept positions just above k / 2 (measured): kept, yet
    # offset by about k / 2, nearly hidden from every query.
    straight_through: bool = False
    # What the full layers' attention reads: "all" positions, or only the "kept" ones, as MrT5's
    # decoder reads only the encoder's kept states. With "all" a deleted byte's first-layer state
    # stays visible: deletion is cheap, and which positions the gate keeps hardly matters (learned
    # and random deletion score alike, BENCHMARKS.md). With "kept" what the gate drops, later
    # positions can no longer read: the learned gate then beats random deletion on two of three
    # corpora, at a higher cost. Every position still predicts from its own state.
    full_keys: str = "all"
    # With full_keys=kept: the full layers still read each of the `full_recent` positions up to
    # and including the query's, deleted or not. Spelling a word needs its own bytes; the gate
    # decides what of the context beyond them stays.
    full_recent: int = 0
    # > 0: after the last training step, a learned gate's bias is shifted so that it deletes
    # `target` of this many training batches (read with another seed). Most gate values lie near
    # k / 2, so otherwise the last steps' bias sets the rate at inference (BENCHMARKS.md).
    calibrate: int = 0


@dataclasses.dataclass
class RopeScalingConfig:
    """Llama 3.1's RoPE frequency scaling (models/layers.py rope_frequencies); factor 0: none."""

    factor: float = 0.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192

    def as_tuple(self) -> tuple:
        if not self.factor:
            return ()
        return (self.factor, self.low_freq_factor, self.high_freq_factor, self.original_context)


@dataclasses.dataclass
class ModelConfig:
    kind: str = "hat"  # hat, byte, subword, or eiw (a transformer over Equal-Info windows)
    encoder_layers: int = 2
    decoder_layers: int = 2
    byte_dim: int = 128  # width of the byte encoder and decoder
    byte_heads: int = 4
    byte_kv_heads: int = 2
    byte_mlp_dim: int = 384
    byte_window: int = 768  # sliding attention window over bytes
    backbone_layers: int = 4
    backbone_dim: int = 256
    backbone_heads: int = 4
    backbone_kv_heads: int = 2
    backbone_mlp_dim: int = 768
    pool_heads: int = 4
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = dataclasses.field(default_factory=RopeScalingConfig)  # backbone-shaped stacks
    norm_eps: float = 1e-6
    attention_bias: bool = False  # backbone-shaped stacks: query, key and value biases (Qwen2)
    tie_embeddings: bool = False  # byte and subword: the output layer is the embedding, transposed
    # hat: a local Hugging Face Llama-family checkpoint (config.json, *.safetensors) whose layers
    # and final norm start the backbone; its shapes are the backbone's (models/pretrained.py).
    backbone_from: str = ""
    vocab_size: int = 0  # subword: the tokenizer's size (BOS and the 256 bytes included)
    window_bits: int = 16  # eiw: bits per Equal-Info window of the compressed shards (W)
    window_token_bits: int = 16  # eiw: bits per token, W (one token per window) or a divisor such as 8
    m1: str = ""  # eiw: the run directory of M1, the byte model whose coder made the shards
    tokenizer: str = ""  # subword: a file made by tools/train_tokenizer.py
    compute_dtype: str = "float32"  # or bfloat16; parameters always stay float32
    remat: str = "none"  # recompute in the backward: none, full, save_dots, offload, save_attention
    encoder_remat: str = ""  # hat: the byte encoder's own remat ("": model.remat)
    backbone_remat: str = ""  # the word (hat) or token stack's own remat ("": model.remat)
    decoder_remat: str = ""  # hat: the byte decoder's own remat ("": model.remat)
    scan_layers: bool = False  # run each stack of layers as one lax.scan (fast compiles at depth)
    attention: str = "auto"  # xla, splash (TPU kernel) or flash (GPU kernel); auto: the kernel where it applies
    gate: GateConfig = dataclasses.field(default_factory=GateConfig)

    def remat_of(self, stack: str) -> str:
        """The remat of `stack` (encoder, backbone or decoder): its own, else model.remat."""
        return getattr(self, f"{stack}_remat") or self.remat


@dataclasses.dataclass
class DataConfig:
    train: list[str] = dataclasses.field(default_factory=lambda: ["builtin:train"])
    train_weights: list[float] = dataclasses.field(default_factory=list)  # share of bytes per data.train entry
    eval: list[str] = dataclasses.field(default_factory=lambda: ["builtin:eval"])
    separator: str = ""  # empty: one document per file; else split text files on it
    chunk_bytes: int = 0  # > 0: cut text documents into pieces of at most this size, at line ends
    # Files are read in units of about this many bytes, and long documents in pieces of that size
    # (cut at line ends, so their words and rows are as if read whole); 0: whole files.
    read_bytes: int = 262144
    holdout: float = 0.0  # > 0: this share of documents (by content hash) is never trained on; eval reads only it
    jsonl_field: str = "text"
    max_word_bytes: int = 100
    # hat and byte: every document ends with the end-of-text token, a word of its own, so a model
    # learns where documents stop and generation stops there; its bits count, its bytes do not.
    end_of_text: bool = False
    row_tokens: int = 1024  # positions per row: bytes, or subword tokens
    row_words: int = 256
    shuffle: bool = True
    # With shuffle: packed rows are shuffled in windows of this many per data shard, so a batch
    # mixes stretches of several units instead of consecutive rows of one; 0: packing order.
    shuffle_rows: int = 1024
    shards: int = 0  # independent packing streams, split over processes; 0: one per process


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # rows per step, over all processes
    grad_accum: int = 1
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine or wsd
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    log_every: int = 10
    eval_every: int = 200
    eval_rows: int = 64
    checkpoint_every: int = 200
    checkpoint_minutes: float = 0.0  # also save at the first log step this long after the last save; 0: off
    keep_checkpoints: int = 3
    peak_flops: float = 0.0  # bf16 FLOP/s per device for MFU; 0: the table's figure for the device kind
    profile_steps: str = ""  # START:END writes a jax.profiler trace of those steps to RUN_DIR/profile
    freeze: list[str] = dataclasses.field(default_factory=list)  # model parts left as they are, e.g. encoder,decoder


@dataclasses.dataclass
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass
class DistributedConfig:
    """Multi-process jobs. TPU pods and SLURM allocations are detected; elsewhere name the
    coordinator (host:port) and give every process the count and its own id."""

    coordinator: str = ""
    num_processes: int = 1
    process_id: int = 0


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    run_dir: str = "runs/default"
    init_from: str = ""  # a run directory whose weights (only) start this run
    seed: int = 0


def _coerce(value, annotation, where: str):
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):  # an override: a,b or [a, b]; [] is empty
            text = value.strip()
            text = text[1:-1] if text.startswith("[") and text.endswith("]") else text
            value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, where) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if annotation in (int, float):
        try:
            number = float(value) if annotation is float else int(str(value), 0)
        except ValueError:
            raise UserError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
        return number
    if annotation is str:
        return "" if value is None else str(value)
    raise TypeError(f"unsupported config type {annotation} at {where}")


def _apply(obj, values: dict, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(hints)
            raise UserError(f"{where}: unknown key {key!r} (known: {known})")
        child = getattr(obj, key)
        if dataclasses.is_dataclass(child):
            if not isinstance(value, dict):
                raise UserError(f"{where}.{key}: expected a mapping, got {value!r}")
            _apply(child, value, f"{where}.{key}")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def from_dict(values: dict, where: str = "config", changes: dict | None = None) -> Config:
    """A config of nested mappings (a saved one), with `changes` (nested too) put over it."""
    config = Config()
    _apply(config, values, where)
    _apply(config, changes or {}, f"{where} changes")
    return config


def _read(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The YAML mappings to apply, in order: a file's `base` (a config path relative to it) first."""
    if path.resolve() in chain:
        raise UserError(f"{path}: configs name each other as base: {' -> '.join(map(str, chain))}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise UserError(f"{path}: cannot read config: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    base = values.pop("base", None)
    inherited = _read(path.parent / str(base), (*chain, path.resolve())) if base else []
    return inherited + [(values, str(path))]


def load(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (on top of its `base`, if it names one) and apply `key=value`
    overrides (dotted keys)."""
    config = Config()
    for values, where in _read(Path(path)):
        _apply(config, values, where)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"override {item!r}: expected key=value")
        *parents, leaf = key.split(".")
        nested: dict = {leaf: value}
        for parent in reversed(parents):
            nested = {parent: nested}
        _apply(config, nested, "override")
    return config


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
