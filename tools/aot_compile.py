"""Compile a config's real train step for a pod on this machine, and report whether it fits.

    python tools/aot_compile.py CONFIG --target v5p-128 [--target v6e-256 ...] [key=value ...]

A target is a Cloud TPU slice (v5p-128, v6e-256, ...; needs libtpu: pip install 'hiermodel[tpu]'),
a libtpu topology (v5p:4x4x4), or cpu:N (N fake CPU devices: exact buffers, indicative
temporaries; how GPU meshes are checked without GPUs). Prints one line per target, and with
--json FILE writes the reports.
"""

import argparse
import json
import os
import sys
import time


def _fake_cpu_devices(targets: list[str]) -> None:
    """cpu:N targets need N devices, which must be asked for before JAX starts."""
    counts = [int(t[4:]) for t in targets if t.startswith("cpu:")]
    if counts and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={max(counts)}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: never initialise an attached TPU


def _gib(n) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--target", action="append", required=True)
    p.add_argument("--json", help="write the reports here")
    args = p.parse_intermixed_args(argv)
    _fake_cpu_devices(args.target)

    from hiermodel import config as config_lib
    from hiermodel.errors import UserError
    from hiermodel.train.aot import compile_report, target_devices

    reports = {}
    try:
        config = config_lib.load(args.config, args.overrides)
        for target in args.target:
            started = time.monotonic()
            r = compile_report(config, target_devices(target))
            r["compile_seconds"] = time.monotonic() - started
            reports[target] = r
            if "error" in r:
                print(f"{target}: {r['devices']} x {r['device_kind']}, mesh {r['mesh']}: DOES NOT FIT ({r['error']})",
                      flush=True)
                continue
            verdict = {True: "fits", False: "DOES NOT FIT", None: "capacity unknown"}[r["fits"]]
            print(f"{target}: {r['devices']} x {r['device_kind']}, mesh {r['mesh']}, {r['batch_rows']} rows of "
                  f"{r['row_tokens']} in {r['grad_accum']} microbatches: per device {_gib(r['peak_bytes'])} peak of {_gib(r['device_memory_bytes'])} "
                  f"({verdict}; state+batch {_gib(r['arguments_bytes'])}, temporaries "
                  f"{_gib(r['temporaries_bytes'])}); {r['train_flops_per_device']:.3e} hardware "
                  f"({r['model_flops_per_device']:.3e} model) FLOPs per device per step; the compiler's cost "
                  f"model: {r['compiler_flops'] or 0:.3e} FLOPs, {r['bytes_accessed'] or 0:.3e} bytes accessed; "
                  f"compiled in {r['compile_seconds']:.0f}s", flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
