"""The HTTP backend (`stag4d serve`): jobs over a versioned API under /v1 (docs/server.md)."""
