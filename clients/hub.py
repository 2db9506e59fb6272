"""An `hf:` source when the Hugging Face Hub cannot be reached: the local cache, or a clear error.

Without these checks a machine without network spends ~24 s in `datasets`' retries and ends
with a ConnectionError traceback that does not say the dataset is simply not cached.
"""

from __future__ import annotations

from typing import Any


class HubSourceError(ValueError):
    """An hf: source is neither in the local cache nor reachable (clients.sources.DataSourceError's kin)."""


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub (HF_ENDPOINT) cannot be reached from here, or None if it can.
    A TCP connect with a deadline: without it, a machine without network spends ~24 s in
    retries before `datasets` gives up with a ConnectionError."""
    import concurrent.futures
    import os
    import socket
    import urllib.parse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") \
            not in ("", "0"):
        return "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)

    def connect() -> None:
        socket.create_connection((host, port), timeout=timeout).close()

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:  # DNS lookups take no timeout of their own: the whole attempt gets one
        pool.submit(connect).result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        return f"{url.scheme}://{host}:{port} did not answer within {timeout:.0f}s"
    except OSError as err:
        return f"{url.scheme}://{host}:{port}: {err.strerror or err}"
    finally:
        pool.shutdown(wait=False)
    return None


def cached_only(datasets: Any, spec: str, why: str) -> Any:
    """The dataset from the local Hugging Face cache, or a HubSourceError saying it is not there."""
    import huggingface_hub.constants as hub_constants

    name, _, config = spec.partition(":")
    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True  # no network attempt, no retries
    try:
        return datasets.load_dataset(name, config or None, split="train")
    except Exception as err:  # datasets raises several types for "not cached" (ConnectionError, FileNotFoundError..)
        raise HubSourceError(
            f"source 'hf:{spec}': not in the local Hugging Face cache ({datasets.config.HF_DATASETS_CACHE}) and "
            f"the Hub is unreachable ({why}); download it where the Hub is reachable "
            f"(`bridgepool data prepare --source hf:{spec}` there, or copy its cache), or use a local path "
            f"[{type(err).__name__}]") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
