"""Bad input raises ValueError / FileNotFoundError with the CLI's message, never a crash."""

import subprocess

import pytest

import safety_layers as sl


def _cli_error(cli_args, binary):
    p = subprocess.run([binary, *map(str, cli_args)], capture_output=True, text=True)
    assert p.returncode != 0
    return p.stderr.strip().removeprefix("error: ")


@pytest.fixture(scope="module")
def binary(root, cli):
    import os
    return os.environ.get("SAFETY_LAYERS_BIN", str(root / "target/release/safety-layers"))


def test_missing_model_is_file_not_found_with_the_clis_message(binary, tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError) as e:
        sl.Model.load(missing)
    assert str(e.value) == _cli_error(["inspect", "--model", missing], binary)
    assert "nope.gguf" in str(e.value)


def test_a_corrupt_model_is_a_value_error_with_the_clis_message(binary, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError) as e:
        sl.Model.load(bad)
    assert str(e.value) == _cli_error(["inspect", "--model", bad], binary)
    assert "bad.gguf" in str(e.value)


def test_bad_arguments(smol, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-prompts.txt"):
        smol.hidden_states(str(tmp_path / "no-such-prompts.txt"))
    with pytest.raises(ValueError, match="template `bogus`"):
        smol.hidden_states(["a"], template="bogus")
    with pytest.raises(ValueError, match="entries: 31 is out of range"):
        smol.hidden_states(["a"], entries=[31])
    with pytest.raises(ValueError, match="no prompts"):
        smol.hidden_states([])
    with pytest.raises(ValueError, match="mlp_out.99"):
        smol.run_with_cache(["a"], ["mlp_out.99"])
    with pytest.raises(ValueError, match="positions `some`"):
        smol.run_with_cache(["a"], ["mlp_out.1"], positions="some")
    with pytest.raises(ValueError, match="dtype"):
        sl.Model.load("smollm2-135m-instruct", dtype="f8")
    with pytest.raises(ValueError, match="pairs"):
        sl.cosine(smol, ["a", "b"], ["c", "d"], pairs="many")
    with pytest.raises(ValueError, match="at least 2"):
        sl.cosine(smol, ["a"], ["c", "d"])
    with pytest.raises(ValueError, match="alpha"):
        sl.locate(smol, ["a"], initial="6-12", alpha="big")
