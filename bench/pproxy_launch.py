"""`python pproxy_launch.py ARGS` runs `pproxy ARGS` (pproxy 2.7.9, in bench/run.py's own environment for it) with
two fixes the benchmark needs on current Pythons; neither touches the per-byte work.

- asyncio keeps only weak references to tasks, and pproxy keeps none to the ones it starts with `ensure_future`.
  Under load the garbage collector destroys pending relay tasks ("Task was destroyed but it is pending!"), and their
  `finally` closes the connection in mid-exchange (wrk counts read errors, and each reconnection needs a new
  backward link). A reference is kept here until each task is done.
- The backward end (`pproxy -l X+in://...`) has no listening sockets, and pproxy fails printing them
  ("'ProxyBackward' object has no attribute 'sockets'") and then exits for want of a server. It prints the
  address instead.

Runs in pproxy's environment, not the project's: standard library and pproxy only.
"""

import asyncio
import sys

import pproxy.server

_running = set()  # tasks pproxy started, until each is done
_ensure_future = asyncio.ensure_future


def _ensure_future_kept(coro_or_future, *, loop=None):
    task = _ensure_future(coro_or_future, loop=loop)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task


_print_server_started = pproxy.server.print_server_started


def _print_server_started_backward(option, server, print_fn):
    if hasattr(server, "sockets"):
        _print_server_started(option, server, print_fn)
    else:
        print_fn(option)


asyncio.ensure_future = _ensure_future_kept
pproxy.server.print_server_started = _print_server_started_backward

if __name__ == "__main__":
    sys.exit(pproxy.server.main())
