"""A conformance runner for rtunnel.v1 implementations, in the spirit of h2spec (see SPEC.md and README).

    python -m rtunnel.conformance relay ws://HOST:PORT --token T [--http http://HOST:PORT]
    python -m rtunnel.conformance agent -- COMMAND...     ({url}, {token}, {upstream} are filled in)

The runner plays the other side as a scripted peer (peers.py, which the test suite's hostile-peer tests use
too), runs each case of relay_cases.py and relay_exchanges.py, or of agent_cases.py, and prints per case the
SPEC section, the verdict and what it sent and what came back. Exit status 0 only if every MUST case passed.
"""
