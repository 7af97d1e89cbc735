"""What an earlier build wrote into a site folder, so that a rebuild writes only the unit files whose
content changed.

After a simulator-prompt edit, most units of a model keep their explanation, scores and
simulations: writing their 92,160 files again was half of a whole model's site rebuild. Each unit
file is known by a digest of everything its bytes follow from (`view._write_units`: the unit's
details, a hash of its simulation rows, its records part's cache key), and by its size. A rebuild
skips a file whose digest and size on disk are what the last build recorded.

The record lives in the build cache area (never in the site folder, which is published as it is),
keyed by the site folder's path (relative to the cache area), this code and the polars release (whose row hashes the digests
use). It is removed as a build starts and written when the build ends: a build that stops half way
leaves none, and the next writes every file.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from autoexplain.identity import code_identity
from autoexplain.storage import content_key
from autoexplain.tables import write_table


class Written:
    """The unit files a site folder holds from its last build: {path in the site: (digest, size)}."""

    def __init__(self, cache_dir: Path, site_dir: Path):
        # relative to the cache, which is in the output root: a site in the root moves with it
        site = os.path.relpath(Path(site_dir).resolve(), Path(cache_dir).resolve())
        self.stem = f"written-{content_key(site, 8)}"
        key = content_key({"site": site, "code": code_identity("autoexplain.view"), "polars": pl.__version__})
        self.path = Path(cache_dir) / f"{self.stem}-{key}.parquet"
        self.before: dict[str, tuple[str, int]] = {}
        if self.path.is_file():
            t = pl.read_parquet(self.path)
            self.before = dict(zip(t["file"].to_list(), zip(t["digest"].to_list(), t["size"].to_list())))
        for old in Path(cache_dir).glob(f"{self.stem}-*.parquet"):
            old.unlink(missing_ok=True)
        self.now: dict[str, tuple[str, int]] = {}
        self.sizes: dict[str, int] = {}  # what is on disk now, per folder read (`look_in`)

    def look_in(self, site_dir: Path, folder: str) -> None:
        """Note the sizes of the files in `folder` (relative to the site) before this build writes there."""
        try:
            with os.scandir(Path(site_dir) / folder) as entries:
                self.sizes.update({f"{folder}/{e.name}": e.stat().st_size for e in entries if e.is_file()})
        except FileNotFoundError:
            pass

    def unchanged(self, file: str, d: str) -> bool:
        """Whether `file` holds what digest `d` stands for; if so it counts as written by this build."""
        was = self.before.get(file)
        if was is None or was[0] != d or self.sizes.get(file) != was[1]:
            return False
        self.now[file] = was
        return True

    def wrote(self, file: str, d: str, size: int) -> None:
        self.now[file] = (d, size)

    def save(self) -> None:
        if not self.now:
            return
        files = sorted(self.now)
        table = pl.DataFrame({"file": files, "digest": [self.now[f][0] for f in files],
                              "size": pl.Series([self.now[f][1] for f in files], dtype=pl.Int64)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_table(table.to_arrow(), self.path)
