"""`rtunnel dial`: the agent's links to its relays, the allowlist, and each stream's exchange with the upstream
(or with an in-process app, in apps/)."""
