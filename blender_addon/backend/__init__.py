"""The add-on's parts that never touch bpy (as glTF-Blender-IO keeps io/ apart from blender/): the HTTP client
of `stag4d serve` (``client``), the local server process (``server_process``) and the thread session that
submits and follows jobs (``session``). Standard library only; tests import this folder with bpy absent."""
