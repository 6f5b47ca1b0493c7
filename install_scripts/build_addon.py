#!/usr/bin/env python3
"""Build the Blender extension zip: dist/stag4d_blender-<version>.zip (install it with Blender's
Edit > Preferences > Get Extensions > Install from Disk, or drag the zip onto Blender's window).

    python3 install_scripts/build_addon.py [--out DIR] [--no-blender-check]

Standard library only (tomllib needs Python 3.11+). The manifest is checked here with the rules Blender's own
`blender --command extension validate` applies (ids, versions, tagline and permission texts of at most 64
characters without trailing punctuation, SPDX licences, known permission keys), and the add-on's sources are
checked to import nothing beyond Python's standard library, bpy and numpy. When bpy (the Blender Python
module) is installed in this interpreter's environment, its bundled extension tool validates the built zip too.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "blender_addon"
MAX_TERSE = 64
PERMISSION_KEYS = {"files", "network", "clipboard", "camera", "microphone"}
ALLOWED_IMPORTS = {"bpy", "bpy_extras", "mathutils", "numpy", "addon_utils"}
ALWAYS_EXCLUDED = ["__pycache__/", "*.pyc", ".*", "*.zip"]


class ManifestError(ValueError):
    pass


def _terse(field: str, value) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{field}: must be a non-empty string")
    if len(value) > MAX_TERSE:
        raise ManifestError(f"{field}: {len(value)} characters, at most {MAX_TERSE}")
    if value[-1] in ".,;:!?":
        raise ManifestError(f"{field}: must not end with punctuation ({value[-1]!r})")
    if not value[0].isalnum():
        raise ManifestError(f"{field}: must start with a letter or digit")


def _version(field: str, value, parts: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, str) or not re.fullmatch(r"\d+(\.\d+)*", value):
        raise ManifestError(f"{field}: {value!r} is not a version like 1.2.3")
    nums = tuple(int(x) for x in value.split("."))
    if parts is not None and len(nums) != parts:
        raise ManifestError(f"{field}: {value!r} needs {parts} numbers")
    return nums


def validate_manifest(manifest: dict) -> None:
    for key in ("schema_version", "id", "version", "name", "tagline", "maintainer", "type", "blender_version_min",
                "license"):
        if key not in manifest:
            raise ManifestError(f"missing field {key!r}")
    _version("schema_version", manifest["schema_version"], 3)
    if not re.fullmatch(r"[a-z][a-z0-9_]*", manifest["id"]) or manifest["id"].endswith("_"):
        raise ManifestError(f"id {manifest['id']!r}: lower case letters, digits and '_' (a Python identifier)")
    _version("version", manifest["version"], 3)
    _terse("tagline", manifest["tagline"])
    if manifest["type"] != "add-on":
        raise ManifestError("type must be 'add-on'")
    if _version("blender_version_min", manifest["blender_version_min"], 3) < (4, 2, 0):
        raise ManifestError("blender_version_min: extensions need Blender 4.2.0 or newer")
    lic = manifest["license"]
    if not isinstance(lic, list) or not lic or not all(isinstance(x, str) and x.startswith("SPDX:") for x in lic):
        raise ManifestError("license: a list of 'SPDX:<identifier>' strings")
    perms = manifest.get("permissions", {})
    if not isinstance(perms, dict):
        raise ManifestError("permissions: a table of key = \"reason\"")
    for key, reason in perms.items():
        if key not in PERMISSION_KEYS:
            raise ManifestError(f"permissions: unknown key {key!r} (known: {sorted(PERMISSION_KEYS)})")
        _terse(f"permissions.{key}", reason)
    if manifest.get("wheels"):
        raise ManifestError("wheels: this add-on must not bundle wheels (standard library and bpy only)")


def check_imports(src: Path) -> None:
    """The add-on runs in Blender's Python: stdlib, bpy, numpy; never torch or the backend package."""
    stdlib = set(sys.stdlib_module_names)
    for py in sorted(src.rglob("*.py")):
        tree = ast.parse(py.read_text(), str(py))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in stdlib and top not in ALLOWED_IMPORTS and top != "__future__":
                    raise ManifestError(f"{py.relative_to(src.parent)}: imports {name!r}, which Blender does not ship")


def _excluded(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for pat in patterns:
        if pat.endswith("/"):
            d = pat.strip("/")
            if any(fnmatch.fnmatch(p, d) for p in parts[:-1]):
                return True
        elif pat.startswith("/"):
            if fnmatch.fnmatch(rel, pat.lstrip("/")):
                return True
        elif fnmatch.fnmatch(parts[-1], pat) or fnmatch.fnmatch(rel, pat):
            return True
    return False


def build(out_dir: Path, src: Path = SRC) -> Path:
    manifest = tomllib.loads((src / "blender_manifest.toml").read_text())
    validate_manifest(manifest)
    check_imports(src)
    if not (src / "__init__.py").is_file():
        raise ManifestError("blender_addon/__init__.py is missing")
    patterns = ALWAYS_EXCLUDED + list(manifest.get("build", {}).get("paths_exclude_pattern", []))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{manifest['id']}-{manifest['version']}.zip"
    tmp = out.with_suffix(".zip.part")
    files = sorted(p for p in src.rglob("*") if p.is_file() and not _excluded(p.relative_to(src).as_posix(), patterns))
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in files:  # the manifest sits at the zip's root, as Blender expects
            zf.write(p, p.relative_to(src).as_posix())
    tmp.replace(out)
    return out


def blender_validate(zip_path: Path) -> str | None:
    """Run the extension tool that ships inside bpy, if bpy is installed; None when unavailable."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("bpy")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    tools = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    if not tools:
        return None
    proc = subprocess.run([sys.executable, str(tools[-1]), "validate", str(zip_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ManifestError(f"Blender's extension validator: {(proc.stdout + proc.stderr).strip()}")
    return (proc.stdout + proc.stderr).strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "dist")
    ap.add_argument("--no-blender-check", action="store_true", help="skip bpy's extension validator")
    args = ap.parse_args(argv)
    try:
        out = build(args.out)
        checked = None if args.no_blender_check else blender_validate(out)
    except ManifestError as exc:
        print(f"build_addon: ERROR: {exc}", file=sys.stderr)
        return 1
    with zipfile.ZipFile(out) as zf:
        n = len(zf.namelist())
    print(f"wrote {out} ({n} files, {out.stat().st_size / 1024:.0f} KiB)"
          + (f"; Blender's validator: {checked}" if checked else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
