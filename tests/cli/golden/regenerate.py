"""Regenerate the golden files of the CLI tests (review the diff before committing).

    python tests/cli/golden/regenerate.py

* ``<command>_keys.json``: the key sets of each command's ``--json`` document, by path
  (values are not part of the contract; keys are). ``$`` is the top level, ``$.x[]`` the
  items of list ``x``. Free-form maps (an EP layer's ``config``) are not descended into.
* ``onnx_ops_<sample>.json``: the operator types of the exported ONNX graph, in order.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import conftest as helpers  # noqa: E402  (tests/cli/conftest.py: the same helpers the tests use)


def _write(name: str, value: object) -> None:
    (HERE / name).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    print(f"wrote {HERE / name}")


def _run_json(*args: object) -> dict:
    run = helpers.invoke_app(*args, "--json")
    assert run.returncode == 0, run.describe()
    return helpers.parse_one_json(run.stdout)


def main() -> None:
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        samples = helpers.copy_samples(directory)
        _write(
            "collapse_keys.json",
            helpers.key_schema(_run_json("collapse", samples.mlp, "-o", directory / "c.safetensors")),
        )
        _write("verify_keys.json", helpers.key_schema(_run_json("verify", samples.mlp)))
        _write("inspect_keys.json", helpers.key_schema(_run_json("inspect", samples.cnn)))
        export = _run_json(
            "export", samples.mlp, "--onnx", directory / "m.onnx", "--safetensors", directory / "m.safetensors"
        )
        _write("export_keys.json", helpers.key_schema(export))
        compress = _run_json("compress", samples.mlp, "-o", directory / "small.safetensors", "--max-error", "0.5")
        _write("compress_keys.json", helpers.key_schema(compress))
        for stem, source in samples.by_name.items():
            target = directory / f"{stem}.onnx"
            _run_json("export", source, "--onnx", target)
            _write(f"onnx_ops_{stem}.json", [node.op_type for node in onnx.load(str(target)).graph.node])


if __name__ == "__main__":
    main()
