"""fastjepa/utils/logging.py, the twin of the reference's src/utils/logging.py: the CSV file
byte for byte, AverageMeter's arithmetic, grad_logger's norms against a per-tensor loop,
and gpu_timer without CUDA."""

import pytest
import torch
from torch import nn

from fastjepa.utils.logging import AverageMeter, CSVLogger, gpu_timer, grad_logger


def test_csv_logger_writes_the_reference_file_and_appends_a_header_on_resume(tmp_path):
    path = tmp_path / "log.csv"
    columns = (("%d", "epoch"), ("%d", "itr"), ("%.5f", "loss"), ("%.5f", "mask-A"), ("%d", "time (ms)"))
    logger = CSVLogger(path, *columns)
    assert logger.fname == path and logger.types == ["%d", "%d", "%.5f", "%.5f", "%d"]
    logger.log(1, 0, 0.123456789, 12.0, 345.7)
    logger.log(1, 10, 2.5, 7, 9)
    CSVLogger(path, *columns).log(2, 0, float("nan"), -1.0, 0)  # a resumed run: a second header
    assert path.read_bytes() == (
        b"epoch,itr,loss,mask-A,time (ms)\n"
        b"1,0,0.12346,12.00000,345\n"
        b"1,10,2.50000,7.00000,9\n"
        b"epoch,itr,loss,mask-A,time (ms)\n"
        b"2,0,nan,-1.00000,0\n"
    )


def test_csv_logger_refuses_a_row_of_the_wrong_length(tmp_path):
    logger = CSVLogger(tmp_path / "log.csv", ("%d", "a"), ("%d", "b"))
    with pytest.raises(ValueError, match="3 values for 2 columns"):
        logger.log(1, 2, 3)
    assert (tmp_path / "log.csv").read_text() == "a,b\n"


def test_average_meter_arithmetic():
    meter = AverageMeter()
    assert (meter.val, meter.avg, meter.sum, meter.count, meter.max, meter.min) == (0, 0, 0, 0, float("-inf"), float("inf"))
    meter.update(2.0)
    meter.update(5.0, n=3)
    meter.update(-1.0)
    assert meter.val == -1.0 and meter.sum == 16.0 and meter.count == 5 and meter.avg == 3.2
    assert meter.max == 5.0 and meter.min == -1.0
    meter.reset()
    assert (meter.sum, meter.count, meter.max, meter.min) == (0, 0, float("-inf"), float("inf"))


def test_average_meter_keeps_max_and_min_when_a_value_does_not_compare():
    meter = AverageMeter()
    meter.update(3.0)
    meter.update(torch.tensor([1.0, 9.0]))  # max() of a 2-element tensor raises: swallowed, as the reference
    assert meter.max == 3.0 and meter.min == 3.0 and meter.count == 2
    torch.testing.assert_close(meter.sum, torch.tensor([4.0, 12.0]))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)  # weight counted, bias not
        self.norm = nn.LayerNorm(6)  # 1-D weight and bias: not counted
        self.blocks = nn.ModuleList([nn.ModuleDict({"qkv": nn.Linear(6, 18), "proj": nn.Linear(18, 6)}) for _ in range(2)])
        self.scale = nn.Parameter(torch.ones(1, 6))  # 2-D, no bias name: counted
        self.unused = nn.Linear(6, 6)  # no grad: not counted

    def forward(self, x):
        x = self.norm(self.embed(x))
        for block in self.blocks:
            x = x + block["proj"](block["qkv"](x))
        return (x * self.scale).square().sum()


def test_grad_logger_equals_a_per_tensor_norm_loop():
    torch.manual_seed(0)
    model = Tiny()
    model(torch.randn(5, 4)).backward()
    expected = [(n, float(torch.norm(p.grad))) for n, p in model.named_parameters()
                if p.grad is not None and not n.endswith(".bias") and p.dim() > 1]
    assert [n for n, _ in expected] == ["scale", "embed.weight", "blocks.0.qkv.weight", "blocks.0.proj.weight",
                                        "blocks.1.qkv.weight", "blocks.1.proj.weight"]
    stats = grad_logger(model.named_parameters())
    norms = [v for _, v in expected]
    assert stats.count == len(norms) and stats.val == norms[-1]
    assert stats.max == max(norms) and stats.min == min(norms)
    total = 0.0
    for v in norms:
        total += v
    assert stats.sum == total and stats.avg == total / len(norms)
    assert stats.first_layer == norms[2] and stats.last_layer == norms[4] and stats.first_layer != stats.last_layer


def test_grad_logger_reads_the_norms_back_once(monkeypatch):
    model = Tiny()
    model(torch.randn(5, 4)).backward()
    calls = {"item": 0, "float": 0, "tolist": 0}
    real_tolist = torch.Tensor.tolist

    def counting(name, real):
        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            return real(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch.Tensor, "tolist", counting("tolist", real_tolist))
    monkeypatch.setattr(torch.Tensor, "item", counting("item", torch.Tensor.item))
    monkeypatch.setattr(torch.Tensor, "__float__", counting("float", torch.Tensor.__float__))
    grad_logger(model.named_parameters())
    assert calls == {"item": 0, "float": 0, "tolist": 1}


def test_grad_logger_without_qkv_or_grads():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    stats = grad_logger(model.named_parameters())  # no grads yet
    assert stats.count == 0 and stats.first_layer == 0.0 and stats.last_layer == 0.0
    model(torch.randn(2, 3)).sum().backward()
    stats = grad_logger(model.named_parameters())
    assert stats.count == 2 and stats.first_layer == 0.0 and stats.last_layer == 0.0
    assert stats.val == float(torch.norm(model[1].weight.grad))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_gpu_timer_without_cuda_returns_minus_one():
    assert gpu_timer(lambda: 7) == (7, -1.0)
    assert gpu_timer(lambda: "x", log_timings=False) == ("x", -1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_timer_times_a_cuda_closure():
    x = torch.randn(1024, 1024, device="cuda")
    result, elapsed = gpu_timer(lambda: x @ x)
    assert result.shape == (1024, 1024) and elapsed > 0
    assert gpu_timer(lambda: 1, log_timings=False) == (1, -1.0)
