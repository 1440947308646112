"""Sign-in and sign-up throttling: every POST to the login, admin login and
sign-up forms counts against the client's address, and a login also against the
username it names (someone guessing one account's password from many addresses).
Past a limit within the window the form answers 429 with Retry-After, whatever
the password. Fixed windows in the cache (Redis in production, shared by every
pod); if the cache is down, nobody is locked out."""

import logging
from dataclasses import dataclass

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse
from django.urls import Resolver404, resolve
from django.utils.decorators import sync_and_async_middleware

log = logging.getLogger(__name__)

# url name -> the counter its POSTs count against
THROTTLED_VIEWS = {"login": "login", "admin:login": "login", "signup": "signup"}
REFUSED = "Too many attempts. Wait a few minutes, then try again."


@dataclass(frozen=True)
class Limit:
    attempts: int
    window_s: int


def limits() -> dict[str, Limit]:
    window = settings.AUTH_THROTTLE_WINDOW_S
    return {
        "login:ip": Limit(settings.AUTH_THROTTLE_LOGIN_PER_IP, window),
        "login:user": Limit(settings.AUTH_THROTTLE_LOGIN_PER_USER, window),
        "signup:ip": Limit(settings.AUTH_THROTTLE_SIGNUP_PER_IP, window),
    }


def client_address(request: HttpRequest) -> str:
    """The peer; behind a trusted proxy (TRUST_PROXY_HEADERS), the address the
    proxy appended last to X-Forwarded-For (earlier entries are the client's own say)."""
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if settings.TRUST_PROXY_HEADERS and forwarded:
        return forwarded.rsplit(",", 1)[-1].strip()
    return request.META.get("REMOTE_ADDR", "")


def attempt_count(*, counter: str, key: str, limit: Limit) -> bool:
    """Count one attempt; False once `limit` is passed within its window."""
    name = f"throttle:{counter}:{key}"
    try:
        cache.add(name, 0, timeout=limit.window_s)
        return cache.incr(name) <= limit.attempts
    except Exception:  # the cache is down: fail open, never lock everyone out
        log.warning("throttle: the cache failed; %s not counted", counter, exc_info=True)
        return True


def attempt_allowed(request: HttpRequest, scope: str) -> bool:
    table = limits()
    allowed = attempt_count(
        counter=f"{scope}:ip", key=client_address(request), limit=table[f"{scope}:ip"]
    )
    username = request.POST.get("username", "").strip().lower()
    if scope == "login" and username:
        allowed &= attempt_count(counter="login:user", key=username, limit=table["login:user"])
    return allowed


def refusal(request: HttpRequest) -> HttpResponse | None:
    """A 429 for a throttled form's POST past its limits, else None."""
    if request.method != "POST":
        return None
    try:
        scope = THROTTLED_VIEWS.get(resolve(request.path_info).view_name)
    except Resolver404:
        return None
    if scope is None or attempt_allowed(request, scope):
        return None
    log.warning("throttle: %s refused for %s", scope, client_address(request))
    response = HttpResponse(REFUSED, status=429, content_type="text/plain; charset=utf-8")
    response["Retry-After"] = str(settings.AUTH_THROTTLE_WINDOW_S)
    return response


@sync_and_async_middleware
def auth_throttle_middleware(get_response):
    """Sync and async, so that Daphne's requests take no thread hop for it;
    only the throttled forms' POSTs touch the cache (on a thread)."""
    if iscoroutinefunction(get_response):

        async def middleware_async(request):
            refused = await sync_to_async(refusal)(request) if request.method == "POST" else None
            return refused or await get_response(request)

        return middleware_async

    def middleware(request):
        return refusal(request) or get_response(request)

    return middleware
