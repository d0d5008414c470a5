"""The training loop: data, state, jit'd step, logging, evaluation, checkpoints, signals."""

import bisect
import dataclasses
import itertools
import math
import os
import shutil
import statistics
import tempfile
import time

import jax
import yaml

from hiermodel import storage
from hiermodel.config import Config, GateConfig, ModelConfig, from_dict, to_dict
from hiermodel.data.pipeline import train_dataset
from hiermodel.data.sources import open_split, open_train
from hiermodel.errors import UserError
from hiermodel.eval.score import make_score_fn, score_source
from hiermodel.models.pretrained import backbone_params, with_backbone_from
from hiermodel.models.registry import check_kind, model_flops, train_flops
from hiermodel.run import TOKENIZER_FILE, compression_flops_per_byte, encoding, latest_config, open_latest
from hiermodel.train import calibrate, hardware
from hiermodel.train import state as state_lib
from hiermodel.train.aot import batch_shapes
from hiermodel.train.checkpoint import Checkpointer, checkpoint_dir
from hiermodel.train.distributed import barrier, check_shared, from_process_zero
from hiermodel.train.metrics import MetricsWriter, read_metrics
from hiermodel.train.preemption import StopRequest
from hiermodel.sharding import batch_sharding, make_mesh, to_global
from hiermodel.train.step import jit_train_step, optimizer, schedule


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


def mesh_peak_flops(config: Config, mesh) -> tuple[float | None, str]:
    """(peak FLOP/s of the whole mesh or None if unknown, where the per-device figure comes from)."""
    device = mesh.devices.flat[0]
    per_device, source = hardware.peak_flops_per_device(device.device_kind, device.platform, config.train.peak_flops)
    return (None if per_device is None else per_device * mesh.size), source


def profile_range(spec: str) -> tuple[int, int] | None:
    """train.profile_steps=START:END as (START, END), steps counted from 1; None when empty."""
    if not spec:
        return None
    try:
        first, last = (int(part) for part in spec.split(":"))
    except ValueError:
        first = last = 0
    if not 1 <= first <= last:
        raise UserError(f"train.profile_steps={spec!r}: give START:END, steps with 1 <= START <= END (e.g. 10:15)")
    return first, last


def _ungated(model: ModelConfig, gate: GateConfig) -> ModelConfig:
    """`model` with `gate` in place of its gate settings if it has no gate (they are unused then):
    what a continued run must equal, so that it may add a gate (MrT5's setting: gating a trained
    model) or set an absent gate's fields."""
    return model if model.gate.layer else dataclasses.replace(model, gate=gate)


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
    if t.checkpoint_minutes < 0:
        raise UserError(f"train.checkpoint_minutes={t.checkpoint_minutes} must be 0 (off) or positive")
    profile_range(t.profile_steps)


def _differences(there: dict, here: dict, prefix: str) -> list[str]:
    """'key=A there, B here' for each key whose values differ (nested sections flattened)."""
    found = []
    for key in sorted(set(there) | set(here)):
        a, b = there.get(key), here.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}={a!r} there, {b!r} here")
    return found


def _check_resume(config: Config, step: int, saved: dict) -> None:
    """A run resumes only as what it was: the same model, and the same data stream (its
    checkpoint holds a position in that stream)."""
    saved = dict(saved, data={"shuffle_rows": 0, **saved.get("data", {})})  # saved before rows were shuffled
    saved = to_dict(from_dict(saved, f"{config.run_dir} checkpoint {step} config"))
    here = to_dict(config)
    saved["data"]["shards"] = saved["data"]["shards"] or here["data"]["shards"]  # saved before shards were resolved
    model = _differences(saved["model"], here["model"], "model.")
    if model:
        raise UserError(f"run_dir={config.run_dir} holds a checkpoint (step {step}) of another model "
                        f"({'; '.join(model[:3])}): choose a new run_dir (init_from={config.run_dir} starts from its "
                        f"weights), or the same model settings to resume")
    stream = lambda c: {"data": {k: v for k, v in c["data"].items() if k != "eval"}, "seed": c["seed"],
                        "train": {"batch_size": c["train"]["batch_size"]}}
    data = _differences(stream(saved), stream(here), "")
    if data:
        raise UserError(f"run_dir={config.run_dir} was trained on another data stream ({'; '.join(data[:3])}): its "
                        f"checkpoint's place in that stream means nothing in this one; resume with the same values, "
                        f"or start a new run_dir with init_from={config.run_dir}")


def _check_init_from(config: Config) -> tuple[int, bool]:
    """(latest step of init_from, whether this run adds a delete gate)."""
    source_run, source_step, source_config = open_latest(config.init_from)
    source_run.close()
    source_model = from_dict(source_config).model
    # The tokenizer is the source run's own copy whatever model.tokenizer names (run.tokenizer_path).
    expected = dataclasses.replace(_ungated(source_model, config.model.gate), tokenizer=config.model.tokenizer)
    if expected != config.model:
        differences = _differences(dataclasses.asdict(expected), dataclasses.asdict(config.model), "model.")
        raise UserError(f"init_from={config.init_from}: its model config differs from this run's "
                        f"({'; '.join(differences[:3])}); a delete gate, model.gate, is the one thing a continued "
                        f"run may add")
    return source_step, bool(config.model.gate.layer) and not source_model.gate.layer


# model.gate.calibrate reads the training data with the run's seed plus this.
CALIBRATION_SEED = 1000


def train(config: Config, devices=None) -> dict:
    """Train (or resume) the run in config.run_dir on `devices` (default: all); returns the last
    logged metrics, with "stopped_by" (the signal) when a signal stopped it early. Everything
    that can be wrong with the config, the data or the run directory is found before anything
    is compiled or written."""
    started = time.monotonic()
    # data.shards=0 means one per process: saved as the number, so that a resume on another
    # number of processes, which would read another stream, is caught.
    config = dataclasses.replace(config, model=with_backbone_from(config.model), data=dataclasses.replace(
        config.data, shards=config.data.shards or jax.process_count()))
    mesh = make_mesh(config.mesh, devices)
    validate(config, mesh)
    run_dir = storage.path(config.run_dir)
    check_shared(run_dir)
    latest = latest_config(config.run_dir)
    if latest is not None:
        if not (checkpoint_dir(config.run_dir) / str(latest[0]) / "data").exists():
            raise UserError(f"run_dir={config.run_dir} holds imported weights, not a training state to resume: "
                            f"train a new run_dir with init_from={config.run_dir}")
        _check_resume(config, *latest)
    initial = _check_init_from(config) if latest is None and config.init_from else None
    data = config.data
    encoder = encoding(config)
    source = open_train(data, encoder.reads_text)
    eval_source = open_split(data, "eval", text=encoder.reads_text) if data.eval else None
    local_batch = config.train.batch_size // jax.process_count()
    m1_per_byte = compression_flops_per_byte(config)
    data_iterator = iter(train_dataset(data, source, encoder.document, config.seed, local_batch,
                                       jax.process_index(), jax.process_count()))
    writer = MetricsWriter(run_dir, config.train.steps)
    if eval_source is not None and eval_source.split == "eval":  # a few bytes held out score as noise: say how many
        pieces, held = eval_source.split_size
        writer.info(f"data.holdout={data.holdout}: {held:,} bytes in {pieces} pieces held out for evaluation")
    tx = optimizer(config.train, config.model.gate)
    lr_at = jax.jit(schedule(config.train))  # for the log: one program, not one per operation of the schedule
    peak, peak_source = mesh_peak_flops(config, mesh)
    with jax.set_mesh(mesh):
        layout = state_lib.layout(config, tx, mesh)
        checkpointer = Checkpointer(run_dir, config.train.keep_checkpoints)
        earlier = {}
        if latest is not None:
            resume_step = latest[0]
            writer.info(f"resuming {run_dir} from step {resume_step}")
            state = checkpointer.restore(resume_step, layout.abstract, data_iterator)
            if writer.enabled and (run_dir / "metrics.jsonl").exists():
                logged = read_metrics(run_dir)
                # Time spent after the checkpoint was lost work: wall time, not productive time.
                earlier = {"wall_s": max((m.get("wall_s", 0.0) for m in logged.values()), default=0.0),
                           "productive_s": logged.get(resume_step, {}).get("productive_s", 0.0)}
        elif initial is not None:
            source_step, adds_gate = initial
            writer.info(f"initialising weights from {config.init_from} step {source_step}"
                        + ("; the delete gate starts fresh" if adds_gate else ""))
            wanted = {k: v for k, v in layout.abstract["params"].items() if not (adds_gate and k == "gate")}
            source_run = Checkpointer(config.init_from, read_only=True)
            params = source_run.restore_params(source_step, wanted)
            source_run.close()
            state = state_lib.with_params(params, tx, layout, config if adds_gate else None)
        elif config.model.backbone_from:
            model = config.model
            writer.info(f"backbone from {model.backbone_from}: {model.backbone_layers} layers of width "
                        f"{model.backbone_dim}; the byte encoder, pooling and decoder start fresh")
            params = state_lib.place(backbone_params(model), layout.param_shardings)
            state = state_lib.with_params(params, tx, layout, config)
        else:
            state = state_lib.initialize(config, tx, layout)
        if jax.process_index() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
            if config.model.kind == "subword" and not (run_dir / TOKENIZER_FILE).exists():
                encoder.tokenizer.save(run_dir / TOKENIZER_FILE)
        writer.info(f"{state_lib.num_params(config):,} parameters; mesh {dict(mesh.shape)}; "
                    f"{jax.device_count()} {jax.devices()[0].platform} devices; MFU against "
                    + (f"{peak / mesh.size:.3g} FLOP/s per device ({peak_source})" if peak else peak_source))

        writer.info("compiling the train step (minutes for a large model; progress starts after it)")
        step_fn = jit_train_step(layout, tx, config, mesh)
        if jax.process_count() > 1:
            # All compile before any reaches the first collective: CPU (gloo) collectives connect
            # on first use and give up after 30 s, which a process still compiling can miss.
            step_fn = step_fn.lower(layout.abstract, batch_shapes(config, config.train.batch_size,
                                                                  batch_sharding(mesh))).compile()
            barrier("hiermodel: train step compiled")
        score_fn = make_score_fn(layout.graphdef, config.model.compute_dtype, mesh, layout.param_shardings)
        clock = _Clock(started, earlier, int(state["step"]))

        def calibration_batches():
            """The batches a learned gate's bias is calibrated on: the training stream's, read with
            another seed, so that the run's own stream (and its resumes) stay as they are."""
            return iter(train_dataset(data, source, encoder.document, config.seed + CALIBRATION_SEED, local_batch,
                                      jax.process_index(), jax.process_count()))

        try:
            return _loop(config, state, step_fn, score_fn, encoder, data_iterator, eval_source, checkpointer,
                         writer, lr_at, peak, mesh, m1_per_byte, clock, calibration_batches)
        finally:
            checkpointer.wait()
            checkpointer.close()
            data_iterator.close()
            writer.close()


class _Clock:
    """Where a run's wall time goes: step windows between logs, waiting for data, and the rest
    (compiles, evaluation, checkpoints, restarts). Dispatch is asynchronous, so a step's time is
    only known per log window, when the host waits for the metrics."""

    def __init__(self, started: float, earlier: dict, start_step: int):
        """earlier: the wall and productive seconds of the run's earlier attempts, as logged."""
        self.started, self.earlier, self.start_step = started, earlier, start_step
        # Seconds per step of each log window, kept sorted (a long run logs many windows): all of
        # them, and those after the first, which holds the compile.
        self.windows: list[float] = []
        self.later_windows: list[float] = []
        self.restart()

    def restart(self):
        self.window_start, self.data_wait = time.monotonic(), 0.0

    def next_batch(self, iterator):
        waiting = time.monotonic()
        batch = next(iterator)
        self.data_wait += time.monotonic() - waiting
        return batch

    def close_window(self, steps: int) -> dict:
        elapsed = time.monotonic() - self.window_start
        if self.windows:
            bisect.insort(self.later_windows, elapsed / steps)
        bisect.insort(self.windows, elapsed / steps)
        windows = self.windows
        return {"elapsed": elapsed, "step_s": elapsed / steps, "data_wait": self.data_wait / elapsed,
                "step_s_p50": statistics.median_low(windows), "step_s_p90": windows[math.ceil(0.9 * len(windows)) - 1]}

    def goodput(self, step: int) -> dict:
        """Wall seconds of every attempt so far; productive seconds (the steps that survive, at
        the pace of this attempt's windows after its first, which holds the compile) and their
        share of the wall time, once this attempt has such windows."""
        wall = self.earlier.get("wall_s", 0.0) + time.monotonic() - self.started
        if not self.later_windows:
            return {"wall_s": wall}
        pace = statistics.median_low(self.later_windows)
        productive = self.earlier.get("productive_s", 0.0) + (step - self.start_step) * pace
        return {"wall_s": wall, "productive_s": productive, "goodput": productive / wall}
class _Profile:
    """A jax.profiler trace of steps START..END (train.profile_steps) in RUN_DIR/profile."""

    def __init__(self, spec: str, run_dir):
        self.steps = profile_range(spec)
        self.target = run_dir / "profile"
        self.tracing = None

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            # The profiler writes local files only; a bucket gets them when the trace ends.
            self.tracing = tempfile.mkdtemp(prefix="hiermodel-profile-") if storage.is_url(self.target) \
                else str(self.target)
            jax.profiler.start_trace(self.tracing)

    def after(self, step: int, state) -> None:
        if self.tracing and step == self.steps[1]:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if not self.tracing:
            return
        jax.profiler.stop_trace()
        if storage.is_url(self.target):
            for folder, _, names in os.walk(self.tracing):
                for name in names:
                    local = os.path.join(folder, name)
                    storage.upload(local, str(self.target / os.path.relpath(local, self.tracing)))
            shutil.rmtree(self.tracing)
        self.tracing = None


def _calibrate_gate(config, state, score_fn, batches, mesh, writer) -> tuple[dict, float]:
    """The state with its learned gate's bias moved so that the gate deletes its target share of
    model.gate.calibrate batches; and the change."""
    gate = config.model.gate
    try:
        found = calibrate.gate_margins(score_fn, state["params"],
                                       (to_global(b, mesh) for b in itertools.islice(batches, gate.calibrate)), gate.k)
    finally:
        batches.close()
    change = calibrate.bias_change(found, gate.target)
    writer.info(f"model.gate.calibrate={gate.calibrate}: the gate's bias moved by {change:+.4f}, so that it deletes "
                f"{calibrate.deleted_share(found, change):.1%} of {found.size:,} positions of training batches "
                f"({calibrate.deleted_share(found):.1%} before)")
    return {**state, "params": calibrate.shift_gate_bias(state["params"], change)}, change


def _loop(config, state, step_fn, score_fn, encoder, data_iterator, eval_source, checkpointer, writer, lr_at, peak,
          mesh, m1_per_byte, clock, calibration_batches):
    t = config.train
    shape = (config.model, config.data.row_tokens, config.data.row_words)
    step_model_flops = t.batch_size * model_flops(*shape)
    step_hardware_flops = t.batch_size * train_flops(*shape, mesh.devices.flat[0].platform)
    start = int(state["step"])
    stop = StopRequest()
    writer.begin(start)
    profile = _Profile(t.profile_steps, storage.path(config.run_dir))
    pending, last_logged, window_bytes, window_words, window_steps = [], {}, 0, 0, 0
    last_saved, last_save_time = start, time.monotonic()
    try:
        for step in range(start, t.steps):
            done = step + 1
            profile.before(done)
            local = clock.next_batch(data_iterator)
            window_bytes += int(local["token_bytes"].sum()) * jax.process_count()
            window_words += int((local["word_segments"] > 0).sum()) * jax.process_count()
            state, metrics = step_fn(state, to_global(local, mesh))
            profile.after(done, state)
            pending.append((done, metrics))
            window_steps += 1
            final = stop.reached(done) or done == t.steps
            save = done % t.checkpoint_every == 0 or final
            if t.checkpoint_minutes and not save and done % t.log_every == 0:
                # Process 0's clock decides, so that every process saves at the same step.
                due = time.monotonic() - last_save_time >= 60 * t.checkpoint_minutes
                save = from_process_zero(f"save-at-{done}", "1" if due else "") == "1"
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
                timing = clock.close_window(window_steps)
                elapsed = timing.pop("elapsed")
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
                    "flops_per_byte": step_hardware_flops * window_steps / max(window_bytes, 1) + m1_per_byte,
                    "train_flops": float(step_hardware_flops * done), **timing, **clock.goodput(done),
                }
                if peak:
                    last_logged["mfu"] = step_model_flops * window_steps / elapsed / peak
                    last_logged["hfu"] = step_hardware_flops * window_steps / elapsed / peak
                if "alpha" in m:
                    positions = max(sum(float(x["positions"]) for _, x in fetched), 1.0)
                    last_logged.update(
                        deletion=sum(float(x["deleted"]) for _, x in fetched) / positions,
                        deletion_soft=sum(float(x["deleted_soft"]) for _, x in fetched) / positions,
                        alpha=float(m["alpha"]))
                writer.write(done, last_logged)
                writer.progress(done, last_logged)
                window_bytes = window_words = window_steps = 0
                clock.restart()
            if done == t.steps and config.model.gate.layer and config.model.gate.calibrate:
                state, change = _calibrate_gate(config, state, score_fn, calibration_batches(), mesh, writer)
                last_logged = {**last_logged, "gate_bias_change": change}
                clock.restart()
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
                sample = f"a sample of {result['bytes']:,} bytes (train.eval_rows={t.eval_rows} rows; hiermodel eval " \
                         f"scores all of it)" if t.eval_rows else f"{result['bytes']:,} bytes"
                writer.info(f"eval step {done}: bpb {result['bpb']:.4f} on {sample}{by_language}")
                clock.restart()
            if save:
                checkpointer.save(done, state, data_iterator, to_dict(config))
                last_saved, last_save_time = done, time.monotonic()
                clock.restart()
            if stop.signal is not None and final:
                writer.info(f"{stop.signal}: saved checkpoint at step {done}"
                            + (" on every process" if stop.shared else "") + "; rerun the same command to resume",
                            every_process=True)
                last_logged = {**last_logged, "stopped_by": stop.signal}
                break
    finally:
        profile.stop()
        stop.restore()
    return last_logged
