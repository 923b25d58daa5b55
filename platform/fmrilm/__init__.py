"""fmrilm: a Ray-distributed platform for a language-aligned fMRI foundation model."""

import os as _os

__version__ = "0.1.0"

# A local Ray started by fmrilm listens on 127.0.0.1 only and torch/gloo use loopback
# (Ray rewrites 127.0.0.1 to the machine's address otherwise). Ray reads the first variable once, when it is first imported, so it
# is set here, before any fmrilm module imports Ray; a process pointed at a cluster
# (RAY_ADDRESS) keeps Ray's defaults.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}
if not _os.environ.get("RAY_ADDRESS"):
    for _key, _value in LOOPBACK_ENV.items():
        _os.environ.setdefault(_key, _value)
