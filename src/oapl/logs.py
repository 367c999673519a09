"""Engine log hygiene: WARNING by default, known-benign vLLM warnings dropped, one progress-bar line.

* vLLM logs INFO lines (start-up, every weight sync) on its own stdout handler, which breaks the
  progress bar. :func:`quiet_engine_logs` (called by the ``oapl`` command before vLLM is imported)
  routes vLLM's loggers to the root handler and sets them to WARNING (INFO with ``-v``;
  ``VLLM_LOGGING_LEVEL`` set by the user wins).
* :func:`install_vllm_filters` drops exactly the warnings vLLM's layer-wise reload prints at every
  sync for modules without checkpoint weights: ``*RotaryEmbedding: Failed to load weights`` (its
  cos/sin cache is computed, not loaded) and, for a model with tied embeddings,
  ``ParallelLMHead: Failed to load weights`` (the head is the embedding; the engine re-packs it).
  The same warning for any other layer, or for the LM head of an untied model, still shows.
* :class:`TqdmLoggingHandler` writes log records with ``tqdm.write`` so a line of log goes above
  the progress bar instead of through it.
"""

from __future__ import annotations

import logging
import os
import sys

#: The logger of vLLM's layer-wise weight reload (``vllm/model_executor/model_loader/reload``).
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
_FAILED_TO_LOAD = "%s: Failed to load weights"


class BenignVLLMWarnings(logging.Filter):
    """Drop "<layer>: Failed to load weights" for layers that have no weights to load."""

    def __init__(self) -> None:
        super().__init__()
        self.tied_lm_head = False
        self.dropped = 0

    def is_benign(self, layer: str) -> bool:
        return layer.endswith("RotaryEmbedding") or (layer == "ParallelLMHead" and self.tied_lm_head)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _FAILED_TO_LOAD and isinstance(record.args, tuple) and record.args:
            if self.is_benign(str(record.args[0])):
                self.dropped += 1
                return False
        return True


_FILTER = BenignVLLMWarnings()


def install_vllm_filters(tied_lm_head: bool | None = None) -> BenignVLLMWarnings:
    """Attach the benign-warning filter to vLLM's reload logger (idempotent).

    ``tied_lm_head``: the served model ties its LM head to the embedding (then the head's warning
    is benign too). Once one engine of the process says so it stays on.
    """
    logger = logging.getLogger(RELOAD_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    if tied_lm_head:
        _FILTER.tied_lm_head = True
    return _FILTER


class TqdmLoggingHandler(logging.StreamHandler):
    """A stderr handler that prints through ``tqdm.write`` (above any live progress bar)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - never let logging break a run
            self.handleError(record)


def setup_cli_logging(verbose: bool = False) -> None:
    """Root logging for the ``oapl`` command: INFO (DEBUG with ``-v``) through :class:`TqdmLoggingHandler`."""
    root = logging.getLogger()
    handler = TqdmLoggingHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    for h in list(root.handlers):
        if isinstance(h, TqdmLoggingHandler):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def quiet_engine_logs(verbose: bool = False) -> None:
    """vLLM at WARNING (INFO with ``verbose``), through the root handler, benign warnings filtered."""
    user_level = os.environ.get("VLLM_LOGGING_LEVEL")
    if "VLLM_CONFIGURE_LOGGING" not in os.environ and "vllm" not in sys.modules:
        # vLLM would install its own stdout handler at import; let records reach ours instead
        os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
    level = (user_level or ("INFO" if verbose else "WARNING")).upper()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", level)  # also for engine processes (Ray actors)
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.setLevel(level)
    if os.environ.get("VLLM_CONFIGURE_LOGGING") == "0":
        vllm_logger.propagate = True
    for h in vllm_logger.handlers:  # already configured by an earlier import: same level
        h.setLevel(level)
    install_vllm_filters()
