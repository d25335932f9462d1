"""The server in-process, for tests, benchmarks and notebooks: a background uvicorn thread
on a free loopback port, and a tiny random model to exercise it with."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch

STAND_IN_CORPUS = ["What colour is the circle?", "Describe the image.", "Is there a green square?",
                   "How many shapes are there?", "red", "blue", "green", "yes", "no", "circle", "square",
                   "a small red circle at the top left."] * 5


class BackgroundServer:
    """`with BackgroundServer(app) as s:` serves `app` at `s.url` until the block ends."""

    def __init__(self, app, start_timeout_s: float = 30.0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this; without it replies wait on delayed ACKs (~40 ms each).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.timeout = start_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.timeout)
        self.sock.close()


def stand_in_model(out: str | Path) -> Path:
    """A tiny random Stage 2 checkpoint whose answers always run to max_tokens.

    Its end-of-turn logit is pinned at 0 (that row of the LM head is zero) while the other
    random logits' maximum is positive, so greedy answers never end early.
    """
    from vlmkit.checkpoint import save_checkpoint
    from vlmkit.config import VLMConfig
    from vlmkit.data.images import ImageTransform
    from vlmkit.data.lm_tokenizer import LMTokenizer
    from vlmkit.models.vlm import VisionLanguageModel

    tokenizer = LMTokenizer.train(STAND_IN_CORPUS, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    cfg = VLMConfig.from_dict({
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 4, "mlp_dim": 64},
        "decoder": {"vocab_size": tokenizer.vocab_size, "width": 48, "depth": 2, "heads": 6, "kv_heads": 2,
                    "mlp_dim": 96, "max_positions": 160, "tie_embeddings": False, "init_std": 0.2},
        "image_token_id": tokenizer.image_id,
    })
    model = VisionLanguageModel(cfg).eval()
    with torch.no_grad():
        model.language_model.lm_head.weight[tokenizer.eos_id] = 0
    save_checkpoint(out, model, "vlm", cfg.to_dict(), tokenizer, ImageTransform(size=32).to_dict())
    return Path(out)
