"""Who is calling: the identity the authentication layer established for the current call.

A context variable, set by the auth interceptor before the servicer runs (an aio RPC's
interceptors and handler run in one task, so the value is seen by the handler and by tasks it
starts). No grpc here: the core may read it too (fair shares per caller). Never a secret: a
token's name from the token file, or a client certificate's subject.
"""

from __future__ import annotations

from contextvars import ContextVar

ANONYMOUS = ""

current_caller: ContextVar[str] = ContextVar("framecast_caller", default=ANONYMOUS)
