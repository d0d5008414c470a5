"""Time a config's real train step on the attached devices: step time, bytes/s and MFU.

    python tools/bench_step.py CONFIG [key=value ...] [--steps 10] [--warmup 3] [--json FILE]

Batches come from the config's training data through the real pipeline and are all read before
timing starts; each timed step is waited for, and the figures are medians over --steps steps
after --warmup steps (the first compiles). MFU counts the model's FLOPs (causal attention pairs
once, nothing recomputed), HFU the FLOPs the hardware runs (remat, masked pairs), both against
the device kind's dense bf16 peak (train.peak_flops overrides it; unknown kinds get none).
"""

import argparse
import json
import statistics
import sys
import time


def bench(config, steps: int, warmup: int) -> dict:
    import jax

    from hiermodel.run import encoding
    from hiermodel.data.pipeline import train_dataset
    from hiermodel.data.sources import open_train
    from hiermodel.models.registry import model_flops, train_flops
    from hiermodel.train import state as state_lib
    from hiermodel.train.loop import mesh_peak_flops, validate
    from hiermodel.sharding import make_mesh, to_global
    from hiermodel.train.step import jit_train_step, optimizer, target_bytes

    mesh = make_mesh(config.mesh)
    validate(config, mesh)
    local_batch = config.train.batch_size // jax.process_count()
    encoder = encoding(config)
    batches = train_dataset(config.data, open_train(config.data, encoder.reads_text), encoder.document, config.seed,
                            local_batch, jax.process_index(), jax.process_count())
    iterator = iter(batches)
    local = [next(iterator) for _ in range(warmup + steps)]
    iterator.close()
    tx = optimizer(config.train, config.model.gate)
    with jax.set_mesh(mesh):
        layout = state_lib.layout(config, tx, mesh)
        state = state_lib.initialize(config, tx, layout)
        step = jit_train_step(layout, tx, config, mesh)
        times = []
        for i, batch in enumerate(local):
            started = time.perf_counter()
            state, metrics = step(state, to_global(batch, mesh))
            jax.block_until_ready(metrics)
            if i >= warmup:
                times.append(time.perf_counter() - started)
    step_bytes = statistics.median(float(target_bytes(b).sum()) for b in local) * jax.process_count()
    shape = (config.model, config.data.row_tokens, config.data.row_words)
    step_flops = config.train.batch_size * train_flops(*shape)
    step_model_flops = config.train.batch_size * model_flops(*shape)
    median = statistics.median(times)
    peak, peak_source = mesh_peak_flops(config, mesh)
    utilisation = {"mfu": step_model_flops / median / peak, "hfu": step_flops / median / peak} if peak else {}
    return {"device": jax.devices()[0].device_kind, "devices": mesh.size, "mesh": dict(mesh.shape),
            "step_seconds": median, "step_seconds_all": times, "bytes_per_step": step_bytes,
            "bytes_per_s": step_bytes / median, "train_flops_per_step": step_flops,
            "model_flops_per_step": step_model_flops, "peak_flops": peak, "peak_source": peak_source, **utilisation}


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", help="write the result here")
    args = p.parse_intermixed_args(argv)

    from hiermodel import config as config_lib
    from hiermodel.errors import UserError

    try:
        config = config_lib.load(args.config, args.overrides)
        if args.steps < 1 or args.warmup < 1:
            raise UserError("--steps and --warmup must be at least 1 (the first step compiles)")
        result = bench(config, args.steps, args.warmup)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    print(f"{args.config}: {result['devices']} x {result['device']}, mesh {result['mesh']}: "
          f"{result['step_seconds'] * 1e3:.1f} ms/step (median of {args.steps}), "
          f"{result['bytes_per_s']:,.0f} bytes/s, "
          + (f"MFU {result['mfu']:.1%}, HFU {result['hfu']:.1%}" if "mfu" in result else result["peak_source"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 2)
