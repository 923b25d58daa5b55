"""Fake cloud credentials for leak checks."""

import secrets


def fake_aws_credentials() -> dict[str, str]:
    """``{AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN: value}``, values made per run
    in no provider's format: nothing key-shaped is committed, and a leak check that finds none of
    them cannot be passing because some constant happened to be absent."""
    tag = secrets.token_hex(8)
    return {name: f"fmrilm-fake-{name.lower()}-{tag}" for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
