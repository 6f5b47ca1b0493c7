"""blender_addon/backend/ (HTTP client, local server process, thread session) imports and works with bpy absent,
and holds the backend's names where it must spell them itself (it never imports the backend)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib.util, sys
sys.modules["bpy"] = None            # `import bpy` raises ImportError from here on
folder = sys.argv[1]
spec = importlib.util.spec_from_file_location("addon_backend", folder + "/__init__.py",
                                              submodule_search_locations=[folder])
pkg = importlib.util.module_from_spec(spec)
sys.modules["addon_backend"] = pkg
spec.loader.exec_module(pkg)
from addon_backend import client, server_process, session
session.post({"type": "note", "key": "k", "message": "hello"})
update = session.next_update()
assert update == {"type": "note", "key": "k", "message": "hello"}, update
assert session.next_update() is None and not session.busy()
print(sorted(m for m in sys.modules if m.startswith(("bpy", "stag4d_backend", "blender_addon"))))
print(",".join(client.TERMINAL_STATES))
"""


def test_backend_folder_imports_without_bpy_or_the_add_on():
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO / "blender_addon" / "backend")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded, states = out.stdout.strip().splitlines()
    assert loaded == "['bpy']"  # only the None placeholder: neither Blender, the add-on nor the backend
    from stag4d_backend.job import ENDED_STATES

    assert tuple(states.split(",")) == ENDED_STATES  # the add-on's copy of the job states that end a watch
