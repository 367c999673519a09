"""Loaders for code-generation data: DeepCoder (training) and LiveCodeBench (eval).

Both return a list of rows ``{"prompt": str, "tests": list[dict], "metadata":
dict}`` ready for :func:`oapl.rewards.code.code_reward`:

* ``prompt``: the problem statement plus the instruction to answer in a
  ```` ```python ```` block (with the starter code when there is one, in the
  LiveCodeBench prompt style);
* ``tests``: ``[{"input": str, "output": str, "testtype": "stdin"|"functional"}]``
  (functional inputs are one JSON value per line, outputs are JSON, as in
  LiveCodeBench, so every row has the same Arrow-friendly schema);
* ``metadata``: ``{"func_name", "source", "question_id", "difficulty",
  "platform", "contest_date", "starter_code"}`` (absent values are ``None``).

Sources are Hugging Face Hub names (loaded with :func:`datasets.load_dataset`)
or local ``.jsonl``/``.json``/``.parquet`` files or directories of them.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import pickle
import zlib
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Sequence

from oapl.rewards.code import CodeTest, parse_tests

logger = logging.getLogger(__name__)

__all__ = [
    "DEEPCODER_HUB_NAME",
    "LIVECODEBENCH_HUB_NAME",
    "LCB_VERSION_FILES",
    "build_code_prompt",
    "decode_lcb_private_tests",
    "load_deepcoder",
    "load_livecodebench",
]

DEEPCODER_HUB_NAME = "agentica-org/DeepCoder-Preview-Dataset"
LIVECODEBENCH_HUB_NAME = "livecodebench/code_generation_lite"
#: DeepCoder subsets (Hub configs) used for each split by the DeepCoder recipe.
DEEPCODER_SUBSETS = {"train": ("primeintellect", "taco", "lcbv5"), "test": ("codeforces", "lcbv5")}

_LCB_SHARDS = ["test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl"]
#: LiveCodeBench ``version_tag`` -> files of ``livecodebench/code_generation_lite``.
LCB_VERSION_FILES: dict[str, list[str]] = {f"release_v{i}": _LCB_SHARDS[:i] for i in range(1, len(_LCB_SHARDS) + 1)}
LCB_VERSION_FILES["release_latest"] = list(_LCB_SHARDS)
for _i in range(1, len(_LCB_SHARDS) + 1):
    LCB_VERSION_FILES[f"v{_i}"] = [_LCB_SHARDS[_i - 1]]
    for _j in range(_i + 1, len(_LCB_SHARDS) + 1):
        LCB_VERSION_FILES[f"v{_i}_v{_j}"] = _LCB_SHARDS[_i - 1 : _j]

_INSTRUCTION = (
    "You will be given a question (problem specification) and will generate a correct "
    "Python program that matches the specification and passes all tests."
)
_WITH_STARTER = (
    "You will use the following starter code to write the solution to the problem and "
    "enclose your code within delimiters."
)
_WITHOUT_STARTER = (
    "Read the inputs from stdin, solve the problem and write the answer to stdout (do not "
    "directly test on the sample inputs). Enclose your code within delimiters as follows. "
    "Ensure that when the python program runs, it reads the inputs, runs the algorithm and "
    "writes output to STDOUT."
)


def build_code_prompt(problem: str, starter_code: str | None = None) -> str:
    """LiveCodeBench-style prompt asking for the answer in a ```python block."""
    text = f"{_INSTRUCTION}\n\nQuestion: {problem.strip()}\n\n"
    if starter_code and starter_code.strip():
        return text + f"{_WITH_STARTER}\n```python\n{starter_code.rstrip()}\n```\n"
    return text + f"{_WITHOUT_STARTER}\n```python\n# YOUR CODE HERE\n```\n"


# --------------------------------------------------------------------------- helpers


def _as_dict(value: Any) -> dict:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.strip():
        try:
            parsed = json.loads(value)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def _serialize_tests(tests: Sequence[CodeTest]) -> list[dict]:
    """Normalized tests in LiveCodeBench's string form (uniform schema)."""
    out = []
    for t in tests:
        if t.testtype == "functional":
            inp = "\n".join(json.dumps(a) for a in t.input)
            expected = t.alternatives[0] if t.alternatives else t.output
            out.append({"input": inp, "output": json.dumps(expected), "testtype": "functional"})
        else:
            out.append({"input": t.input, "output": t.output, "testtype": "stdin"})
    return out


def _local_files(path: Path) -> tuple[str, list[str]]:
    """(datasets builder, files) for a local file or directory."""
    files = sorted(str(p) for p in path.rglob("*") if p.is_file()) if path.is_dir() else [str(path)]
    parquet = [f for f in files if f.endswith(".parquet")]
    if parquet:
        return "parquet", parquet
    js = [f for f in files if f.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))]
    if not js:
        raise FileNotFoundError(f"no .jsonl/.json/.parquet files under {path}")
    return "json", js


def _load_local(path: Path) -> Iterable[dict]:
    import datasets

    builder, files = _local_files(path)
    return datasets.load_dataset(builder, data_files=files, split="train")


def _row(problem: str, starter: str | None, tests: list[dict], metadata: dict, extra: dict) -> dict:
    row = {"prompt": build_code_prompt(problem, starter), "tests": tests, "metadata": metadata}
    row.update(extra)
    return row


# --------------------------------------------------------------------------- DeepCoder


def load_deepcoder(
    path_or_name: str | os.PathLike = DEEPCODER_HUB_NAME,
    split: str = "train",
    *,
    subsets: Sequence[str] | None = None,
    limit: int | None = None,
    keep_columns: Sequence[str] = (),
) -> list[dict]:
    """Load DeepCoder-format problems (``problem``, ``tests``, ``metadata``, ``starter_code``).

    Args:
        path_or_name: Hub dataset name (default ``agentica-org/DeepCoder-Preview-Dataset``)
            or a local ``.jsonl``/``.json``/``.parquet`` file or directory.
        split: ``"train"`` or ``"test"`` (Hub only; local files are one split).
        subsets: Hub configs to concatenate (default: the DeepCoder recipe's,
            ``primeintellect``/``taco``/``lcbv5`` for train, ``codeforces``/``lcbv5``
            for test).
        limit: keep at most this many rows.
        keep_columns: source columns copied to the rows unchanged (e.g. ``"solution"``).

    Rows whose tests cannot be parsed are skipped (and counted in a log line).
    """
    path = Path(os.fspath(path_or_name)).expanduser()
    sources: list[tuple[str, Iterable[dict]]] = []
    if path.exists():
        sources.append((path.stem, _load_local(path)))
    else:
        import datasets

        for subset in subsets or DEEPCODER_SUBSETS.get(split, ()):
            ds = datasets.load_dataset(str(path_or_name), name=subset, split=split)
            sources.append((subset, ds))
    rows: list[dict] = []
    skipped = 0
    for source, ds in sources:
        for item in ds:
            if limit is not None and len(rows) >= limit:
                break
            meta = _as_dict(item.get("metadata"))
            problem = item.get("problem") or item.get("question") or item.get("prompt")
            tests = parse_tests(item.get("tests") if item.get("tests") is not None else item.get("ground_truth"), meta)
            if not isinstance(problem, str) or not problem.strip() or not tests:
                skipped += 1
                continue
            starter = item.get("starter_code") or meta.get("starter_code") or None
            func_name = next((t.func_name for t in tests if t.func_name), None)
            metadata = {
                "func_name": func_name,
                "source": str(item.get("source") or source),
                "question_id": _str_or_none(item.get("question_id") or meta.get("question_id")),
                "difficulty": _str_or_none(item.get("difficulty") or meta.get("difficulty")),
                "platform": _str_or_none(item.get("platform") or meta.get("platform")),
                "contest_date": _str_or_none(item.get("contest_date") or meta.get("contest_date")),
                "starter_code": starter if isinstance(starter, str) else None,
            }
            extra = {c: item.get(c) for c in keep_columns}
            rows.append(_row(problem, metadata["starter_code"], _serialize_tests(tests), metadata, extra))
    if skipped:
        logger.warning("load_deepcoder: skipped %d rows without a problem or usable tests", skipped)
    return rows


def _str_or_none(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


# --------------------------------------------------------------------------- LiveCodeBench


class _StringsOnlyUnpickler(pickle.Unpickler):
    """Unpickler for LiveCodeBench's private tests: plain data only, no classes.

    The Hub data is untrusted; refusing every global means a crafted pickle
    cannot execute code.
    """

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from test data")


def decode_lcb_private_tests(raw: Any) -> list[dict]:
    """Decode ``private_test_cases``: JSON, or base64(zlib(pickle(JSON string))).

    Returns ``[]`` (and logs) if the value cannot be decoded safely.
    """
    if isinstance(raw, list):
        return raw
    if not isinstance(raw, str) or not raw.strip():
        return []
    try:
        value = json.loads(raw)
        return value if isinstance(value, list) else []
    except ValueError:
        pass
    try:
        blob = zlib.decompress(base64.b64decode(raw.encode("ascii")))
        try:
            value = json.loads(blob)
        except ValueError:
            value = _StringsOnlyUnpickler(io.BytesIO(blob)).load()
            if isinstance(value, (bytes, bytearray)):
                value = value.decode("utf-8")
            if isinstance(value, str):
                value = json.loads(value)
        return value if isinstance(value, list) else []
    except Exception as exc:  # malformed or hostile data: drop, never execute
        logger.warning("could not decode LiveCodeBench private tests: %s", exc)
        return []


def load_livecodebench(
    name: str | os.PathLike = LIVECODEBENCH_HUB_NAME,
    *,
    version_tag: str = "release_v5",
    start_date: str | None = None,
    end_date: str | None = None,
    platform: str | None = None,
    difficulty: str | None = None,
    include_private: bool = True,
    limit: int | None = None,
) -> list[dict]:
    """Load LiveCodeBench code-generation problems.

    Args:
        name: Hub dataset (default ``livecodebench/code_generation_lite``; its
            JSONL shards for ``version_tag`` are read through ``hf://`` with
            :func:`datasets.load_dataset`, which needs no loading script) or a
            local file/directory in the same format.
        version_tag: ``release_v1`` … ``release_v6``, ``release_latest``, ``vN`` or
            ``vN_vM`` (Hub only).
        start_date, end_date: keep problems with ``start_date <= contest_date <=
            end_date`` (ISO dates, inclusive).
        platform: ``leetcode``/``atcoder``/``codeforces`` filter.
        difficulty: ``easy``/``medium``/``hard`` filter.
        include_private: also use the hidden tests (as the benchmark does).
        limit: keep at most this many rows (after filtering).
    """
    import datasets

    path = Path(os.fspath(name)).expanduser()
    if path.exists():
        ds = _load_local(path)
    else:
        if version_tag not in LCB_VERSION_FILES:
            raise ValueError(f"unknown LiveCodeBench version_tag {version_tag!r}; known: {sorted(LCB_VERSION_FILES)}")
        files = [f"hf://datasets/{name}/{f}" for f in LCB_VERSION_FILES[version_tag]]
        ds = datasets.load_dataset("json", data_files=files, split="train")
    rows: list[dict] = []
    for item in ds:
        date = str(item.get("contest_date") or "")
        if start_date and date[: len(start_date)] < start_date:
            continue
        if end_date and date[: len(end_date)] > end_date:
            continue
        if platform and str(item.get("platform", "")).lower() != platform.lower():
            continue
        if difficulty and str(item.get("difficulty", "")).lower() != difficulty.lower():
            continue
        meta = _as_dict(item.get("metadata"))
        raw = _as_list(item.get("public_test_cases"))
        if include_private:
            raw = raw + decode_lcb_private_tests(item.get("private_test_cases"))
        tests = parse_tests(raw, meta)
        content = item.get("question_content")
        if not tests or not isinstance(content, str):
            continue
        starter = item.get("starter_code") or None
        metadata = {
            "func_name": next((t.func_name for t in tests if t.func_name), None),
            "source": "livecodebench",
            "question_id": _str_or_none(item.get("question_id")),
            "difficulty": _str_or_none(item.get("difficulty")),
            "platform": _str_or_none(item.get("platform")),
            "contest_date": _str_or_none(item.get("contest_date")),
            "starter_code": starter if isinstance(starter, str) else None,
        }
        rows.append(_row(content, metadata["starter_code"], _serialize_tests(tests), metadata, {}))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def _as_list(value: Any) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, str) and value.strip():
        try:
            parsed = json.loads(value)
        except ValueError:
            return []
        return parsed if isinstance(parsed, list) else []
    return []
