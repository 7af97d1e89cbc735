"""Flow `publish-dataset`: the latest runs under an output root, published as a dataset that others
load (`autoexplain.publish`), as one task whose result names the folder. Bad input ends the run in
its first second as a Failed state whose message is one line, and the run log says that line, not
a traceback."""

from __future__ import annotations

from prefect import flow
from prefect.states import Failed

from autoexplain.errors import UserError
from autoexplain.tasks.publish import publish_task


@flow(name="publish-dataset", validate_parameters=True)
def publish_dataset(out: str = "out", to: str = "dataset", layers: list[int] | None = None,
                    license: str | None = None):  # noqa: A002 - the card's field, as users name it
    try:
        # a body that returns a Failed state hands it back as the call's value: `result()` raises its error
        return publish_task(out, to, layers, license, return_state=True).result()
    except UserError as e:  # the task failed with its one line (`one_line_failures`)
        return Failed(message=str(e), data=e)
