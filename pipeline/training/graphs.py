"""Training steps replayed from CUDA graphs (`trainer.cuda_graph=true`).

A small network's GPU step is bound by launching its kernels, one by one, from Python: a CUDA
graph launches all of a step's at once. Each batch shape (and input height: multi-size
training draws one per batch) gets its graph the first time it comes, captured as PyTorch
documents it: a few warm-up steps on a side stream, then the capture; every later batch of
that shape is copied into the graph's input buffers and replayed. What a graph holds: the
augmentation, forward and backward pass and the epoch's sums; the optimizer steps after it,
eagerly, as one fused kernel, so that Lightning counts its steps, schedulers set its learning
rate and checkpoints hold its state as without graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# PyTorch's examples warm a step up three times before capturing it
WARMUP_STEPS = 3
# images, labels, height -> the loss
Step = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    images: torch.Tensor  # the graph's input buffers
    labels: torch.Tensor
    loss: torch.Tensor  # its output, rewritten by each replay


class GraphedSteps:
    """`step` (forward and backward into the parameters' gradients, which it zeroes first, so
    that every graph writes the same gradient tensors) as one CUDA graph per batch shape and
    height. The warm-up leaves no trace: its gradients are zeroed by the captured step, and
    `module`'s buffers (batch norm's running statistics, the epoch's sums) are put back as
    they were."""

    def __init__(self, step: Step, module: nn.Module) -> None:
        self.step, self.module = step, module
        self.graphs: dict[tuple[tuple[int, ...], int], Captured] = {}

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, height: int) -> torch.Tensor:
        """The loss of a step on this batch at `height`, its gradients in the parameters."""
        key = (tuple(images.shape), height)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self.capture(images, labels, height)
        captured.images.copy_(images)
        captured.labels.copy_(labels)
        captured.graph.replay()
        return captured.loss

    def capture(self, images: torch.Tensor, labels: torch.Tensor, height: int) -> Captured:
        inputs = images.clone(), labels.clone()
        buffers = [buffer.detach().clone() for buffer in self.module.buffers()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.step(*inputs, height)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for buffer, saved in zip(self.module.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = self.step(*inputs, height)
        return Captured(graph, *inputs, loss)
