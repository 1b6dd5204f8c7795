"""How the benchmarks print their figures: a JSON object for scripts, or aligned lines."""

from __future__ import annotations

import json


def print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        width = max(map(len, report)) + 2
        for key, value in report.items():
            print(f"{key:{width}s} {value}")
