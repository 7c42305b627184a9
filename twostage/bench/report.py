"""Percentiles, the printed table and the JSON report."""

import json
import os
from pathlib import Path

import numpy as np


def percentiles_ms(latencies_s: list[float]) -> dict[str, float]:
    if not latencies_s:
        return {}
    values = np.asarray(latencies_s) * 1000
    return {f"p{p}": round(float(np.percentile(values, p)), 2) for p in (50, 90, 99)} | {
        "max": round(float(values.max()), 2)
    }


def machine() -> dict:
    import onnxruntime

    return {"cpus": os.cpu_count(), "onnxruntime": onnxruntime.__version__}


def print_table(title: str, unit: str, ceiling: float, rows: dict[str, float | str]) -> None:
    print(f"\n{title}")
    print(f"  {'':44} {unit:>10} {'ratio':>7}")
    print(f"  {'ceiling (raw onnxruntime)':44} {ceiling:10.2f} {1.0:7.2f}")
    for name, value in rows.items():
        if isinstance(value, str):
            print(f"  {name:44} {'-':>10} {'-':>7}  {value}")
        else:
            print(f"  {name:44} {value:10.2f} {value / ceiling:7.2f}")


def write_json(path: Path | None, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {path}")
