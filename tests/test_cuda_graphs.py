"""train.cuda_graphs: the refusals on CPU and the eager-fallback decisions (capture needs a GPU)."""

from __future__ import annotations

import pytest
import torch

from distdrgn.config import load_config
from distdrgn.cuda_graphs import GraphedStep, check_cuda_graphs, cuda_graphs_unsupported_reason
from distdrgn.errors import DistdrgnError


def test_cuda_graphs_on_cpu_is_a_config_error():
    assert load_config(None, []).train.cuda_graphs is False
    with pytest.raises(DistdrgnError, match="train.cuda_graphs=true needs a CUDA device"):
        load_config(None, ["train.cuda_graphs=true", "train.device=cpu"])


def test_start_up_check_names_the_reason():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    with pytest.raises(DistdrgnError, match="needs a CUDA device .this run is on cpu"):
        check_cuda_graphs(cpu, "ddp", 1)
    assert "not train.engine=deepspeed" in cuda_graphs_unsupported_reason(cuda, "deepspeed", 1)
    assert "2 processes" in cuda_graphs_unsupported_reason(cuda, "ddp", 2)
    assert cuda_graphs_unsupported_reason(cuda, "ddp", 1) is None
    with pytest.raises(DistdrgnError, match="needs a CUDA device"):
        GraphedStep(lambda *a: None, 16, cpu)


class _Batch:
    def __init__(self, n):
        self.indices = torch.arange(n)


def test_eager_decisions():
    """The ragged last batch runs eagerly, and so do the warm-up steps; full batches after
    the warm-up are captured (decided without a GPU: no step is run)."""
    graphed = GraphedStep.__new__(GraphedStep)  # the decisions only; __init__ refuses a CPU device
    graphed.batch_size, graphed.warmup, graphed.graph, graphed.eager_steps = 16, 2, None, 0
    assert graphed.runs_eagerly(_Batch(16)) and graphed.runs_eagerly(_Batch(5))
    graphed.eager_steps = 2
    assert not graphed.runs_eagerly(_Batch(16)) and graphed.runs_eagerly(_Batch(5))
    graphed.graph = object()
    assert not graphed.runs_eagerly(_Batch(16)) and graphed.runs_eagerly(_Batch(15))
