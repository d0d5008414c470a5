"""Write documents from text files, directories, globs or JSONL to ArrayRecord shards.

    python tools/write_arrayrecord.py --output DIR [--shards N] [--separator SEP] [--jsonl-field F] INPUT...
"""

import argparse
import sys

from hiermodel.data.shards import write_shards
from hiermodel.data.sources import DocumentSource
from hiermodel.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--output", required=True)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--separator", default="", help="split text files into documents on this string")
    p.add_argument("--jsonl-field", default="text")
    args = p.parse_args(argv)
    try:
        if args.shards < 1:
            raise UserError("--shards must be at least 1")
        source = DocumentSource(args.inputs, args.separator, args.jsonl_field)
        paths, count = write_shards(source, args.output, args.shards)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} documents to {len(paths)} shards in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
