"""Engine logs: WARNING by default, the known-benign vLLM warnings dropped, one progress-bar line."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest

from oapl.logs import RELOAD_LOGGER, BenignVLLMWarnings, TqdmLoggingHandler


def _record(layer: str, msg: str = "%s: Failed to load weights", level=logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(RELOAD_LOGGER, level, __file__, 1, msg, (layer,), None)


def test_only_layers_without_weights_are_filtered():
    f = BenignVLLMWarnings()
    assert not f.filter(_record("RotaryEmbedding"))
    assert not f.filter(_record("Llama3RotaryEmbedding"))
    assert f.filter(_record("ParallelLMHead"))  # an untied head that fails to load is a real problem
    assert f.filter(_record("QKVParallelLinear"))
    assert f.filter(_record("RotaryEmbedding", msg="%s: Delayed processing"))
    f.tied_lm_head = True
    assert not f.filter(_record("ParallelLMHead"))
    assert f.dropped == 3


@pytest.mark.slow  # starts vLLM
def test_vllm_logs_go_through_our_handler_at_warning():
    """As the `oapl` command sets it up: no INFO, warnings on stderr, nothing on vLLM's stdout handler."""
    pytest.importorskip("vllm")
    script = (
        "import logging\n"
        "from oapl.logs import quiet_engine_logs, setup_cli_logging, RELOAD_LOGGER\n"
        "setup_cli_logging()\nquiet_engine_logs()\n"
        "from vllm.logger import init_logger\n"
        "log = init_logger('vllm.some.module')\n"
        "log.info('INFO-LINE')\nlog.warning('WARNING-LINE')\n"
        "reload = init_logger(RELOAD_LOGGER)\n"
        "reload.warning('%s: Failed to load weights', 'RotaryEmbedding')\n"
        "reload.warning('%s: Failed to load weights', 'QKVParallelLinear')\n"
        "logging.getLogger('oapl.loop').info('OAPL-INFO')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("VLLM_LOGGING")}
    env.pop("VLLM_CONFIGURE_LOGGING", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "INFO-LINE" not in proc.stderr
    assert "WARNING vllm.some.module: WARNING-LINE" in proc.stderr
    assert "RotaryEmbedding" not in proc.stderr
    assert "QKVParallelLinear: Failed to load weights" in proc.stderr  # real warnings still show
    assert "OAPL-INFO" in proc.stderr


def test_log_lines_go_above_the_progress_bar():
    from tqdm import tqdm

    stream = io.StringIO()
    handler = TqdmLoggingHandler()
    handler.stream = stream
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("oapl.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        bar = tqdm(total=3, file=stream, desc="oapl train", dynamic_ncols=False, ncols=60, mininterval=0)
        bar.update(1)
        logger.warning("checkpoint written")
        bar.update(1)
        bar.close()
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    # the record is a line of its own: the bar was cleared (\r) before it, a newline after it
    pieces = [p for chunk in text.split("\n") for p in chunk.split("\r")]
    assert "WARNING checkpoint written" in pieces, repr(text)
