"""``--model module:function`` finds the user's module in the directory epcli runs from, as ``python -m`` does."""

from __future__ import annotations

from pathlib import Path


def test_factory_module_is_found_in_the_working_directory(custom_model, run_epcli, json_doc):
    """Also the installed script's verify of a custom model with a factory (a factory found on PYTHONPATH by a real
    process: tests/cli/test_foreign.py and tests/cli/test_user_code.py)."""
    run = run_epcli(
        "verify", custom_model.path, "--model", custom_model.factory, "--samples", "8", "--json", cwd=custom_model.dir
    )
    assert run.returncode == 0, run
    document = json_doc(run.stdout)  # the whole model was built by the factory and compared
    assert [(c["name"], c["scope"]) for c in document["comparisons"]] == [("body", "layer"), ("<model>", "model")]


def test_elsewhere_the_error_names_the_working_directory(custom_model, run_epcli, flat, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = run_epcli("verify", custom_model.path, "--model", custom_model.factory, cwd=elsewhere)
    assert run.returncode == 3, run
    message = flat(run.stderr)
    assert f"cannot import module {custom_model.module!r}" in message
    assert str(elsewhere) in message and "PYTHONPATH" in message
