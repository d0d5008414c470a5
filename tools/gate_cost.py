"""Where a byte-level delete gate's cost comes from: the gated run and a run without a gate are
scored on the same held-out bytes, and the difference in bits is split by whether the gate
deleted the predicting position (its prediction then lacks the layers after the gate) and by
what the predicted byte is (whitespace, a word's first byte, a later byte of a word), and again
by whether copying could predict it (the byte and the bytes before it occurred earlier in the
attention window: what an induction head finds). It also gives the gate values G of the kept
positions: the gated layers add G to those keys' logits (unless model.gate.straight_through), so a
kept position near k / 2 is computed but hardly seen. The difference's standard error over the
held-out bytes (a bootstrap over blocks of consecutive bytes) says how much of it the sample alone
could make; either run may be any model scoring the same bytes (a learned gate against random
deletion, say).

    python tools/gate_cost.py GATED_RUN BASE_RUN [--output FILE.json]
"""

import argparse
import json
import sys

import numpy as np

from hiermodel.errors import UserError

CLASSES = ("whitespace", "word start", "in word")
_SPACE = np.zeros(256 + 8, bool)
_SPACE[[0x20, 0x0A, 0x09, 0x0D]] = True


def byte_classes(tokens_BxT) -> np.ndarray:
    """Class of each position's target byte (token t+1): 0 whitespace, 1 the first byte after
    whitespace, 2 any later byte of a word; [B, T]."""
    tokens_BxT = np.minimum(tokens_BxT, len(_SPACE) - 1)
    target_BxT = np.pad(tokens_BxT[:, 1:], ((0, 0), (0, 1)))
    space_now_BxT, space_next_BxT = _SPACE[tokens_BxT], _SPACE[target_BxT]
    return np.where(space_next_BxT, 0, np.where(space_now_BxT, 1, 2))


REPEAT_CLASSES = ("novel", "repeated")
# A byte counts as repeated when it and this many bytes before it occurred earlier in the window.
REPEAT_CONTEXT = 6


def repeated_in_window(tokens_BxT, window: int, context: int = REPEAT_CONTEXT) -> np.ndarray:
    """1 where position t's target (token t+1) ends a run of context + 1 tokens that already
    occurred ending at some earlier target within `window` positions (0: the whole row), else 0;
    [B, T]. Copying the earlier occurrence's next token would predict it."""
    b, t = tokens_BxT.shape
    out = np.zeros((b, t), np.int64)
    for row in range(b):
        seen = {}
        tokens = tokens_BxT[row].tolist()
        for pos in range(context, t - 1):
            gram = tuple(tokens[pos - context:pos + 2])
            earlier = seen.get(gram)
            out[row, pos] = earlier is not None and (not window or pos - earlier < window)
            seen[gram] = pos
    return out


def _per_position(run_dir: str):
    """Per scored position of the held-out split: bits, (deleted, gate values, k) or None without a
    gate, target class, repeated."""
    import jax

    from hiermodel.data.pipeline import scoring_batches
    from hiermodel.data.sources import open_split
    from hiermodel.eval.score import make_score_fn
    from hiermodel.run import encoding, load_params
    from hiermodel.sharding import process_slice, to_global, to_host

    config, mesh, graphdef, params = load_params(run_dir)
    if config.model.kind != "byte":
        raise UserError(f"{run_dir}: model.kind={config.model.kind}; this split is for the byte model's gate")
    bits, deleted, gate_values, classes, repeated = [], [], [], [], []
    with jax.set_mesh(mesh):
        score_fn = make_score_fn(graphdef, config.model.compute_dtype, mesh,
                                 jax.tree.map(lambda p: p.sharding, params), "hard")
        encoder = encoding(config)
        source = open_split(config.data, "eval", text=encoder.reads_text)
        for batch in scoring_batches(config.data, source, encoder.document, config.train.batch_size):
            scores = score_fn(params, to_global(process_slice(batch), mesh))
            scored = batch["loss_mask"] > 0
            bits.append(to_host(scores["bits"])[scored])
            classes.append(byte_classes(batch["tokens"])[scored])
            repeated.append(repeated_in_window(batch["tokens"], config.model.byte_window)[scored])
            if "deleted" in scores:
                deleted.append(to_host(scores["deleted"])[scored])
                gate_values.append(to_host(scores["gates"])[scored])
    gated = (np.concatenate(deleted), np.concatenate(gate_values), config.model.gate.k) if deleted else None
    return np.concatenate(bits), gated, np.concatenate(classes), np.concatenate(repeated)


def kept_gate_values(gate_values, deleted, k: float) -> dict:
    """Quantiles (5, 25, 50, 75, 95%) of the kept positions' gate values, and the share of kept
    positions below k / 4, whose keys the gated layers see at under e^(k/4) of their weight."""
    kept = gate_values[~deleted]
    return {"quantiles": np.percentile(kept, [5, 25, 50, 75, 95]).tolist(), "hidden": float((kept < k / 4).mean())}


def split_cost(gated_bits, base_bits, deleted, classes, names=CLASSES) -> list[dict]:
    """Rows per (class, deleted or kept): share of bytes, bits per byte of either run, and the
    share of the whole difference in bits that the row accounts for."""
    total = float(gated_bits.sum() - base_bits.sum())
    rows = []
    for c, name in enumerate(names):
        for was_deleted in (False, True):
            where = (classes == c) & (deleted == was_deleted)
            n = int(where.sum())
            if not n:
                continue
            extra = float(gated_bits[where].sum() - base_bits[where].sum())
            rows.append({"class": name, "position": "deleted" if was_deleted else "kept", "bytes": n,
                         "share": n / len(classes), "bpb_base": float(base_bits[where].mean()),
                         "bpb_gated": float(gated_bits[where].mean()), "extra_bits_per_byte": extra / len(classes),
                         "share_of_cost": extra / total if total else float("nan")})
    return rows


def difference_standard_error(gated_bits, base_bits, block: int = 256, draws: int = 2000) -> float:
    """Standard error, in bits per byte, of the mean difference over the scored bytes: a bootstrap
    over blocks of `block` consecutive bytes, since neighbouring bytes' differences correlate."""
    diff = (gated_bits - base_bits)[: len(gated_bits) // block * block].reshape(-1, block).mean(axis=1)
    picks = np.random.default_rng(0).integers(0, len(diff), (draws, len(diff)))
    return float(diff[picks].mean(axis=1).std())


def markdown(rows: list[dict], gated_bits, base_bits, error: float, heading: str = "predicted byte") -> str:
    lines = [f"bpb without gate {base_bits.mean():.4f}, gated {gated_bits.mean():.4f} "
             f"({gated_bits.mean() / base_bits.mean() - 1:+.2%}; difference's standard error over these bytes "
             f"{error:.4f}) on {len(base_bits):,} bytes", "",
             f"| {heading} | predicting position | share of bytes | bpb without gate | bpb gated | "
             "extra bits per byte (of all bytes) | share of the cost |", "|---" * 7 + "|"]
    for r in rows:
        lines.append(f"| {r['class']} | {r['position']} | {r['share']:.1%} | {r['bpb_base']:.3f} | "
                     f"{r['bpb_gated']:.3f} | {r['extra_bits_per_byte']:+.4f} | {r['share_of_cost']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gated_run")
    p.add_argument("base_run")
    p.add_argument("--output", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    try:
        gated_bits, gated, classes, repeated = _per_position(args.gated_run)
        base_bits, _, base_classes, _ = _per_position(args.base_run)
        if gated is None:
            raise UserError(f"{args.gated_run}: the model has no delete gate")
        deleted, gate_values, k = gated
        if len(base_bits) != len(gated_bits) or not np.array_equal(classes, base_classes):
            raise UserError(f"{args.gated_run} and {args.base_run} do not score the same held-out bytes")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = split_cost(gated_bits, base_bits, deleted, classes)
    repeat_rows = split_cost(gated_bits, base_bits, deleted, repeated, REPEAT_CLASSES)
    kept = kept_gate_values(gate_values, deleted, k)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"by_byte": rows, "by_repetition": repeat_rows, "kept_gate_values": kept}, f, indent=2)
    error = difference_standard_error(gated_bits, base_bits)
    print(markdown(rows, gated_bits, base_bits, error))
    print(markdown(repeat_rows, gated_bits, base_bits, error, f"predicted byte (repeated: with its {REPEAT_CONTEXT} "
                                                        "bytes before, earlier in the window)"))
    print("kept positions' gate values G, 5/25/50/75/95% quantiles: "
          + " / ".join(f"{q:.1f}" for q in kept["quantiles"])
          + f"; {kept['hidden']:.0%} below k/4 = {k / 4:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
