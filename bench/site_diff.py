"""Whether two viewer sites show the same thing: every file byte for byte, except the unit files
(the JSON inside their gzip, byte for byte: the compressed bytes may differ) and `data/site.js`
(without its build time). Exits non-zero at the first difference, naming the file.

    python bench/site_diff.py SITE_A SITE_B [--skip plots/llm_vs_baselines.png ...]
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import sys
from pathlib import Path


def _data(raw: bytes):
    return json.loads(raw.split(b"]=", 1)[1].rstrip(b";\n"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--skip", nargs="*", default=[], help="files (relative to the site) not compared")
    args = ap.parse_args()
    names = [sorted(str(p.relative_to(d)) for d in (site,) for p in d.rglob("*") if p.is_file()) for site in (args.a, args.b)]
    if names[0] != names[1]:
        sys.exit(f"the sites hold different files: {sorted(set(names[0]) ^ set(names[1]))[:10]}")
    same = decoded = 0
    for name in names[0]:
        if name in args.skip:
            continue
        x, y = (args.a / name).read_bytes(), (args.b / name).read_bytes()
        if x == y:
            same += 1
        elif Path(name).parent.name == "u":
            if gzip.decompress(base64.b64decode(_data(x)["z"])) != gzip.decompress(base64.b64decode(_data(y)["z"])):
                sys.exit(f"{name}: the units differ")
            decoded += 1
        elif name == "data/site.js":
            dx, dy = _data(x), _data(y)
            for d in (dx, dy):
                d.pop("built"), d.pop("build_seconds")
            if dx != dy:
                sys.exit("data/site.js: the sites' data differ")
        else:
            sys.exit(f"{name} differs")
    print(f"{len(names[0])} files: {same} the same bytes, {decoded} unit files the same once decompressed, "
          f"site.js the same but for its build time; not compared: {args.skip or 'none'}")


if __name__ == "__main__":
    main()
