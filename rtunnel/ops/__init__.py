"""Operating either end: logs and access lines, metrics, the admin endpoint and its dashboard, the request
inspector, redaction and replay."""
