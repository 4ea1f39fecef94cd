"""The tutorials' PyTorch programs, written as the tutorials write them.

Each runs in the dtype it is given (float32 as written, or float64) and
returns plain NumPy values. torch is imported by the caller's first use only.
"""

from __future__ import annotations

import numpy as np

from chainrule.interop import import_torch

LR = 0.01  # torch.optim.SGD(model.parameters(), lr=0.01)
STEPS = 10  # length of the recorded training trajectory
SEED = 0  # torch.manual_seed(SEED) before building the model and the batch


def _pin_precision(torch) -> None:
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def linear(dtype: str) -> dict[str, float]:
    """01-backpropagation-notebook: `w=1, x=1, y=2`, `loss=(w*x-y)**2`; w.grad is -2."""
    torch = import_torch()
    dt = getattr(torch, dtype)
    x = torch.tensor(1.0, dtype=dt)
    y = torch.tensor(2.0, dtype=dt)
    w = torch.tensor(1.0, dtype=dt, requires_grad=True)
    y_hat = w * x  # Function: y_hat = w * x
    loss = (y_hat - y) ** 2  # Loss: (y_hat - y)**2
    loss.backward()  # Compute gradients
    return {"loss": loss.item(), "dw": w.grad.item()}


def relu(dtype: str) -> dict[str, float]:
    """03-implementing-backpropagation: x -> [*w1] -> ReLU -> [*w2] -> y, squared error."""
    torch = import_torch()
    dt = getattr(torch, dtype)
    x = torch.tensor([2.0], dtype=dt, requires_grad=True)
    w1 = torch.tensor([0.5], dtype=dt, requires_grad=True)
    w2 = torch.tensor([1.5], dtype=dt, requires_grad=True)
    z1 = w1 * x
    a1 = torch.relu(z1)
    y = w2 * a1
    target = torch.tensor([3.0], dtype=dt)
    loss = (y - target) ** 2
    loss.backward()
    return {"loss": loss.item(), "dw1": w1.grad.item(), "dw2": w2.grad.item(), "dx": x.grad.item()}


def mlp(dtype: str) -> dict:
    """03-implementing-backpropagation: Sequential(Linear(10,5), ReLU(), Linear(5,1)), MSELoss,
    SGD(lr=0.01), a batch of 32; the tutorial's `train_step`, run STEPS times on the batch.

    The model and batch are created in float32 exactly as the tutorial does (after
    `torch.manual_seed(SEED)`); for float64 they are then converted with `.double()`,
    so both dtypes start from the same numbers.

    Returns the initial state_dict and batch (NumPy), the first step's loss,
    gradients and updated weights, and the loss of every step.
    """
    torch = import_torch()
    nn = torch.nn
    _pin_precision(torch)
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1))
    x = torch.randn(32, 10)  # 32 samples, 10 features
    y = torch.randn(32, 1)  # True values
    model = model.to(getattr(torch, dtype))
    x, y = x.to(getattr(torch, dtype)), y.to(getattr(torch, dtype))
    criterion = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    numpy = lambda t: t.detach().cpu().numpy().copy()
    initial = {name: numpy(t) for name, t in model.state_dict().items()}

    def train_step(x, y):
        # 1. Forward pass
        predictions = model(x)
        # 2. Compute loss
        loss = criterion(predictions, y)
        # 3. Backward pass (backpropagation!)
        optimizer.zero_grad()
        loss.backward()
        # 4. Update weights
        optimizer.step()
        return loss.item()

    trajectory = [train_step(x, y)]
    grads = {name: numpy(p.grad) for name, p in model.named_parameters()}
    after_step = {name: numpy(t) for name, t in model.state_dict().items()}
    trajectory += [train_step(x, y) for _ in range(STEPS - 1)]
    return {
        "initial": initial,
        "x": numpy(x),
        "y": numpy(y),
        "loss": np.asarray(trajectory[0], dtype),
        "grads": grads,
        "after_step": after_step,
        "trajectory": np.asarray(trajectory, dtype),
        "after_trajectory": {name: numpy(t) for name, t in model.state_dict().items()},
    }
