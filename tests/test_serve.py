"""The policy server (pi05_fastprune.serve) against openpi's websocket protocol: the msgpack
numpy wire format, metadata, answers equal to the policy's own, the error frame, /healthz,
and the `python -m pi05_fastprune serve` command line."""

import os
import pathlib
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

# The server's packages are an extra: the GPU machine's image (bench/gpu_check collects every
# test file) has neither.
msgpack = pytest.importorskip("msgpack")
pytest.importorskip("websockets")

from websockets.sync.client import connect  # noqa: E402

from pi05_fastprune.model import Pi05, Pi05Config  # noqa: E402
from pi05_fastprune.policy import Pi05Policy  # noqa: E402
from pi05_fastprune.serve import PolicyServer, packb, unpackb  # noqa: E402

CFG = Pi05Config.dummy(vision_image_size=56, action_horizon=4, max_token_len=80, token_pruning_enabled=True,
                       token_prune_keep_tokens=20)
REPO = pathlib.Path(__file__).resolve().parents[1]


def make_obs(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": {"base_0_rgb": rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8),
                  "left_wrist_0_rgb": rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)},
        "state": rng.uniform(-1, 1, size=8).astype(np.float32),
        "prompt": "pick up the red block",
    }


def make_policy(sp_model):
    return Pi05Policy(Pi05(CFG, seed=0), sp_model, {}, num_steps=2, seed=0, action_dims=7)


def test_wire_format_is_openpi_clients():
    """Arrays and numpy scalars as openpi_client's msgpack_numpy packs them, both ways."""
    value = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.uint8(7), "text", 3, None],
             "c": {"d": np.zeros((0, 4), dtype=bool)}}
    back = unpackb(packb(value))
    assert back["a"].dtype == np.float32 and np.array_equal(back["a"], value["a"])
    assert back["b"] == [7, "text", 3, None] and type(back["b"][0]) is np.uint8
    assert back["c"]["d"].shape == (0, 4) and back["c"]["d"].dtype == bool
    # A map as the openpi client builds it by hand decodes to the array.
    raw = msgpack.packb({b"__ndarray__": True, b"data": np.array([1, 2], "<i4").tobytes(), b"dtype": "<i4",
                         b"shape": (2,)})
    assert np.array_equal(unpackb(raw), np.array([1, 2], dtype=np.int32))
    with pytest.raises(ValueError, match="complex"):
        packb(np.ones(2, dtype=np.complex64))


def test_server_answers_as_the_policy(sp_model):
    server = PolicyServer(make_policy(sp_model), "127.0.0.1", 0, metadata={"action_dims": 7})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz") as r:
            assert r.status == 200
        direct = make_policy(sp_model)  # same seed: the same noise on its first call
        with connect(f"ws://127.0.0.1:{server.port}", compression=None, max_size=None) as ws:
            assert unpackb(ws.recv()) == {"action_dims": 7}
            for seed in range(3):
                ws.send(packb(make_obs(seed)))
                out = unpackb(ws.recv())
                want = direct.infer(make_obs(seed))
                np.testing.assert_allclose(out["actions"], want["actions"], rtol=1e-6, atol=1e-6)
                assert out["actions"].shape == (4, 7) and out["kept_tokens"] == want["kept_tokens"] == 20
                timing = out["server_timing"]
                assert timing["infer_ms"] > 0 and ("prev_total_ms" in timing) == (seed > 0)
                if seed == 2:  # openpi's meaning: message 1's total includes the wait for it
                    assert timing["prev_total_ms"] >= 300
                time.sleep(0.3)
            # A bad observation: the traceback as a text frame, then the connection closes (1011).
            bad = make_obs()
            del bad["state"]
            ws.send(packb(bad))
            message = ws.recv()
            assert isinstance(message, str) and "state" in message
            with pytest.raises(Exception):
                ws.recv()
            assert ws.close_code == 1011
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_serve_command_line(sp_model, tmp_path):
    """python -m pi05_fastprune serve on a checkpoint directory with the seed's budget flag:
    it warms up, then listens, and answers a LIBERO observation as openpi's LIBERO client sends it."""
    Pi05(CFG, seed=0).save_openpi(str(tmp_path / "model.safetensors"))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pi05_fastprune", "serve", "--checkpoint", str(tmp_path), "--tokenizer",
           str(sp_model), "--no-norm-stats", "--robot", "libero", "--host", "127.0.0.1", "--port", "0",
           "--token-prune-keep-ratio", "0.25", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [proc.stdout.readline()]
        while lines[-1] and not lines[-1].startswith("[serve] port "):
            lines.append(proc.stdout.readline())
        line = lines[-1]
        assert line, "the server exited before listening:\n" + "".join(lines)
        assert any(x.startswith("[serve] warm-up inference: ") for x in lines)  # before it listens
        port = int(line.split()[2].rstrip(","))
        with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
            meta = unpackb(ws.recv())
            assert meta["pruning"]["enabled"] and meta["pruning"]["keep_ratio"] == 0.25
            assert meta["action_horizon"] == 4 and meta["action_dims"] == 7
            obs = make_obs()
            ws.send(packb({"observation/image": obs["image"]["base_0_rgb"],
                           "observation/wrist_image": obs["image"]["left_wrist_0_rgb"],
                           "observation/state": obs["state"], "prompt": obs["prompt"]}))
            out = unpackb(ws.recv())
        assert out["actions"].shape == (4, 7) and out["kept_tokens"] == 12  # ceil(0.25 * 3 cameras * 16)
    finally:
        proc.kill()
        proc.wait(timeout=10)
