"""Hostile catalog files: values that are not JSON, nesting that crashes libyaml, oversized
files, and files that used to be skipped or half-read without a word. Each is refused with a
message naming the file (and the field), and valid catalogs keep their content hashes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from policy_pipeline.core.catalog import (
    MAX_FILE_BYTES,
    MAX_NESTING_DEPTH,
    CatalogError,
    load_catalog,
)
from policy_pipeline.core.domain import PolicyDefinition
from policy_pipeline.core.settings import PROJECT_ROOT

VALID = "policy_name: {name}\npolicy_type: t\ndescription: d\npriority: low\n"

# Hashes computed with the code before parameters were restricted to JSON values: a valid
# catalog must keep them, or every policy would look changed to the sensor.
SHIPPED_HASHES = {
    "customer_data_retention": "8759f6cec1c1f069fd7901d2f1f8cd02",
    "pii_access_review": "315d07636cca4537e6f745eb55b78c68",
    "stale_table_cleanup": "9a7f223a7251b42027c0cf8330e248df",
}
RICH = """\
policy_name: rich
policy_type: "réglage"
description: "Ünïcødé 🚀 and \\"quotes\\" and tab\\tinside"
priority: medium
parameters:
  zeta: [1, 2.5, -0.0, 1e10, true, false, null, "x"]
  alpha:
    nested: {b: 1, a: [{}, []], "ключ": "значение"}
  big: 12345678901234567890
"""
RICH_HASH = "5562d5049c966e07e7ed5fb35c5ca3ad"


def _catalog(tmp_path: Path, files: dict[str, str]) -> Path:
    directory = tmp_path / "catalog"
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def _refused(directory: Path) -> str:
    with pytest.raises(CatalogError) as error:
        load_catalog(directory)
    return str(error.value)


# --- content hash ----------------------------------------------------------------------------


def test_valid_catalogs_keep_their_content_hashes(tmp_path: Path) -> None:
    shipped = load_catalog(PROJECT_ROOT / "policies")
    assert {name: e.policy.content_hash() for name, e in shipped.items()} == SHIPPED_HASHES
    [rich] = load_catalog(_catalog(tmp_path, {"rich.yaml": RICH})).values()
    assert rich.policy.content_hash() == RICH_HASH


def test_content_hash_does_not_depend_on_how_non_ascii_is_written(tmp_path: Path) -> None:
    literal = VALID.format(name="a").replace("description: d", 'description: "Zürich ☃"')
    escaped = VALID.format(name="b").replace(
        "description: d", 'description: "Z\\u00fcrich \\u2603"'
    )
    catalog = load_catalog(_catalog(tmp_path, {"a.yaml": literal, "b.yaml": escaped}))
    a, b = catalog["a"].policy, catalog["b"].policy
    assert a.description == b.description == "Zürich ☃"
    assert a.model_copy(update={"policy_name": "b"}).content_hash() == b.content_hash()


_HASH_IN_A_PROCESS = """
import sys
from pathlib import Path
from policy_pipeline.core.catalog import load_catalog
for name, entry in sorted(load_catalog(Path(sys.argv[1])).items()):
    print(name, entry.policy.content_hash())
"""


def test_content_hash_is_the_same_in_every_process(tmp_path: Path) -> None:
    keys = "\n".join(f"  key_{i}: [v{i}, {i}, {{nested_{i}: {i}.5}}]" for i in range(50))
    directory = _catalog(tmp_path, {"p.yaml": VALID.format(name="p") + "parameters:\n" + keys})
    outputs = set()
    for seed in ("0", "1", "12345"):
        done = subprocess.run(
            [sys.executable, "-c", _HASH_IN_A_PROCESS, str(directory)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        outputs.add(done.stdout)
    assert outputs == {f"p {load_catalog(directory)['p'].policy.content_hash()}\n"}


# --- parameters are JSON values --------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (
            "retention:\n    days: !!set {a, b, c}",
            "field 'parameters.retention.days': a set is not a JSON value",
        ),
        ("pairs: !!omap [a: 1, b: 2]", "field 'parameters.pairs.0': a tuple is not a JSON value"),
        ("blob: !!binary aGVsbG8=", "field 'parameters.blob': binary data is not a JSON value"),
        (
            "retention:\n    days: 2024-01-01",
            "field 'parameters.retention.days': a date (2024-01-01) is not a JSON value: quote it",
        ),
        ("at: 2024-01-01 10:00:00", "field 'parameters.at': a datetime (2024-01-01 10:00:00)"),
        ("ratio: [1, .nan]", "field 'parameters.ratio.1': nan is not a JSON number"),
        ("ratio: -.inf", "field 'parameters.ratio': -inf is not a JSON number"),
        ("by_day:\n    1: x", "field 'parameters.by_day': key 1 is not a string"),
        ("true: x", "field 'parameters': key True is not a string"),
    ],
)
def test_parameters_that_are_not_json_are_refused(
    tmp_path: Path, parameters: str, expected: str
) -> None:
    text = VALID.format(name="p") + "parameters:\n  " + parameters + "\n"
    message = _refused(_catalog(tmp_path, {"good.yaml": VALID.format(name="g"), "bad.yaml": text}))
    assert str(tmp_path / "catalog" / "bad.yaml") in message
    assert expected in message
    assert "good.yaml" not in message


@pytest.mark.parametrize(
    "value", [{"a", "b"}, ("a", "b"), b"x", float("nan"), {1: "x"}, {"a": [{"b": {1.5}}]}]
)
def test_parameters_that_are_not_json_are_refused_in_code(value: object) -> None:
    with pytest.raises(ValidationError, match="parameters"):
        PolicyDefinition(
            policy_name="p",
            policy_type="t",
            description="d",
            priority="low",
            parameters={"k": value},
        )


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        # A value containing itself: its JSON would never end.
        ("loop: &loop [*loop]", "field 'parameters.loop.0.0."),
        # Ten values repeated eight times over by aliases: 10**8 values from 9 lines.
        (
            "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 8)),
            "field 'parameters': more than 1000000 values",
        ),
    ],
)
def test_aliases_cannot_loop_or_multiply_parameters(
    tmp_path: Path, parameters: str, expected: str
) -> None:
    text = VALID.format(name="p") + "parameters:\n  " + parameters + "\n"
    started = time.monotonic()
    message = _refused(_catalog(tmp_path, {"bad.yaml": text}))
    assert "bad.yaml" in message and expected in message
    assert time.monotonic() - started < 10


def test_an_integer_too_long_for_python_is_refused_with_the_file_named(tmp_path: Path) -> None:
    text = VALID.format(name="p") + "parameters:\n  n: " + "9" * 5000 + "\n"
    message = _refused(_catalog(tmp_path, {"bad.yaml": text}))
    assert "bad.yaml: not valid YAML: Exceeds the limit" in message


# --- size and depth --------------------------------------------------------------------------

_LOAD_IN_A_PROCESS = """
import sys
from pathlib import Path
from policy_pipeline.core.catalog import CatalogError, load_catalog
try:
    load_catalog(Path(sys.argv[1]))
except CatalogError as exc:
    print(exc)
"""


@pytest.mark.parametrize(
    "text",
    [
        "[" * 50_000,
        "{a: " * 50_000,
        "- " * 50_000 + "x\n",
        VALID.format(name="p") + "parameters:\n  deep: " + "[" * 50_000 + "]" * 50_000 + "\n",
    ],
    ids=["flow-sequences", "flow-mappings", "block-sequences", "inside-a-valid-policy"],
)
def test_fifty_thousand_levels_are_refused_not_a_segfault(tmp_path: Path, text: str) -> None:
    directory = _catalog(tmp_path, {"deep.yaml": text})
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_A_PROCESS, str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert f"{directory / 'deep.yaml'}: nested deeper than {MAX_NESTING_DEPTH} levels" in (
        done.stdout
    )


def test_nesting_is_capped_when_the_file_is_loaded(tmp_path: Path) -> None:
    def nested(levels: int) -> str:
        # The document's mapping and the parameters mapping are the first two levels.
        lists = levels - 2
        return VALID.format(name="p") + "parameters:\n  n: " + "[" * lists + "]" * lists + "\n"

    [entry] = load_catalog(_catalog(tmp_path, {"p.yaml": nested(MAX_NESTING_DEPTH)})).values()
    assert entry.policy.parameters["n"]
    for levels in (MAX_NESTING_DEPTH + 1, 500):
        directory = _catalog(tmp_path / str(levels), {"p.yaml": nested(levels)})
        message = _refused(directory)
        assert f"p.yaml: nested deeper than {MAX_NESTING_DEPTH} levels (line 6)" in message


def test_a_file_over_the_size_cap_is_refused_before_parsing(tmp_path: Path) -> None:
    head = VALID.format(name="big") + "parameters:\n  blob: "
    fits = head + "y" * (MAX_FILE_BYTES - len(head) - 1) + "\n"
    assert len(fits.encode()) == MAX_FILE_BYTES
    [entry] = load_catalog(_catalog(tmp_path / "fits", {"big.yaml": fits})).values()
    assert len(entry.policy.parameters["blob"]) > 1_000_000
    message = _refused(_catalog(tmp_path / "over", {"big.yaml": fits + "\n"}))
    assert f"big.yaml: {MAX_FILE_BYTES + 1} bytes, over the {MAX_FILE_BYTES} allowed" in message


# --- files that used to be skipped or half-read silently -----------------------------------


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: (d / "bad.yaml").symlink_to(d / "missing.yaml"), "is a broken symbolic link"),
        (lambda d: (d / "bad.yaml").symlink_to(d / "bad.yaml"), "is a broken symbolic link"),
        (
            lambda d: (
                (d / "bad.yaml").symlink_to(d / "other.txt"),
                (d / "other.txt").symlink_to(d / "bad.yaml"),
            ),
            "is a broken symbolic link",
        ),
        (lambda d: (d / "bad.yaml").mkdir(), "is not a regular file"),
        (lambda d: os.mkfifo(d / "bad.yaml"), "is not a regular file"),
    ],
    ids=["dangling", "self-loop", "loop", "directory", "fifo"],
)
def test_catalog_entries_that_are_not_readable_files_are_reported(
    tmp_path: Path, make: Callable[[Path], object], expected: str
) -> None:
    directory = _catalog(tmp_path, {"good.yaml": VALID.format(name="good")})
    make(directory)
    message = _refused(directory)
    assert f"{directory / 'bad.yaml'}: {expected}" in message
    assert "good.yaml" not in message


def test_a_symlink_to_a_valid_file_elsewhere_is_allowed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "shared" / "p.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text(VALID.format(name="shared"), encoding="utf-8")
    directory = _catalog(tmp_path, {})
    (directory / "linked.yml").symlink_to(elsewhere)
    assert load_catalog(directory)["shared"].path == directory / "linked.yml"


@pytest.mark.parametrize(("name", "renamed"), [("X.YAML", "X.yaml"), ("y.Yml", "y.yml")])
def test_an_upper_case_suffix_is_refused_with_the_name_to_use(
    tmp_path: Path, name: str, renamed: str
) -> None:
    directory = _catalog(tmp_path, {name: VALID.format(name="p")})
    message = _refused(directory)
    assert f"{directory / name}: " in message and f"name it '{renamed}'" in message


def test_hidden_files_stay_ignored(tmp_path: Path) -> None:
    directory = _catalog(
        tmp_path,
        {"good.yaml": VALID.format(name="good"), ".draft.yaml": "[", ".swap.YAML": "{"},
    )
    (directory / ".dangling.yaml").symlink_to(directory / "missing")
    assert list(load_catalog(directory)) == ["good"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            VALID.format(name="p") + "description: again\n",
            "field 'description': written twice (lines 3 and 5)",
        ),
        (
            VALID.format(name="p") + "parameters:\n  r:\n    days: 1\n    days: 2\n",
            "field 'parameters.r.days': written twice (lines 7 and 8)",
        ),
        (
            VALID.format(name="p") + "parameters:\n  r: [{days: 1, days: 2}]\n",
            "field 'parameters.r.0.days': written twice (line 6)",
        ),
        # The same key spelled two ways.
        (
            VALID.format(name="p") + "parameters:\n  r:\n    1: a\n    0x1: b\n",
            "field 'parameters.r.1': written twice (lines 7 and 8)",
        ),
    ],
)
def test_a_key_written_twice_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    message = _refused(_catalog(tmp_path, {"dup.yaml": text}))
    assert f"{tmp_path / 'catalog' / 'dup.yaml'}: {expected}" in message


def test_a_merge_key_overridden_in_place_is_not_a_duplicate(tmp_path: Path) -> None:
    text = VALID.format(name="p") + (
        "parameters:\n  base: &base {days: 1, tier: gold}\n  derived:\n    <<: *base\n    days: 2\n"
    )
    [entry] = load_catalog(_catalog(tmp_path, {"p.yaml": text})).values()
    assert entry.policy.parameters["derived"] == {"days": 2, "tier": "gold"}
