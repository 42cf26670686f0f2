"""`dial --app MODULE:ATTR`: import the application the agent runs in-process, and tell WSGI from ASGI.

The rules are uvicorn's, so an app that runs under it loads the same way here: MODULE is imported with
`app_dir` first on `sys.path`, ATTR may be a dotted path inside it, `factory` calls ATTR with no arguments to
get the app. `interface="auto"` picks ASGI for a coroutine function or an object whose `__call__` is one (or a
class with `__await__`, ASGI 3's class form), and WSGI for any other callable.

Every failure is an `AppLoadError` whose message names the module and the reason in one line; the original
exception stays its `__cause__` (the command line shows that traceback only with `--log-level debug`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import sys
from typing import Any, Final, Literal

__all__ = ["INTERFACES", "AppLoadError", "LoadedApp", "detect_interface", "load_app"]

Interface = Literal["asgi", "wsgi"]
INTERFACES: Final = ("auto", "asgi", "wsgi")


class AppLoadError(Exception):
    """The app could not be loaded; the message is the one line to show."""


@dataclasses.dataclass(frozen=True)
class LoadedApp:
    app: Any
    interface: Interface
    name: str  # MODULE:ATTR, for log lines


def load_app(spec: str, *, app_dir: str = ".", factory: bool = False, interface: str = "auto") -> LoadedApp:
    """Import `spec` ("MODULE:ATTR") and return the app with its interface; raises AppLoadError."""
    if interface not in INTERFACES:
        raise AppLoadError(f"--interface {interface!r}: one of {', '.join(INTERFACES)}")
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AppLoadError(f"--app {spec!r}: expected MODULE:ATTR, e.g. myproject.web:app")
    path = str(app_dir)
    if path not in sys.path[:1]:
        sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name == module_name or (exc.name and module_name.startswith(exc.name + ".")):
            where = f" in {app_dir!r}" if app_dir != "." else ""
            raise AppLoadError(f"--app {spec!r}: module {module_name!r} not found{where}") from exc
        raise AppLoadError(f"--app {spec!r}: importing {module_name!r} failed: {_describe(exc)}") from exc
    except Exception as exc:  # the module's own code raised: any type is possible
        raise AppLoadError(f"--app {spec!r}: importing {module_name!r} failed: {_describe(exc)}") from exc
    app: Any = module
    for part in attr.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise AppLoadError(f"--app {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if factory:
        if not callable(app):
            raise AppLoadError(f"--app {spec!r} --factory: {attr!r} is not callable")
        try:
            app = app()
        except Exception as exc:
            raise AppLoadError(
                f"--app {spec!r} --factory: calling {attr}() failed: {_describe(exc)}"
            ) from exc
    if not callable(app):
        kind = type(app).__name__
        raise AppLoadError(
            f"--app {spec!r}: {attr!r} in module {module_name!r} is not callable ({kind}): neither a WSGI "
            "nor an ASGI application"
        )
    forced: Interface = "asgi" if interface == "asgi" else "wsgi"
    return LoadedApp(app, detect_interface(app) if interface == "auto" else forced, spec)


def detect_interface(app: Any) -> Interface:
    """ASGI for an async callable (uvicorn's test, asgi2's class form aside), WSGI for any other callable."""
    if inspect.isclass(app):
        return "asgi" if hasattr(app, "__await__") else "wsgi"
    if _is_async(app):
        return "asgi"
    call = getattr(app, "__call__", None)  # noqa: B004 (the method itself is what is tested)
    return "asgi" if call is not None and _is_async(call) else "wsgi"


def _is_async(function: Any) -> bool:
    while isinstance(function, functools.partial):
        function = function.func
    return inspect.iscoroutinefunction(function)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
