"""The installed torch and torchvision work together: torchvision's compiled ops load."""

import torch
import torchvision
from torchvision.ops import nms


def test_torchvision_compiled_op_runs():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, iou_threshold=0.5).tolist() == [0, 2]
    assert torchvision.__version__.startswith("0.29.2")
