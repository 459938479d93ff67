"""Every example accounted for: per-task tables of what was analysed, what was skipped, and why."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

#: Columns of :func:`example_table`.
EXAMPLE_COLUMNS = ("task", "examples", "not encodable", "answered correctly", "accuracy", "kept", "skipped flows")


def accuracy_table(status: pd.DataFrame) -> pd.DataFrame:
    """Per task: examples, correctly answered (kept by the paper's filter), accuracy."""
    table = status.groupby("task").correct.agg(examples="size", kept="sum")
    table["accuracy"] = table.kept / table.examples
    return table


def _skipped(part: pd.DataFrame) -> str:
    if "skipped_flows" not in part:
        return ""
    counts = part.skipped_flows.explode().dropna().value_counts()
    return "; ".join(f"{flow}: {n} (empty group)" for flow, n in counts.items())


def example_table(status: pd.DataFrame, rows: pd.DataFrame, tasks: Sequence[str] | None = None) -> pd.DataFrame:
    """Per task: examples, not encodable (with the reason in ``status.error``), answered correctly, accuracy,
    kept (analysed), and the flows skipped because their group was empty, with counts.

    Args:
        status: one row per example (from :meth:`~mmflow.runs.Run.knockout` or :meth:`~mmflow.runs.Run.lens`).
        rows: the analysis rows (``example_id`` and ``task`` columns).
        tasks: tasks to list even if they have no example, in this order (default: those in ``status``).

    Example:
        >>> status = pd.DataFrame({"example_id": ["a", "b", "c"], "task": ["T", "T", "U"],
        ...                        "correct": [True, False, False], "error": [None, None, "bad row"],
        ...                        "skipped_flows": [["F"], [], []]})
        >>> example_table(status, pd.DataFrame({"example_id": ["a"], "task": ["T"]}), ["T", "U", "V"]).kept.tolist()
        [1, 0, 0]
    """
    tasks = list(dict.fromkeys(tasks if tasks is not None else status.task))
    kept = rows.groupby("task").example_id.nunique() if len(rows) else pd.Series(dtype=int)
    out = []
    for task in tasks:
        part = status[status.task == task]
        n = len(part)
        correct = int(part.correct.astype(bool).sum())
        errors = int(part.error.notna().sum()) if "error" in part else 0
        out.append(
            {
                "task": task,
                "examples": n,
                "not encodable": errors,
                "answered correctly": correct,
                "accuracy": round(correct / n, 4) if n else float("nan"),
                "kept": int(kept.get(task, 0)),
                "skipped flows": _skipped(part[part.example_id.isin(rows.example_id)] if len(rows) else part[:0]),
            }
        )
    return pd.DataFrame(out, columns=list(EXAMPLE_COLUMNS))


def wrong_answers(status: pd.DataFrame, n: int = 5) -> pd.DataFrame:
    """A sample of the examples the model answered wrongly, and of those that could not be encoded (with why)."""
    columns = [c for c in ("example_id", "task", "source", "question", "answer", "predicted", "error") if c in status]
    return status[~status.correct.astype(bool)][columns].head(n)
