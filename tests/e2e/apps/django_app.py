"""A one-file Django project in WSGI mode for tests/e2e/test_apps.py (`--app django_app:application`)."""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, JsonResponse
from django.urls import path

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    SECRET_KEY="tests-only",
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    USE_X_FORWARDED_HOST=False,
)


def hello(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {
            "hello": "django",
            "remote": request.META.get("REMOTE_ADDR"),
            "script_name": request.META.get("SCRIPT_NAME"),
            "path": request.path,
            "absolute": request.build_absolute_uri(),
        }
    )


def sha(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        return JsonResponse({"error": "POST only"}, status=405)
    digest = hashlib.sha256()
    size = 0
    while chunk := request.read(65536):
        digest.update(chunk)
        size += len(chunk)
    return JsonResponse({"sha256": digest.hexdigest(), "size": size})


urlpatterns = [path("hello", hello), path("sha", sha)]
application = get_wsgi_application()
