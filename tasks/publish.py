"""The publish-dataset task: the latest runs under an output root, published as a dataset
(`autoexplain.publish`), with an artifact naming the folder. Bad input fails it with its one line."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from autoexplain.publish import TABLES, publish
from autoexplain.tasks.stages import one_line_failures


@task(name="publish-dataset", persist_result=False)
@one_line_failures
def publish_task(out: str, to: str, layers: list[int] | None, license_: str | None) -> str:
    folder = publish(out, to, layers, license_)
    create_markdown_artifact(f"# Dataset\n\n`{folder}`: {', '.join(TABLES)} (parquet, by source and layer) and "
                             "`README.md`, the dataset card.\n", key="dataset",
                             description="Where the published dataset is")
    return str(folder)
