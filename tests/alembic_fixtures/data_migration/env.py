"""Runs the real tenant_migrations/env.py for this test script directory."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parents[3] / "tenant_migrations" / "env.py"))
