from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from .logging import request_id_of, request_id_var


class RequestIdMiddleware:
    """Takes X-Request-ID from the proxy (or makes one), logs with it, echoes it back."""

    async_capable = True
    sync_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self._acall(request)
        token = request_id_var.set(self._request_id(request))
        try:
            response = self.get_response(request)
        finally:
            request_id_var.reset(token)
        response["X-Request-ID"] = request.request_id
        return response

    async def _acall(self, request):
        token = request_id_var.set(self._request_id(request))
        try:
            response = await self.get_response(request)
        finally:
            request_id_var.reset(token)
        response["X-Request-ID"] = request.request_id
        return response

    @staticmethod
    def _request_id(request) -> str:
        value = request_id_of(request.headers.get("X-Request-ID", ""))
        request.request_id = value
        return value
