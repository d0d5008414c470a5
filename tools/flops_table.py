"""Hardware against model FLOPs per training step of configs, as a Markdown table.

    python tools/flops_table.py configs/pods/*.yaml

Hardware FLOPs (batch x train_flops) are what the chips compute: remat's recompute and every
attention pair the kernels evaluate. Model FLOPs (batch x model_flops) leave both out; the
train loop's `hfu` and `mfu` divide the two by the same peak.
"""

import sys
from pathlib import Path


def main(paths: list[str]) -> int:
    from hiermodel import config as config_lib
    from hiermodel.models.registry import forward_flops, model_flops, train_flops

    print("| config | batch rows | row tokens | hardware FLOPs per step | of which remat's recompute and kernels' rescoring "
          "| model FLOPs per step | model / hardware |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for path in paths:
        config = config_lib.load(path, [])
        shape = config.model, config.data.row_tokens, config.data.row_words
        rows = config.train.batch_size
        hardware, model = rows * train_flops(*shape), rows * model_flops(*shape)
        recompute = hardware - 3 * rows * forward_flops(*shape)
        print(f"| `{Path(path).stem}` | {rows} | {config.data.row_tokens} | {hardware:.3e} | {recompute:.3e} "
              f"| {model:.3e} | {model / hardware:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
