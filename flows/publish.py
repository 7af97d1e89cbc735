"""Flow `publish-dataset`: the latest runs under an output root, published as a dataset that others
load (`autoexplain.publish`), as one task whose result names the folder. Bad input ends the run in
its first second as a Failed state whose message is one line."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from autoexplain.errors import UserError
from autoexplain.publish import TABLES, publish


@task(name="publish-dataset", persist_result=False)
def publish_task(out: str, to: str, layers: list[int] | None, license_: str | None) -> str:
    folder = publish(out, to, layers, license_)
    create_markdown_artifact(f"# Dataset\n\n`{folder}`: {', '.join(TABLES)} (parquet, by source and layer) and "
                             "`README.md`, the dataset card.\n", key="dataset",
                             description="Where the published dataset is")
    return str(folder)


@flow(name="publish-dataset", validate_parameters=True)
def publish_dataset(out: str = "out", to: str = "dataset", layers: list[int] | None = None,
                    license: str | None = None):  # noqa: A002 - the card's field, as users name it
    try:
        return publish_task(out, to, layers, license)
    except UserError as e:
        return Failed(message=str(e), data=e)
