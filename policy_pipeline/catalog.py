"""The policy catalog: one YAML file per policy, validated as a whole before anything runs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from policy_pipeline.domain import PolicyDefinition

CATALOG_SUFFIXES = (".yaml", ".yml")
# libyaml's safe loader when present: five times faster, which matters to a sensor tick over
# thousands of files.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# Parsed files by path, with the (inode, mtime, size) they were parsed at. The sensor's code
# server is long-lived, so an unchanged catalog costs a directory listing and a stat per file.
_FileKey = tuple[int, int, int]
_parsed: dict[Path, tuple[_FileKey, PolicyDefinition]] = {}
_parsed_lock = threading.Lock()


class CatalogError(ValueError):
    """A catalog file is unreadable or invalid. The message names the file and the field."""


@dataclass(frozen=True)
class CatalogEntry:
    path: Path
    policy: PolicyDefinition


def _catalog_files(catalog_dir: Path) -> Iterator[Path]:
    for path in sorted(catalog_dir.iterdir()):
        if path.is_file() and path.suffix in CATALOG_SUFFIXES and not path.name.startswith("."):
            yield path


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(document)"
        problems.append(f"field '{field}': {item['msg']}")
    return "; ".join(problems)


def parse_policy_file(path: Path) -> PolicyDefinition:
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=_SAFE_LOADER)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise CatalogError(f"{path}: cannot be read: {exc.strerror}") from None
    if not isinstance(document, dict):
        raise CatalogError(
            f"{path}: expected a mapping of policy fields, got {type(document).__name__}"
        )
    try:
        return PolicyDefinition.model_validate(document)
    except ValidationError as exc:
        raise CatalogError(f"{path}: {_describe(exc)}") from None


def load_catalog(catalog_dir: Path) -> dict[str, CatalogEntry]:
    """Every policy in the catalog by name. Raises CatalogError for the whole catalog if one
    file is bad, so that no run starts on a half-valid catalog."""
    if not catalog_dir.is_dir():
        raise CatalogError(f"{catalog_dir}: policy catalog directory does not exist")
    entries: dict[str, CatalogEntry] = {}
    errors: list[str] = []
    for path in _catalog_files(catalog_dir):
        try:
            policy = _parse_cached(path)
        except CatalogError as exc:
            errors.append(str(exc))
            continue
        if policy.policy_name in entries:
            first = entries[policy.policy_name].path
            errors.append(
                f"{path}: field 'policy_name': duplicate value '{policy.policy_name}' "
                f"(already defined in {first})"
            )
            continue
        entries[policy.policy_name] = CatalogEntry(path=path, policy=policy)
    if errors:
        raise CatalogError("invalid policy catalog:\n" + "\n".join(errors))
    return entries


def _parse_cached(path: Path) -> PolicyDefinition:
    """``parse_policy_file``, skipped when the file is unchanged since it was last parsed."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot be read: {exc.strerror}") from None
    key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    with _parsed_lock:
        cached = _parsed.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    policy = parse_policy_file(path)  # a bad file is not cached: it is reported every time
    with _parsed_lock:
        _parsed[path] = (key, policy)
    return policy
