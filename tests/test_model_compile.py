"""torch.compile (inductor, CPU) of the whole model: one graph, same logits as eager."""
from __future__ import annotations

import torch

from gpt2kit.model import GPT2, GPT2Config


def test_compiled_model_matches_eager_without_graph_breaks():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_ctx=16)).eval()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break would raise
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), rtol=0, atol=1e-5)
        out, ref = compiled(ids, attention_mask=mask), model(ids, attention_mask=mask)
    real = mask.bool()
    assert (out - ref)[real].abs().max() <= 1e-5
