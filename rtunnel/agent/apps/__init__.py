"""`dial --app`: WSGI and ASGI applications the agent runs in-process instead of an HTTP upstream."""
