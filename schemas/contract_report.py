"""What a contract check reports: `ContractReport` (one table against one suite), the exceptions,
and the helpers that both the checking (`schemas.contracts`) and the GX runner (`schemas.contract_gx`)
write report lines with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROWS = "rows"  # the name of a suite's frame of plain table rows (the others come from group_by)


class ContractError(ValueError):
    """A suite that cannot be used: unknown suite, bad derivation, missing parameter."""


@dataclass
class ContractReport:
    """The outcome of validating one table against one suite."""

    suite: str
    success: bool
    n_rows: int
    failures: list[str] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)  # one dict per failed expectation / schema check
    n_expectations: int = 0
    params: dict = field(default_factory=dict)

    def summary(self) -> str:
        if self.success:
            return f"{self.suite}: all {self.n_expectations} expectations hold on {self.n_rows} rows"
        head = f"{self.suite}: {len(self.failures)} failed check(s) on {self.n_rows} rows"
        return "\n".join([head, *("  - " + line for line in self.failures)])

    def to_markdown(self) -> str:
        status = "passed" if self.success else "**FAILED**"
        lines = [f"### Data contract `{self.suite}`: {status}", "",
                 f"{self.n_rows} rows, {self.n_expectations} expectations, {len(self.failures)} failed."]
        if self.params:
            lines += ["", "Parameters: " + ", ".join(f"`{k}={v}`" for k, v in sorted(self.params.items()))]
        if self.failures:
            lines += [""] + [f"- {line}" for line in self.failures]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {"suite": self.suite, "success": self.success, "n_rows": self.n_rows,
                "n_expectations": self.n_expectations, "params": jsonable(self.params),
                "failures": list(self.failures), "details": jsonable(self.details)}

    def __str__(self) -> str:
        return self.summary()


class ContractViolation(Exception):
    """Raised by `check` when a table breaks its contract; `.report` holds the details."""

    def __init__(self, report: ContractReport):
        self.report = report
        super().__init__(report.summary())


def clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
