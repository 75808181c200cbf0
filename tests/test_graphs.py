from __future__ import annotations

import pytest
import torch

from train.config import load
from train.graphs import GraphedLayers, graphs_unused_because, transformer_engine_graphs
from train.model import Transformer, cross_entropy
from train.precision import Precision


class FakeGraphs:
    """Does what make_graphed_callables does to a module, without a GPU: its forward now 'replays'
    (here: runs the original, counted) and it gains reset()."""

    def __init__(self):
        self.captured_shapes, self.replays, self.resets = [], 0, 0

    def __call__(self, stack, sample):
        original = stack.forward
        self.captured_shapes.append(tuple(sample[0].shape))
        assert sample[0].requires_grad and not sample[1].requires_grad

        def replay(*args):
            self.replays += 1
            return original(*args)

        def reset():
            self.resets += 1

        stack.forward, stack.reset, stack.backward_dw = replay, reset, lambda: None
        return stack


def tiny_model():
    config = load("configs/tiny.toml")
    config.model.n_layers = 2
    torch.manual_seed(0)
    return Transformer(config.model, 300, Precision(config.precision, torch.device("cpu")), 32)


def test_training_runs_the_graphed_stack_once_captured_per_shape_and_nothing_else_does():
    graphs = FakeGraphs()
    model = tiny_model()
    plain = tiny_model()
    captured = []
    model.graphed_blocks = GraphedLayers(model.blocks, compiled=False, make_graphed=graphs,
                                         after_capture=lambda: captured.append(len(graphs.captured_shapes)))
    idx = torch.randint(0, 300, (2, 16))
    for _ in range(2):
        loss = cross_entropy(model(idx), idx)
        loss.backward()
    assert graphs.captured_shapes == [(2, 16, model.cfg.d_model)] and graphs.replays == 2
    assert captured == [1]  # the peak is reset once the capture is done, not before
    plain_loss = cross_entropy(plain(idx), idx)
    plain_loss.backward()
    assert torch.allclose(loss, plain_loss)
    assert all(torch.allclose(a.grad, 2 * b.grad, atol=1e-6) for a, b in zip(model.parameters(), plain.parameters()))

    longer = torch.randint(0, 300, (1, 32))  # the next curriculum stage: a new capture, the old one freed
    model(longer)
    assert graphs.captured_shapes[-1] == (1, 32, model.cfg.d_model) and graphs.resets == 1
    assert graphs.replays == 3

    with torch.no_grad():  # evaluation runs the blocks themselves
        model(idx)
    model.eval()
    model(idx)
    doc_lens = torch.tensor([10, 6, 16], dtype=torch.int32)
    model.train()
    model(idx, doc_lens)  # document masking: not captured
    assert graphs.replays == 3 and len(graphs.captured_shapes) == 2 and captured == [1, 2]
    assert model.state_dict().keys() == plain.state_dict().keys()  # the graphs add nothing to checkpoints


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"cuda_graphs": False}, "run.cuda_graphs = false"),
    ({"device": torch.device("cpu")}, "no GPU"),
    ({"mode": "bf16"}, "precision bf16: compiled whole"),
    ({"doc_mask": True}, "attention.doc_mask"),
    ({"world_size": 2}, "DDP"),
    ({}, None),
])
def test_when_the_stack_is_not_graphed_the_run_says_why(kwargs, reason):
    args = {"cuda_graphs": True, "device": torch.device("cuda"), "mode": "fp8", "doc_mask": False, "world_size": 1,
            **kwargs}
    said = graphs_unused_because(**args)
    assert said == reason if reason is None else said.startswith(reason)


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from train.precision import import_transformer_engine

        import_transformer_engine()  # after torch's cuDNN, as the trainer imports it
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not te_available(), reason="needs a GPU with Transformer Engine")
@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_steps_through_the_graphs_train_as_the_eager_steps_do(compiled):
    """Delayed scaling's amax history and scales update outside the graphs: the losses of a few FP8
    optimizer steps match the eager ones."""
    config = load("configs/tiny.toml")
    config.model.n_layers, config.precision.mode = 2, "fp8"
    device = torch.device("cuda")
    idx = torch.randint(0, 512, (4, 64), device=device)
    losses = {}
    for graphed in (False, True):
        precision = Precision(config.precision, device)
        torch.manual_seed(0)
        model = Transformer(config.model, 512, precision, 64).to(device)
        if graphed:
            model.graphed_blocks = GraphedLayers(model.blocks, compiled, transformer_engine_graphs(precision))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[graphed] = []
        for _ in range(4):
            with precision.autocast():
                logits = model(idx)
            loss = cross_entropy(logits, idx)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[graphed].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=2e-3)
    assert losses[True][-1] < losses[True][0]


def test_peak_memory_counts_what_cuda_graph_pools_hold_beyond_their_live_tensors(monkeypatch):
    """A graph's activations are free in its pool once captured: the allocator's peak alone misses them."""
    from train.devices import peak_memory_bytes

    segments = [{"total_size": 100, "allocated_size": 40, "segment_pool_id": (0, 0)},  # the default pool
                {"total_size": 500, "allocated_size": 20, "segment_pool_id": (1, 7)},  # a graph's pool
                {"total_size": 300, "allocated_size": 300, "segment_pool_id": (1, 7)}]
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: segments)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 1000)
    assert peak_memory_bytes(torch.device("cuda", 0)) == 1000 + 480
