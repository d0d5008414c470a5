"""The training loop: data, state, jit'd step, logging, evaluation, checkpoints, signals."""

import dataclasses
import functools
import math
import signal
import time

import jax
import numpy as np
import yaml

from hiermodel import storage
from hiermodel.config import Config, GateConfig, ModelConfig, from_dict, to_dict
from hiermodel.data.pipeline import train_dataset
from hiermodel.data.sources import open_split, open_train
from hiermodel.errors import UserError
from hiermodel.eval.score import make_score_fn, score_source
from hiermodel.data.documents import TOKENIZER_FILE, encoding
from hiermodel.models.registry import check_kind, train_flops
from hiermodel.train import state as state_lib
from hiermodel.train.aot import batch_shapes
from hiermodel.train.checkpoint import Checkpointer, open_run
from hiermodel.train.distributed import barrier
from hiermodel.train.metrics import MetricsWriter
from hiermodel.train.sharding import batch_sharding, make_mesh, to_global
from hiermodel.train.step import jit_train_step, optimizer, schedule


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


# Dense bf16 peak per chip, for MFU.
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v6": 918e12, "v5p": 459e12,
              "v5": 197e12, "v4": 275e12}


def peak_flops_per_device(config: Config) -> float:
    if config.train.peak_flops > 0:
        return config.train.peak_flops
    kind = jax.devices()[0].device_kind.lower()
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops
    return measured_matmul_flops() / len(jax.local_devices())


@functools.lru_cache(maxsize=1)
def measured_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    """What this host's JAX reaches on a float32 matmul (the peak quoted for CPU MFU)."""
    a = jax.device_put(np.ones((size, size), np.float32), jax.local_devices()[0])
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    started = time.perf_counter()
    for _ in range(repeats):
        matmul(a).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def _ungated(model: ModelConfig, gate: GateConfig) -> ModelConfig:
    """`model` with `gate` in place of its gate settings if it has no gate (they are unused then):
    what a continued run must equal, so that it may add a gate (MrT5's setting: gating a trained
    model) or set an absent gate's fields."""
    return model if model.gate.layer else dataclasses.replace(model, gate=gate)


def compression_flops_per_byte(config: Config) -> float:
    """M1's FLOPs per raw byte for an eiw model (from its shards' summaries; counted in its
    flops_per_byte, as the paper counts them), 0 for the other kinds. An eiw run that names its
    M1 must be trained on windows that M1 made."""
    if config.model.kind != "eiw":
        return 0.0
    from hiermodel.compress import files

    if config.model.m1:
        files.check_shards_m1(config.data.train, config.model.m1)
    return files.m1_flops_per_byte(config.data.train)


def validate(config: Config, mesh) -> None:
    check_kind(config.model)
    t = config.train
    shards = math.prod(mesh.shape[a] for a in batch_sharding(mesh).spec[0])
    if t.steps < 1 or t.grad_accum < 1 or t.batch_size < 1:
        raise UserError("train.steps, train.batch_size and train.grad_accum must be positive")
    for name in ("log_every", "eval_every", "checkpoint_every"):
        if getattr(t, name) < 1:
            raise UserError(f"train.{name}={getattr(t, name)} must be at least 1 (a number of steps; set it "
                            f"above train.steps to do it only at the end)")
    if t.batch_size % (t.grad_accum * jax.process_count()) or (t.batch_size // t.grad_accum) % shards:
        raise UserError(f"train.batch_size={t.batch_size} must split into train.grad_accum={t.grad_accum} "
                        f"microbatches divisible by the {shards} batch shards and {jax.process_count()} processes")
    if config.model.kind == "eiw" and config.data.row_words < config.data.row_tokens:
        raise UserError(f"model.kind=eiw: every window token is a word of its own, so data.row_words="
                        f"{config.data.row_words} must be at least data.row_tokens={config.data.row_tokens}")
    if config.model.compute_dtype not in ("float32", "bfloat16"):
        raise UserError(f"model.compute_dtype={config.model.compute_dtype!r}: use float32 or bfloat16")
    if t.schedule not in ("cosine", "wsd"):
        raise UserError(f"train.schedule={t.schedule!r}: use cosine or wsd")


class _StopRequest:
    """SIGTERM/SIGINT ask the loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.signal = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train(config: Config, devices=None) -> dict:
    """Train (or resume) the run in config.run_dir on `devices` (default: all); returns the last
    logged metrics."""
    mesh = make_mesh(config.mesh, devices)
    validate(config, mesh)
    run_dir = storage.path(config.run_dir)
    writer = MetricsWriter(run_dir, config.train.steps)
    data = config.data
    encoder = encoding(config)
    source = open_train(data, encoder.reads_text)
    eval_source = open_split(data, "eval", text=encoder.reads_text) if data.eval else None
    local_batch = config.train.batch_size // jax.process_count()
    data_iterator = iter(train_dataset(data, source, encoder.document, config.seed, local_batch,
                                       jax.process_index(), jax.process_count()))
    tx = optimizer(config.train, config.model.gate)
    lr_at = schedule(config.train)
    peak = peak_flops_per_device(config) * mesh.size
    m1_per_byte = compression_flops_per_byte(config)
    with jax.set_mesh(mesh):
        layout = state_lib.layout(config, tx, mesh)
        checkpointer = Checkpointer(run_dir, config.train.keep_checkpoints)
        resume_step = checkpointer.latest_step()
        if resume_step is not None:
            writer.info(f"resuming {run_dir} from step {resume_step}")
            state = checkpointer.restore(resume_step, layout.abstract, data_iterator)
        elif config.init_from:
            source_run, source_step, source_config = open_run(config.init_from)
            source_model = from_dict(source_config).model
            adds_gate = bool(config.model.gate.layer) and not source_model.gate.layer
            if _ungated(source_model, config.model.gate) != config.model:
                raise UserError(f"init_from={config.init_from}: its model config differs from this run's (a delete "
                                f"gate, model.gate, is the one thing a continued run may add)")
            writer.info(f"initialising weights from {config.init_from} step {source_step}"
                        + ("; the delete gate starts fresh" if adds_gate else ""))
            wanted = {k: v for k, v in layout.abstract["params"].items() if not (adds_gate and k == "gate")}
            params = source_run.restore_params(source_step, wanted)
            source_run.close()
            state = state_lib.with_params(params, tx, layout, config if adds_gate else None)
        else:
            state = state_lib.initialize(config, tx, layout)
        if jax.process_index() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
            if config.model.kind == "subword" and not (run_dir / TOKENIZER_FILE).exists():
                encoder.tokenizer.save(run_dir / TOKENIZER_FILE)
        writer.info(f"{state_lib.num_params(config):,} parameters; mesh {dict(mesh.shape)}; "
                    f"{jax.device_count()} {jax.devices()[0].platform} devices")

        step_fn = jit_train_step(layout, tx, config, mesh)
        if jax.process_count() > 1:
            # All compile before any reaches the first collective: CPU (gloo) collectives connect
            # on first use and give up after 30 s, which a process still compiling can miss.
            step_fn = step_fn.lower(layout.abstract, batch_shapes(config, config.train.batch_size,
                                                                  batch_sharding(mesh))).compile()
            barrier("hiermodel: train step compiled")
        score_fn = make_score_fn(layout.graphdef, config.model.compute_dtype, mesh, layout.param_shardings)
        try:
            return _loop(config, state, step_fn, score_fn, encoder, data_iterator, eval_source, checkpointer,
                         writer, lr_at, peak, mesh, m1_per_byte)
        finally:
            checkpointer.wait()
            checkpointer.close()
            data_iterator.close()
            writer.close()


def _loop(config, state, step_fn, score_fn, encoder, data_iterator, eval_source, checkpointer, writer, lr_at, peak,
          mesh, m1_per_byte):
    t = config.train
    step_flops = t.batch_size * train_flops(config.model, config.data.row_tokens, config.data.row_words)
    start = int(state["step"])
    stop = _StopRequest()
    pending, last_logged, window_bytes, window_words, window_steps = [], {}, 0, 0, 0
    last_saved = start
    window_start = time.monotonic()
    try:
        for step in range(start, t.steps):
            local = next(data_iterator)
            window_bytes += int(local["token_bytes"].sum()) * jax.process_count()
            window_words += int((local["word_segments"] > 0).sum()) * jax.process_count()
            state, metrics = step_fn(state, to_global(local, mesh))
            pending.append((step + 1, metrics))
            window_steps += 1
            done = step + 1
            final = done == t.steps or stop.signal is not None
            save = done % t.checkpoint_every == 0 or final
            if done % t.log_every == 0 or save:
                fetched = [(s, jax.device_get(m)) for s, m in pending]
                pending = []
                for s, m in fetched:
                    bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(float(m[k]))]
                    if bad:
                        where = storage.path(config.run_dir) / "checkpoints"
                        kept = (f"the last good checkpoint (step {last_saved}) is intact in {where}"
                                if last_saved else "no checkpoint had been saved")
                        raise TrainingDiverged(f"{bad[0]} is {float(m[bad[0]])} at step {s}; "
                                               f"stopped without saving; {kept}")
                elapsed = time.monotonic() - window_start
                flops = step_flops * window_steps
                # Loss over every target since the last log, not just the last batch's.
                nats = sum(float(m["nats"]) for _, m in fetched)
                targets = sum(float(m["targets"]) for _, m in fetched)
                target_bytes = sum(float(m["target_bytes"]) for _, m in fetched)
                m = fetched[-1][1]
                last_logged = {
                    "loss": nats / max(targets, 1.0), "bpb": nats / math.log(2) / max(target_bytes, 1.0),
                    "grad_norm": float(m["grad_norm"]),
                    "param_norm": float(m["param_norm"]),
                    "lr": float(lr_at(done - 1)), "bytes_per_s": window_bytes / elapsed,
                    "words_per_s": window_words / elapsed,
                    "flops_per_byte": flops / max(window_bytes, 1) + m1_per_byte,
                    "mfu": flops / elapsed / peak, "train_flops": float(step_flops * done),
                }
                if "alpha" in m:
                    positions = max(sum(float(x["positions"]) for _, x in fetched), 1.0)
                    last_logged.update(
                        deletion=sum(float(x["deleted"]) for _, x in fetched) / positions,
                        deletion_soft=sum(float(x["deleted_soft"]) for _, x in fetched) / positions,
                        alpha=float(m["alpha"]))
                writer.write(done, last_logged)
                writer.progress(done, last_logged)
                window_bytes = window_words = window_steps = 0
                window_start = time.monotonic()
            if eval_source is not None and (done % t.eval_every == 0 or done == t.steps):
                result = score_source(score_fn, state["params"], eval_source, encoder.document, config.data,
                                      t.batch_size, mesh, max_rows=t.eval_rows, text=encoder.reads_text)
                # Languages that eval_rows left out have no bytes (and no bits per byte).
                languages = {name: entry for name, entry in result["per_language"].items() if entry["bytes"]}
                languages = languages if len(languages) > 1 else {}
                writer.write(done, {"bpb": result["bpb"], "bytes": result["bytes"],
                                    **{f"bpb_{name}": entry["bpb"] for name, entry in languages.items()}},
                             prefix="eval")
                by_language = "".join(f", {name} {entry['bpb']:.4f}" for name, entry in languages.items())
                writer.info(f"eval step {done}: bpb {result['bpb']:.4f} on {result['bytes']:,} bytes{by_language}")
                window_start = time.monotonic()
            if save:
                checkpointer.save(done, state, data_iterator, to_dict(config))
                last_saved = done
            if stop.signal is not None:
                writer.info(f"{stop.signal}: saved checkpoint at step {done}; rerun the same command to resume")
                break
    finally:
        stop.restore()
    return last_logged
