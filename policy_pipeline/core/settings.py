"""Configuration read from the environment, with the documented defaults.

Secrets (POLICY_API_KEY, SNOWFLAKE_PASSWORD, ...) are not read here: they reach the resources
as Dagster ``EnvVar`` values so that they are resolved only at run time and never shown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class SettingsError(ValueError):
    pass


def _env_str(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"environment variable {name}={value} must be at least {minimum}")
    return value


def env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"environment variable {name}={raw!r} is not a number") from None
    if value < minimum:
        raise SettingsError(f"environment variable {name}={value} must be at least {minimum}")
    return value


def _resolve(path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else PROJECT_ROOT / candidate


Warehouse = Literal["duckdb", "snowflake"]


@dataclass(frozen=True)
class Settings:
    warehouse: Warehouse
    duckdb_path: Path
    catalog_dir: Path

    @classmethod
    def from_env(cls) -> Settings:
        warehouse = _env_str("POLICY_WAREHOUSE", "duckdb").lower()
        if warehouse not in ("duckdb", "snowflake"):
            raise SettingsError(
                f"environment variable POLICY_WAREHOUSE={warehouse!r} must be "
                "'duckdb' or 'snowflake'"
            )
        return cls(
            warehouse="snowflake" if warehouse == "snowflake" else "duckdb",
            duckdb_path=_resolve(_env_str("POLICY_DUCKDB_PATH", "data/policy_pipeline.duckdb")),
            catalog_dir=_resolve(_env_str("POLICY_CATALOG_DIR", "policies")),
        )
