"""The nightly re-score's comparison: the new scores against the previous ones, as artifacts."""

from __future__ import annotations

import polars as pl
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from autoexplain.summary import compare, compare_markdown
from autoexplain.tasks.stages import local_ref


def _scores(refs: list[dict]) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(local_ref(r)["path"]) for r in refs]) if refs else pl.DataFrame()


@task(name="compare", persist_result=False)
def compare_task(before: list[dict], after: list[dict], title: str) -> dict:
    """Pairs every unit's headline score before and after; a markdown report and a table of the
    units that moved most."""
    result = compare(_scores(before), _scores(after))
    create_markdown_artifact(compare_markdown(result, title), key="rescore-comparison",
                             description="Mean change of the headline score with its 95% CI, and the units that moved most")
    if result["moved"]:
        create_table_artifact(result["moved"], key="rescore-moved", description="Units whose score moved most")
    return result
