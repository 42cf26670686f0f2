"""`rtunnel serve`: the relay's listeners, its table of agents and tunnels, and each client's HTTP exchanges
carried to an agent as streams."""
