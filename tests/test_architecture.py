"""docs/architecture.md names the modules as they are: a module added, moved or removed without
the map following fails here."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()


def _table_rows(heading):
    """The first-column names of the table under ``heading`` (``## heading``)."""
    section = DOC.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    names = []
    for line in section.splitlines():
        if line.startswith("| `"):
            names += re.findall(r"`([^`]+)`", line.split("|")[1])
    return names


def _package_entries(package):
    """Modules (``x.py``) and subpackages (``x/``) of ``package``, private ones left out."""
    entries = set()
    for path in (ROOT / package).iterdir():
        if path.name.startswith("_") or path.name in ("migrations", "templates"):
            continue
        if path.suffix == ".py":
            entries.add(path.name)
        elif (path / "__init__.py").exists():
            entries.add(f"{path.name}/")
    return entries


def test_the_engine_map_names_every_module_of_migrator_and_no_other():
    assert set(_table_rows("The engine: `migrator/`")) == _package_entries("migrator")


def test_the_record_map_names_every_module_of_tenants_and_no_other():
    assert set(_table_rows("The record: `tenants/`")) == _package_entries("tenants")


def test_every_action_module_is_named():
    named = re.search(r"one module per concern \(([^)]*)\)", DOC).group(1)
    modules = {path.stem for path in (ROOT / "tenants" / "actions").glob("[!_]*.py")}
    assert set(re.findall(r"`(\w+)`", named)) == modules


def test_every_test_the_map_cites_exists():
    for cited in set(re.findall(r"`(tests/test_\w+\.py)", DOC)):
        assert (ROOT / cited).exists(), cited
