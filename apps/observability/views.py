from asgiref.sync import sync_to_async
from django.core.cache import cache
from django.db import connection
from django.http import JsonResponse


async def healthz(request):
    """Liveness: the process answers. Never touches the database or Redis."""
    return JsonResponse({"status": "ok"})


def _dependencies() -> dict[str, str]:
    checks = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 — reported, not raised
        checks["database"] = f"error: {exc.__class__.__name__}"
    finally:
        connection.close()
    try:
        cache.set("readyz", "1", 5)
        checks["cache"] = "ok" if cache.get("readyz") == "1" else "error: cache did not store"
    except Exception as exc:  # noqa: BLE001
        checks["cache"] = f"error: {exc.__class__.__name__}"
    return checks


async def readyz(request):
    """Readiness: the database and cache answer."""
    checks = await sync_to_async(_dependencies, thread_sensitive=False)()
    ok = all(value == "ok" for value in checks.values())
    return JsonResponse(
        {"status": "ok" if ok else "unavailable", **checks}, status=200 if ok else 503
    )
