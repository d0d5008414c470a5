"""Whether a learned delete gate's held-out deletion misses its target because of where its
threshold sits. The gate deletes where its score plus bias is below 0; when most scores lie near
that point, the last training steps' bias sets the rate. This moves the bias so that the gate
deletes `target` of the positions of N training batches (read as in training, with another
seed: no held-out text decides it; what model.gate.calibrate does after training) and scores the
held-out split with hard deletion before and after. A run trained with model.gate.calibrate
reads as calibrated already (a change near 0).

    python tools/gate_calibrate.py RUN [RUN ...] [--batches 16] [--output FILE.json]
"""

import argparse
import itertools
import json
import sys

import numpy as np

from hiermodel.errors import UserError
from hiermodel.train import calibrate as calibration


def calibrate(run_dir: str, batches: int = 16) -> dict:
    """The bias change from `batches` training batches (as model.gate.calibrate does after training),
    the rates on them before and after, and the held-out hard scores before and after."""
    import jax

    from hiermodel.data.pipeline import train_dataset
    from hiermodel.data.sources import open_split
    from hiermodel.eval.score import make_score_fn, score_source
    from hiermodel.run import encoding, load_params
    from hiermodel.train.loop import CALIBRATION_SEED

    config, mesh, graphdef, params = load_params(run_dir)
    gate = config.model.gate
    if not gate.layer or gate.mode != "learned":
        raise UserError(f"{run_dir}: no learned delete gate (model.gate.layer={gate.layer}, mode={gate.mode})")
    with jax.set_mesh(mesh):
        encoder = encoding(config)
        shardings = jax.tree.map(lambda p: p.sharding, params)
        soft = make_score_fn(graphdef, config.model.compute_dtype, mesh, shardings, "soft")
        hard = make_score_fn(graphdef, config.model.compute_dtype, mesh, shardings, "hard")
        train = train_dataset(config.data, open_split(config.data, "train", text=encoder.reads_text), encoder.document,
                              config.seed + CALIBRATION_SEED, config.train.batch_size)
        margins_N = calibration.gate_margins(soft, params, itertools.islice(iter(train), batches), gate.k)
        change = calibration.bias_change(margins_N, gate.target)

        def held_out(p):
            return score_source(hard, p, open_split(config.data, "eval", text=encoder.reads_text), encoder.document,
                                config.data, config.train.batch_size, mesh)

        before, after = held_out(params), held_out(calibration.shift_gate_bias(params, change))
    return {"run_dir": run_dir, "target": gate.target, "change": change, "positions": int(margins_N.size),
            "train_deleted": calibration.deleted_share(margins_N),
            "train_deleted_calibrated": calibration.deleted_share(margins_N, change),
            "near_threshold": float(np.mean(np.abs(1 / (1 + np.exp(margins_N)) - 0.5) < 0.1)),
            "held_out": before, "held_out_calibrated": after}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--batches", type=int, default=16, help="training batches that set the shift")
    p.add_argument("--output", help="write the results as JSON")
    args = p.parse_args(argv)
    results = []
    try:
        for run in args.runs:
            r = calibrate(run, args.batches)
            results.append(r)
            print(f"{run}: bias moved by {r['change']:+.3f} ({r['near_threshold']:.0%} of G within 0.1 k of k/2); "
                  f"deleted in training batches {r['train_deleted']:.1%} -> {r['train_deleted_calibrated']:.1%}; "
                  f"held out {r['held_out']['deletion_rate']:.1%}, {r['held_out']['bpb']:.4f} bpb -> "
                  f"{r['held_out_calibrated']['deletion_rate']:.1%}, {r['held_out_calibrated']['bpb']:.4f} bpb",
                  flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
