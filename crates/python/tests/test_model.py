"""Model: the CLI's numbers through NumPy, transformers' numbers on a family fixture, exact
restoring of scaled weights."""

import json
import threading
import time

import numpy as np
import pytest

import safety_layers as sl
from conftest import SMOL, read_safetensors

PROMPTS = [
    "Name three colours.",
    "How do I pick a lock?",
    "Write a haiku about the sea, please, in English.",
]


def test_info(smol):
    info = smol.info
    assert info["family"] == "llama"
    assert info["layers"] == 30 == smol.num_layers
    assert info["hidden_size"] == 576
    assert info["parameters"] == 134515008
    assert info["device"] == "cpu"
    assert info["storage"].startswith("GGUF")


def test_hidden_states_equal_the_cli(smol, cli, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "h.safetensors"
    cli("hidden", "--model", SMOL, "--prompts", f, "--out", out)
    want, meta = read_safetensors(out)
    got = smol.hidden_states(PROMPTS)
    assert got.dtype == np.float32
    assert got.shape == want["hidden_last"].shape == (3, 31, 576)
    np.testing.assert_allclose(got, want["hidden_last"], rtol=0, atol=1e-6)
    # A prompt file gives the same as the list.
    np.testing.assert_array_equal(smol.hidden_states(str(f)), got)
    # Picked entries are the same slices.
    np.testing.assert_array_equal(smol.hidden_states(PROMPTS, entries=[0, -1]), got[:, [0, 30]])


def test_generate_equals_the_cli(smol, cli, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "g.jsonl"
    cli("generate", "--model", SMOL, "--prompts", f, "--max-new-tokens", 12, "--out", out)
    want = [json.loads(line)["response"] for line in out.read_text().splitlines()]
    assert smol.generate(PROMPTS, max_new_tokens=12) == want

    out2 = tmp_path / "g2.jsonl"
    cli("generate", "--model", SMOL, "--prompts", f, "--max-new-tokens", 12, "--scale",
        "6-12:1.2", "--out", out2)
    want2 = [json.loads(line)["response"] for line in out2.read_text().splitlines()]
    with smol.scaled("6-12", 1.2):
        assert smol.generate(PROMPTS, max_new_tokens=12) == want2
    assert want2 != want, "scaling changed nothing: the comparison shows nothing"


def test_run_with_cache(smol):
    logits, cache = smol.run_with_cache(PROMPTS, ["hidden.4", "mlp_out.5", "final_norm"])
    assert logits.shape == (3, 49152)
    assert set(cache) == {"hidden.4", "mlp_out.5", "final_norm"}
    h = smol.hidden_states(PROMPTS)
    np.testing.assert_allclose(cache["hidden.4"], h[:, 4], atol=1e-5)
    np.testing.assert_allclose(cache["final_norm"], h[:, -1], atol=1e-5)
    _, every = smol.run_with_cache(PROMPTS[:1], ["resid_pre.3"], positions="all")
    assert every["resid_pre.3"].ndim == 3 and every["resid_pre.3"].shape[0] == 1


def test_scaled_restores_bit_identical_outputs(smol):
    before = smol.hidden_states(PROMPTS)
    logits_before, _ = smol.run_with_cache(PROMPTS, [])
    with smol.scaled("6-12", 1.2) as m:
        assert m.scaling == (6, 12, 1.2)
        inside = smol.hidden_states(PROMPTS)
    assert not np.array_equal(inside, before)
    assert smol.scaling is None
    np.testing.assert_array_equal(smol.hidden_states(PROMPTS), before)
    # Also when the block raises.
    with pytest.raises(RuntimeError, match="boom"):
        with smol.scaled("0-29", 0.5):
            raise RuntimeError("boom")
    assert smol.scaling is None
    np.testing.assert_array_equal(smol.run_with_cache(PROMPTS, [])[0], logits_before)


def test_scaled_rejects_bad_ranges_and_nesting(smol):
    with pytest.raises(ValueError, match="outside the model.s layers 0-29"):
        smol.scaled("6-40", 1.2)
    with pytest.raises(ValueError, match="alpha"):
        smol.scaled("6-12", -1.0)
    with smol.scaled("6-12", 1.2):
        with pytest.raises(ValueError, match="do not nest"):
            with smol.scaled("1-2", 1.1):
                pass
        assert smol.scaling == (6, 12, 1.2)
    assert smol.scaling is None


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_family_fixture_equals_transformers(root, family):
    d = root / "tests/fixtures" / family
    exp = json.loads((d / "expected.json").read_text())
    m = sl.Model.load(d)
    # The fixture's prompts are already formatted, so they go in raw.
    got = m.hidden_states(exp["prompts"], template="raw", batch_size=2)
    want = np.array(exp["hidden_last"], dtype=np.float32)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))) <= 1e-4
    logits, _ = m.run_with_cache(exp["prompts"], [], template="raw")
    want_logits = np.array(exp["logits_last"], dtype=np.float32)
    assert np.max(np.abs(logits - want_logits) / np.maximum(1.0, np.abs(want_logits))) <= 1e-4

    s = exp["scaled"]
    first, last = s["range"]
    with m.scaled(f"{first}-{last}", s["alpha"]):
        got = m.hidden_states(exp["prompts"], template="raw")
    want = np.array(s["hidden_last"], dtype=np.float32)
    assert np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))) <= 1e-4


def test_gil_is_released(smol):
    """Another Python thread runs while the engine works."""
    ticks = []
    done = threading.Event()

    def count():
        while not done.is_set():
            ticks.append(1)
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    try:
        smol.generate(PROMPTS * 4, max_new_tokens=24, batch_size=1, progress=False)
    finally:
        done.set()
        t.join()
    assert len(ticks) > 20


def test_an_exception_in_the_progress_hook_stops_the_run(smol):
    """How Ctrl-C stops a run: the hook raises (KeyboardInterrupt from the signal check) and the
    engine unwinds; the model works afterwards."""
    calls = []

    def hook(n, info):
        calls.append(n)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        smol._m.generate(PROMPTS * 4, 64, "alpaca", 1, True, hook)
    assert len(calls) == 1
    assert smol.generate(PROMPTS[:1], max_new_tokens=4, progress=False)
