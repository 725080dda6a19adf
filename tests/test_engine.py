import pytest
import torch

from rockcls.training.engine import (
    NonFiniteLoss,
    StepSettings,
    cosine_with_warmup,
    train_one_epoch,
)
from rockcls.training.memory import HardNegativeMemory

SETTINGS = StepSettings(device=torch.device("cpu"), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                        accumulation_steps=2)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))


def batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 255, (4, 3, 4, 4), dtype=torch.uint8, generator=g), torch.tensor([0, 1, 0, 1]),
             torch.arange(4) + 4 * i) for i in range(n)]


def test_steps_count_accumulation_and_feed_the_memory():
    model, memory = tiny_model(), HardNegativeMemory(capacity=100, num_samples=20)
    out = train_one_epoch(model, batches(5), torch.optim.SGD(model.parameters(), lr=0.1), SETTINGS,
                          lr_at=lambda step: 0.1, start_step=3, memory=memory)
    assert out["steps"] == 3 + 3  # 5 micro-batches, accumulation 2: two full steps and a trailing one
    assert out["images"] == 20 and out["train_loss"] > 0
    assert set(memory.ids()) <= set(range(20)) and len(memory) > 0  # misclassified samples were stored


def test_nan_loss_stops_training_with_a_clear_error():
    model = tiny_model()
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 0"):
        train_one_epoch(model, batches(2), torch.optim.SGD(model.parameters(), lr=0.1), SETTINGS,
                        lr_at=lambda step: 0.1, start_step=0)


def test_cosine_schedule_warms_up_then_decays():
    lr_at = cosine_with_warmup(base_lr=1.0, total_steps=100, warmup_steps=10)
    assert lr_at(0) == pytest.approx(0.1) and lr_at(9) == pytest.approx(1.0)
    assert lr_at(10) == pytest.approx(1.0) and lr_at(99) < 0.02
    assert all(lr_at(k) >= lr_at(k + 1) for k in range(10, 99))


@pytest.fixture
def two_threads():
    """The tolerances below hold with 2 to 8 intra-op threads; with one (tests/conftest.py sets
    OMP_NUM_THREADS=1) the conv_stem gradient is summed in another order and 1 of its 648 values
    differs by 1.3e-4."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_channels_last_on_the_cpu_gives_the_same_logits_and_training_step(two_threads):
    import timm

    from rockcls.training.device import use_channels_last
    from rockcls.training.engine import prepare_batch

    cpu = torch.device("cpu")
    assert use_channels_last(cpu) and use_channels_last(torch.device("cuda")) and not use_channels_last(
        torch.device("mps"))
    x = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = {}
    for nhwc in (False, True):
        torch.manual_seed(0)
        model = timm.create_model("test_efficientnet", num_classes=3)
        if nhwc:
            model = model.to(memory_format=torch.channels_last)
        s = StepSettings(device=cpu, mean=(0.5,) * 3, std=(0.25,) * 3, channels_last=nhwc)
        xn = prepare_batch(x, s)
        assert xn.is_contiguous(memory_format=torch.channels_last) == nhwc
        loss = torch.nn.functional.cross_entropy(model(xn), torch.tensor([0, 1, 2, 0]))
        loss.backward()
        model.eval()
        with torch.inference_mode():
            out[nhwc] = (model(xn), model.conv_stem.weight.grad.clone())
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("env, expected", [({}, "True"), ({"ROCKCLS_MALLOC_TUNING": "0"}, "False"),
                                           ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "False")])
def test_allocator_tuning_is_applied_once_and_can_be_turned_off(env, expected):
    import ctypes.util
    import os
    import subprocess
    import sys

    if sys.platform != "linux" or not ctypes.util.find_library("c"):
        pytest.skip("glibc only")
    code = ("from rockcls.training.device import keep_freed_memory as k; a = k(); b = k(); "
            "assert a == b; print(a)")
    child_env = {k: v for k, v in os.environ.items() if k not in ("ROCKCLS_MALLOC_TUNING", "LD_PRELOAD")}
    code = f"import os; os.environ.update({env!r}); " + code  # set after start: nothing is really preloaded
    out = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
