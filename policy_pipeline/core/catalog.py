"""The policy catalog: one YAML file per policy, validated as a whole before anything runs."""

from __future__ import annotations

import os
import stat as stat_mode
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from policy_pipeline.core.domain import PolicyDefinition

CATALOG_SUFFIXES = (".yaml", ".yml")
# A policy is a few fields; the caps refuse hostile files before they cost memory or crash the
# parser. 1 MiB leaves room for a large parameters block.
MAX_FILE_BYTES = 1024 * 1024
# Containers inside containers, the document's own mapping counting as 1. libyaml's composer
# recurses once per level and crashes the process (no exception) past some ten thousand.
MAX_NESTING_DEPTH = 32

if TYPE_CHECKING:
    _BaseLoader = yaml.SafeLoader
else:
    # libyaml's safe loader when present: five times faster, which matters to a sensor tick
    # over thousands of files.
    _BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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


class _DuplicateKey(yaml.YAMLError):
    pass


class _CatalogLoader(_BaseLoader):
    """The safe loader, refusing a key written twice in one mapping: YAML keeps the last value
    without a word, so an edit lower in the file would silently win."""

    def construct_document(self, node: yaml.Node) -> Any:
        # Checked on the node tree before construction, while each mapping still holds only
        # the keys written in it: the merge key '<<' adds keys that explicit ones may override.
        self._refuse_duplicate_keys(node)
        return super().construct_document(node)

    def _refuse_duplicate_keys(self, root: yaml.Node) -> None:
        # Iterative, and each node visited once: aliases make the tree a graph, maybe cyclic.
        stack: list[tuple[yaml.Node, str]] = [(root, "")]
        seen: set[int] = set()
        while stack:
            node, path = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            prefix = f"{path}." if path else ""
            if isinstance(node, yaml.SequenceNode):
                stack.extend((item, f"{prefix}{i}") for i, item in enumerate(node.value))
            elif isinstance(node, yaml.MappingNode):
                lines: dict[Any, int] = {}
                for key_node, value_node in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key: Any = "?"  # a complex key: refused later, unhashable or not JSON
                    if isinstance(key_node, yaml.ScalarNode):
                        # Compared as constructed: '1' and '0x1', or 'true' and 'yes', are one
                        # key. Construction is cached, so the document reuses these objects.
                        key = self.construct_object(key_node, deep=True)
                        line = key_node.start_mark.line + 1
                        if key in lines:
                            where = (
                                f"line {line}"
                                if lines[key] == line
                                else f"lines {lines[key]} and {line}"
                            )
                            raise _DuplicateKey(f"field '{prefix}{key}': written twice ({where})")
                        lines[key] = line
                    stack.append((value_node, f"{prefix}{key}"))


def _catalog_files(catalog_dir: Path) -> Iterator[Path]:
    """Every visible entry named like a catalog file, including bad ones (a broken symbolic
    link, a directory, an upper-case suffix): they are reported, not skipped."""
    for path in sorted(catalog_dir.iterdir()):
        if path.suffix.lower() in CATALOG_SUFFIXES and not path.name.startswith("."):
            yield path


def _check_name(path: Path) -> None:
    if path.suffix not in CATALOG_SUFFIXES:
        raise CatalogError(
            f"{path}: catalog file suffixes are lower-case '.yaml' or '.yml': "
            f"name it '{path.stem}{path.suffix.lower()}'"
        )


def _stat(path: Path) -> os.stat_result:
    """The file's status, refusing what is not a regular file of a sane size. Checked before
    opening: opening a FIFO would block, and a size is cheaper to check than to parse."""
    try:
        status = path.stat()
    except OSError as exc:
        if path.is_symlink():
            raise CatalogError(
                f"{path}: is a broken symbolic link (to '{os.readlink(path)}': {exc.strerror})"
            ) from None
        raise CatalogError(f"{path}: cannot be read: {exc.strerror}") from None
    if not stat_mode.S_ISREG(status.st_mode):
        raise CatalogError(f"{path}: is not a regular file")
    if status.st_size > MAX_FILE_BYTES:
        raise CatalogError(f"{path}: {status.st_size} bytes, over the {MAX_FILE_BYTES} allowed")
    return status


def _check_nesting(path: Path, text: str) -> None:
    """Refuse a document nested deeper than MAX_NESTING_DEPTH before it is composed. The event
    parser (libyaml's or PyYAML's) keeps its state on the heap, so a hostile depth cannot crash
    it, and stopping at the first event past the cap keeps the check cheap."""
    depth = 0
    for event in yaml.parse(text, Loader=_BaseLoader):
        if isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            depth += 1
            if depth > MAX_NESTING_DEPTH:
                mark = event.start_mark
                where = f" (line {mark.line + 1})" if mark is not None else ""
                raise CatalogError(f"{path}: nested deeper than {MAX_NESTING_DEPTH} levels{where}")
        elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
            depth -= 1


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(document)"
        problems.append(f"field '{field}': {item['msg']}")
    return "; ".join(problems)


def parse_policy_file(path: Path) -> PolicyDefinition:
    return _parse(path, _stat(path))


def _parse(path: Path, status: os.stat_result) -> PolicyDefinition:
    try:
        with path.open(encoding="utf-8") as file:
            # Bounded: the file may have grown since it was checked.
            text = file.read(MAX_FILE_BYTES + 1)
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise CatalogError(f"{path}: cannot be read: {exc.strerror}") from None
    if len(text) > MAX_FILE_BYTES:
        raise CatalogError(f"{path}: over the {MAX_FILE_BYTES} bytes allowed")
    try:
        _check_nesting(path, text)
        document = yaml.load(text, Loader=_CatalogLoader)
    except _DuplicateKey as exc:
        raise CatalogError(f"{path}: {exc}") from None
    except CatalogError:  # a ValueError, not to be reported as invalid YAML
        raise
    # ValueError: an integer of more than 4,300 digits, refused by int() itself.
    except (yaml.YAMLError, ValueError) as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from None
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
            _check_name(path)
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
    status = _stat(path)
    key = (status.st_ino, status.st_mtime_ns, status.st_size)
    with _parsed_lock:
        cached = _parsed.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    policy = _parse(path, status)  # a bad file is not cached: it is reported every time
    with _parsed_lock:
        _parsed[path] = (key, policy)
    return policy
