"""One root for every error a user can act on.

A :class:`UserError` carries a message that names the file, row or key at fault and what to do;
the CLI prints it as one line (never a traceback) and exits 2. Ray wraps errors raised in tasks
and Train workers; :func:`user_error_in` finds ours inside those wrappers. :func:`redact` removes
credentials embedded in URIs from any text before it is shown or logged.
"""

from __future__ import annotations

import re


class UserError(Exception):
    """An error the user can fix (bad input, spec, data, storage or cluster state)."""


_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")
# a URI query parameter that carries a secret (?secret_key=..., &X-Amz-Signature=..., &token=...)
_SECRET_QUERY = re.compile(r"(?P<name>[?&;](?:[\w.-]*(?:secret|token|password|passwd|pwd|signature|credential|api_?key|access_?key|"
                           r"private_?key|auth)[\w.-]*|sig|key))=(?P<value>[^&#\s'\"]+)", re.IGNORECASE)


def embeds_credentials(text: str) -> bool:
    """Whether ``text`` holds a URI with userinfo (``scheme://user:secret@host``) or a secret
    query parameter (``?secret_key=...``, ``&X-Amz-Signature=...``)."""
    return bool(_USERINFO.search(str(text)) or ("://" in str(text) and _SECRET_QUERY.search(str(text))))


def redact(text: str) -> str:
    """``text`` with the userinfo of every URI in it (``s3://KEY:SECRET@bucket``) and the values of
    secret query parameters replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", str(text))
    return _SECRET_QUERY.sub(lambda m: f"{m.group('name')}=***", text) if "://" in text else text


def _children(err: BaseException) -> list[BaseException]:
    """The exceptions a wrapper holds: Ray's ``cause`` (task errors), Ray Train's per-worker
    failures (``worker_failures``, a dict rank -> error), and Python's ``__cause__``/``__context__``."""
    out = []
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        out.append(cause)
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict):
        out += [e for _, e in sorted(failures.items()) if isinstance(e, BaseException)]
    for attr in ("__cause__", "__context__"):
        e = getattr(err, attr, None)
        if isinstance(e, BaseException):
            out.append(e)
    return out


def user_error_in(err: BaseException, depth: int = 12) -> UserError | None:
    """The first :class:`UserError` inside ``err`` (itself, or wrapped by Ray), else None."""
    seen: set[int] = set()
    stack = [(err, 0)]
    while stack:
        e, d = stack.pop(0)
        if id(e) in seen or d > depth:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            # Ray's task error is made an instance of its cause's class too, its text Ray's whole
            # report (actor, traceback): the innermost cause is the one line to show
            while isinstance(getattr(e, "cause", None), UserError) and e.cause is not e:
                e = e.cause
            return e
        stack += [(c, d + 1) for c in _children(e)]
    return None
