"""The HTTP routes, one router per resource: info (health, openapi, info), jobs, events, files."""
