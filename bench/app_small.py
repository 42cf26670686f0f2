"""The app bench/apps.py serves both ways: Starlette answering GET /small with 100 bytes."""

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

BODY = b"x" * 99 + b"\n"


async def small(request: Request) -> Response:
    return Response(BODY, media_type="text/plain")


app = Starlette(routes=[Route("/small", small)])
