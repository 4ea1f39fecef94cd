"""Writes the tutorial notebooks (outputs cleared): `python notebooks/build.py`.

One notebook per tutorial in `../shared/seeds/`, ported to JAX and chainrule,
each with its PyTorch twin run live when torch is installed. The notebooks
assert the tutorials' numbers; `tests/test_notebooks.py` executes them.
"""

from __future__ import annotations

import os
import textwrap

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(*parts: str):
    return new_code_cell("\n\n".join(textwrap.dedent(p).strip() for p in parts))


TORCH_IMPORT = """
try:
    import torch
except ImportError:  # the PyTorch twins below are skipped, the JAX cells still run
    torch = None
    print("PyTorch is not installed: the PyTorch twins are skipped.")
"""

# --- 01 -------------------------------------------------------------------------------

NB01 = [
    md("""
    # 1. Backpropagation

    Backpropagation computes the gradient of a loss with respect to the weights by the
    chain rule; gradient descent then uses it to update the weights. It is not specific
    to one framework. The original tutorial uses PyTorch; here the same example runs in
    JAX, differentiated twice: by `jax.grad` and by **chainrule** (`cr.grad`), whose
    reverse-mode rules are its own. The PyTorch cells run alongside when torch is
    installed and must agree.
    """),
    code(
        """
        import jax
        import jax.numpy as jnp
        import optax

        import chainrule as cr
        """,
        TORCH_IMPORT,
    ),
    md("""
    ## Forward pass and loss

    `y_hat = w * x` and `loss = (y_hat - y)**2` with `x = 1`, `y = 2` and the weight
    `w = 1`. In JAX the loss is a pure function of the weight and the data.
    """),
    code("""
    def loss(w, x, y):
        y_hat = w * x  # function: y_hat = w * x
        return (y_hat - y) ** 2  # loss: (y_hat - y)**2


    x, y, w = 1.0, 2.0, 1.0
    print("loss:", loss(w, x, y))
    """),
    md("""
    ## Backward pass

    PyTorch's `loss.backward()` fills `w.grad`. In JAX, `grad(loss)` is a new function
    that returns d loss / d w (with respect to the first argument).
    """),
    code("""
    dw_jax = jax.grad(loss)(w, x, y)
    dw_cr = cr.grad(loss)(w, x, y)
    print("jax.grad:", dw_jax)
    print("cr.grad: ", dw_cr)
    assert float(dw_jax) == -2.0
    assert float(dw_cr) == -2.0
    """),
    md("The PyTorch twin (the tutorial's code):"),
    code("""
    if torch is not None:
        x_t = torch.tensor(1.0)
        y_t = torch.tensor(2.0)
        w_t = torch.tensor(1.0, requires_grad=True)
        y_hat_t = w_t * x_t
        loss_t = (y_hat_t - y_t) ** 2
        print(loss_t)
        loss_t.backward()
        print(w_t.grad)
        assert w_t.grad.item() == float(dw_cr) == -2.0
    else:
        print("skipped: PyTorch is not installed")
    """),
    md("""
    ## Update the weights, and repeat

    The tutorial stops at `w.data = w.data - 0.01 * w.grad.data`. With optax the
    optimizer is a pair of pure functions (`init`, `update`); one jit-compiled step
    computes the loss and gradient with `cr.value_and_grad` and applies SGD. The fit
    drives `w` towards `y / x = 2`.
    """),
    code("""
    optimizer = optax.sgd(learning_rate=0.1)


    @jax.jit
    def train_step(w, opt_state, x, y):
        value, dw = cr.value_and_grad(loss)(w, x, y)
        updates, opt_state = optimizer.update(dw, opt_state, w)
        return optax.apply_updates(w, updates), opt_state, value


    w_fit = jnp.asarray(1.0)
    opt_state = optimizer.init(w_fit)
    for step in range(40):
        w_fit, opt_state, value = train_step(w_fit, opt_state, x, y)
        if step % 10 == 0:
            print(f"step {step:2d}  loss {float(value):.6f}  w {float(w_fit):.6f}")
    print("fitted w:", float(w_fit))
    assert abs(float(w_fit) - 2.0) < 1e-3

    # The tutorial's first update: w - 0.01 * dw = 1 - 0.01 * (-2) = 1.02
    sgd = optax.sgd(learning_rate=0.01)
    updates, _ = sgd.update(dw_cr, sgd.init(jnp.asarray(w)))
    w_next = optax.apply_updates(jnp.asarray(w), updates)
    print("after one step with lr=0.01: w =", float(w_next))
    assert abs(float(w_next) - 1.02) < 1e-6
    """),
    code("""
    if torch is not None:
        w_t = torch.tensor(1.0, requires_grad=True)
        opt_t = torch.optim.SGD([w_t], lr=0.1)
        for step in range(40):
            opt_t.zero_grad()
            loss_t = (w_t * x_t - y_t) ** 2
            loss_t.backward()
            opt_t.step()
        print("PyTorch fitted w:", w_t.item())
        assert abs(w_t.item() - float(w_fit)) < 1e-6
    else:
        print("skipped: PyTorch is not installed")
    """),
]

# --- 02 -------------------------------------------------------------------------------

NB02 = [
    md("""
    # 2. The chain rule and the computational graph

    **Chain rule.** If `y = a(x)` and `c = b(y)`, then dc/dx = dc/dy · dy/dx.

    **Computational graph.** Every operation is a node with inputs and an output. At a
    node we know the function, so its *local gradients* are easy: for `c = x * y`,
    ∂c/∂x = y and ∂c/∂y = x. Given the gradient of the loss with respect to the node's
    output (the *upstream* gradient), the chain rule gives the gradient with respect to
    each input: upstream × local.

    **Three steps.** (1) forward pass: compute every value and the loss; (2) local
    gradients at every node; (3) backward pass: from the loss back to the weights,
    multiplying upstream by local gradients.

    `cr.explain` shows all three for any function chainrule can differentiate.
    """),
    code(
        """
        import shutil

        import jax
        import jax.numpy as jnp
        from IPython.display import SVG, display

        import chainrule as cr
        """,
        TORCH_IMPORT,
    ),
    md("The chain rule on `y = x²`, `c = sin(y)`: dc/dx = cos(y) · 2x."),
    code("""
    def c_of_x(x):
        y = x**2
        return jnp.sin(y)


    x0 = 1.5
    by_hand = jnp.cos(x0**2) * 2 * x0
    print("by hand:", by_hand, " cr.grad:", cr.grad(c_of_x)(x0), " jax.grad:", jax.grad(c_of_x)(x0))
    assert jnp.allclose(cr.grad(c_of_x)(x0), by_hand)
    """),
    md("Local gradients of a multiplication node `c = x * y`: ∂c/∂x = y, ∂c/∂y = x."),
    code("""
    print(cr.explain(lambda x, y: x * y, 3.0, 4.0, argnums=(0, 1), names=["c"]))
    """),
    md("""
    ## The video's example: linear regression with a squared error

    `ŷ = w · x`, `s = ŷ - y`, `loss = s²`, with `x = 1`, `y = 2` and `w = 1`.
    Forward: ŷ = 1, s = -1, loss = 1. Local gradients: ∂loss/∂s = 2s, ∂s/∂ŷ = 1,
    ∂ŷ/∂w = x. Backward: ∂loss/∂ŷ = 2s · 1 = -2, ∂loss/∂w = -2 · x = -2.
    `x` and `y` are data, not weights: their edges are not followed.
    """),
    code("""
    def loss(w, x, y):
        y_hat = w * x
        s = y_hat - y
        return s**2


    e = cr.explain(loss, 1.0, 1.0, 2.0, names={"y_hat": "ŷ"})
    print(e)
    """),
    md("The same numbers, read from `e.rows` (backward order) and checked:"),
    code("""
    rows = {r.name: r for r in e.rows}
    # 1. forward pass
    assert float(rows["ŷ"].value) == 1.0
    assert float(rows["s"].value) == -1.0
    assert float(rows["loss"].value) == 1.0
    # 2. local gradients
    assert float(rows["loss"].edge("s").local) == -2.0  # 2s
    assert float(rows["s"].edge("ŷ").local) == 1.0
    assert float(rows["ŷ"].edge("w").local) == 1.0  # x
    # 3. backward pass
    assert float(rows["s"].upstream) == -2.0
    assert float(rows["ŷ"].upstream) == -2.0
    assert float(e.grads) == float(cr.grad(loss)(1.0, 1.0, 2.0)) == -2.0
    print("dloss/dw =", float(e.grads))
    """),
    md("In a notebook the explanation also renders as an HTML table:"),
    code("e"),
    md("""
    ## The graph

    `e.to_dot()` is the graph in Graphviz's DOT language: inputs (blue), constants
    (dashed), operations (boxes) with their values and gradients, and on each edge the
    local derivative and the gradient sent back along it. With Graphviz installed it is
    drawn here (`e.to_svg()`, `e.save("graph.png")`); otherwise paste the text into any
    Graphviz viewer.
    """),
    code("""
    print(e.to_dot())
    if shutil.which("dot"):
        display(SVG(e.to_svg()))
    else:
        print("Graphviz (the `dot` program) is not installed: showing the DOT text only.")
    """),
    md("""
    PyTorch's twin. `retain_grad()` keeps the gradients of the intermediate values
    ŷ and s, which are the upstream gradients of the table.
    """),
    code("""
    if torch is not None:
        x_t, y_t = torch.tensor(1.0), torch.tensor(2.0)
        w_t = torch.tensor(1.0, requires_grad=True)
        y_hat_t = w_t * x_t
        s_t = y_hat_t - y_t
        loss_t = s_t**2
        for t in (y_hat_t, s_t):
            t.retain_grad()
        loss_t.backward()
        print("torch: dloss/ds =", s_t.grad.item(), " dloss/dŷ =", y_hat_t.grad.item(),
              " dloss/dw =", w_t.grad.item())
        assert s_t.grad.item() == float(rows["s"].upstream)
        assert y_hat_t.grad.item() == float(rows["ŷ"].upstream)
        assert w_t.grad.item() == float(e.grads) == -2.0
    else:
        print("skipped: PyTorch is not installed")
    """),
]

# --- 03 -------------------------------------------------------------------------------

NB03 = [
    md("""
    # 3. Implementing backpropagation

    The four steps of a training step: (1) forward pass, (2) loss, (3) backward pass,
    (4) weight update. The tutorial's model is
    `nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1))` with `nn.MSELoss()`
    and `SGD(lr=0.01)` on a batch of 32. Below is a small functional port: weights have
    PyTorch's layout `(out, in)`, a layer computes `x @ W.T + b`, initialisation is
    PyTorch's uniform ±1/sqrt(fan_in), and MSE is a mean.
    """),
    code(
        """
        import jax
        import jax.numpy as jnp
        import matplotlib.pyplot as plt
        import numpy as np
        import optax

        import chainrule as cr
        """,
        TORCH_IMPORT,
    ),
    code("""
    def init_linear(rng, fan_in, fan_out):
        # PyTorch's nn.Linear init: weight and bias uniform in ±1/sqrt(fan_in)
        bound = 1 / np.sqrt(fan_in)
        return {
            "weight": jnp.asarray(rng.uniform(-bound, bound, (fan_out, fan_in)), jnp.float32),
            "bias": jnp.asarray(rng.uniform(-bound, bound, (fan_out,)), jnp.float32),
        }


    def linear(p, x):
        return x @ p["weight"].T + p["bias"]


    def model(params, x):  # nn.Sequential(Linear(10, 5), ReLU(), Linear(5, 1))
        return linear(params[1], jax.nn.relu(linear(params[0], x)))


    def mse_loss(params, x, y):  # nn.MSELoss(): the mean of the squared errors
        return jnp.mean((model(params, x) - y) ** 2)


    rng = np.random.default_rng(0)  # explicit random state (numpy's: instant on CPU)
    params = [init_linear(rng, 10, 5), init_linear(rng, 5, 1)]
    x = jnp.asarray(rng.standard_normal((32, 10)), jnp.float32)  # 32 samples, 10 features
    y = jnp.asarray(rng.standard_normal((32, 1)), jnp.float32)  # true values
    """),
    md("Steps 1 and 2, forward pass and loss; step 3, the backward pass, by both engines:"),
    code("""
    predictions = jax.jit(model)(params, x)
    loss, grads = jax.jit(cr.value_and_grad(mse_loss))(params, x, y)
    loss_ref, grads_ref = jax.jit(jax.value_and_grad(mse_loss))(params, x, y)
    print("predictions:", predictions.shape, f" loss: {float(loss):.4f}")
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for g, g_ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
    print("cr.value_and_grad agrees with jax.value_and_grad")
    """),
    md("""
    Step 4 and the complete training step: optax's SGD, compiled with `jax.jit`.
    `optimizer.zero_grad()` has no counterpart: gradients are return values, not state.
    """),
    code("""
    optimizer = optax.sgd(learning_rate=0.01)


    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = cr.value_and_grad(mse_loss)(params, x, y)  # 1-3: forward, loss, backward
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss  # 4: update


    opt_state = optimizer.init(params)
    params_1, opt_state_1, loss_0 = train_step(params, opt_state, x, y)
    print(f"Loss: {float(loss_0):.4f}")
    """),
    md("""
    The PyTorch twin, with the same weights and batch: the loss, the gradients and the
    updated weights must agree (float32: rtol 1e-5, atol 1e-6).
    """),
    code("""
    if torch is not None:
        torch_model = torch.nn.Sequential(
            torch.nn.Linear(10, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1)
        )
        with torch.no_grad():
            for layer, p in zip((torch_model[0], torch_model[2]), params):
                layer.weight.copy_(torch.tensor(np.asarray(p["weight"])))
                layer.bias.copy_(torch.tensor(np.asarray(p["bias"])))
        criterion = torch.nn.MSELoss()
        torch_opt = torch.optim.SGD(torch_model.parameters(), lr=0.01)
        x_t, y_t = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y))
        torch_opt.zero_grad()
        loss_t = criterion(torch_model(x_t), y_t)
        loss_t.backward()
        torch_grads = [(l.weight.grad, l.bias.grad) for l in (torch_model[0], torch_model[2])]
        torch_opt.step()
        print(f"PyTorch loss: {loss_t.item():.4f}")
        np.testing.assert_allclose(loss_t.item(), float(loss_0), rtol=1e-5, atol=1e-6)
        layers = (torch_model[0], torch_model[2])
        for (gw, gb), g, l, p in zip(torch_grads, grads, layers, params_1):
            np.testing.assert_allclose(gw.numpy(), g["weight"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(gb.numpy(), g["bias"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(l.weight.detach().numpy(), p["weight"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(l.bias.detach().numpy(), p["bias"], rtol=1e-5, atol=1e-6)
        print("PyTorch agrees: loss, gradients and updated weights")
    else:
        print("skipped: PyTorch is not installed")
    """),
    md("""
    ## Manual backpropagation: x → [×w1] → ReLU → [×w2] → y

    `x = 2`, `w1 = 0.5`, `w2 = 1.5`, `target = 3`. Forward: z1 = 1, a1 = relu(1) = 1,
    y = 1.5, loss = (1.5 - 3)² = 2.25. Backward:
    ∂L/∂w2 = 2(y - target) · a1 = -3 and ∂L/∂w1 = -3 · w2 · 1 · x = -9
    (and ∂L/∂x = -3 · w2 · 1 · w1 = -2.25).
    """),
    code("""
    def tiny_net(w1, w2, x, target):
        z1 = w1 * x
        a1 = jax.nn.relu(z1)
        y = w2 * a1
        return (y - target) ** 2


    value, (dw1, dw2, dx) = cr.value_and_grad(tiny_net, argnums=(0, 1, 2))(0.5, 1.5, 2.0, 3.0)
    print(f"Loss: {float(value)}")
    print(f"Gradient of w1: {float(dw1):.4f}")
    print(f"Gradient of w2: {float(dw2):.4f}")
    print(f"Gradient of x: {float(dx):.4f}")
    assert float(value) == 2.25
    assert (float(dw1), float(dw2), float(dx)) == (-9.0, -3.0, -2.25)
    ref = jax.grad(tiny_net, argnums=(0, 1, 2))(0.5, 1.5, 2.0, 3.0)
    assert [float(g) for g in ref] == [-9.0, -3.0, -2.25]
    """),
    md("Where these numbers come from, node by node:"),
    code("""
    e = cr.explain(tiny_net, 0.5, 1.5, 2.0, 3.0, argnums=(0, 1, 2), names={"tiny_net": "L"})
    print(e)
    assert float(e.row("a1").upstream) == -4.5  # ∂L/∂a1 = -3 · w2
    assert [float(g) for g in e.grads] == [-9.0, -3.0, -2.25]
    """),
    code("""
    if torch is not None:
        x_t = torch.tensor([2.0], requires_grad=True)
        w1_t = torch.tensor([0.5], requires_grad=True)
        w2_t = torch.tensor([1.5], requires_grad=True)
        y_t = w2_t * torch.relu(w1_t * x_t)
        loss_t = (y_t - torch.tensor([3.0])) ** 2
        loss_t.backward()
        print(f"PyTorch: w1 {w1_t.grad.item()}, w2 {w2_t.grad.item()}, x {x_t.grad.item()}")
        assert (w1_t.grad.item(), w2_t.grad.item(), x_t.grad.item()) == (-9.0, -3.0, -2.25)
    else:
        print("skipped: PyTorch is not installed")
    """),
    md("""
    ## Training loop

    Forward → loss → backward → update, repeated on a small regression problem whose
    targets come from a fixed linear map plus noise. The loss goes down.
    """),
    code("""
    x_train = rng.standard_normal((32, 10)).astype(np.float32)
    y_train = x_train @ rng.standard_normal((10, 1)).astype(np.float32) * 0.5
    y_train = y_train + 0.1 * rng.standard_normal((32, 1)).astype(np.float32)

    optimizer = optax.sgd(learning_rate=0.05)
    state, opt_state = params, optimizer.init(params)
    losses = []
    for step in range(300):
        state, opt_state, value = train_step(state, opt_state, x_train, y_train)
        losses.append(float(value))
    print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    assert losses[-1] < 0.5 * losses[0]

    plt.figure(figsize=(6, 3))
    plt.plot(losses)
    plt.xlabel("step")
    plt.ylabel("MSE loss")
    plt.yscale("log")
    plt.title("training with cr.value_and_grad + optax.sgd")
    plt.tight_layout()
    plt.show()
    """),
    md("""
    `cr.explain` on the MLP: arrays are summarised (dtype[shape], norm, mean, range)
    and the table fits a 100-column terminal. `names` renames nodes: the inputs are
    called after their pytree paths (`params[0]['weight']`), intermediate values
    `t1, t2, ...` unless they are assigned to a variable on their own source line.
    """),
    code("""
    short = {
        "params[0]['weight']": "W1",
        "params[0]['bias']": "b1",
        "params[1]['weight']": "W2",
        "params[1]['bias']": "b2",
        "t3": "h",
        "mse_loss": "L",
    }
    e_mlp = cr.explain(mse_loss, params, x, y, names=short)
    text = str(e_mlp)
    print(text)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert e_mlp.row("h").op == "relu"
    for g, g_ref in zip(jax.tree_util.tree_leaves(e_mlp.grads), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
    """),
]


# --- 04 -------------------------------------------------------------------------------

NB04 = [
    md("""
    # 4. Debugging gradients

    The questions people bring to a gradient are "where did this NaN come from?",
    "what is the gradient of this intermediate?" and "which layer's gradient vanishes?".
    chainrule owns its backward pass and knows the line of every node, so it answers all
    three: `check_finite=True` reports the first node whose cotangent became NaN or
    infinite, `cr.tap(h, name)` returns the gradient of an intermediate, and
    `cr.tap(h, hook=fn)` edits it on its way back (PyTorch's `register_hook`).
    """),
    code("""
    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np

    import chainrule as cr

    jax.config.update("jax_enable_x64", True)
    """),
    md("""
    ## 1. A NaN from the branch not taken

    A soft "hinge on the distance" loss: for points inside the margin the penalty is
    `sqrt(margin - d)`, outside it is 0. Written with `jnp.where`, its value is fine
    everywhere, but its gradient is NaN as soon as one point sits exactly on the margin
    or outside it: `jnp.where` differentiates *both* branches, the branch not taken gets
    a zero cotangent, and `0 × (derivative of sqrt at a negative or zero number)` is NaN.
    """),
    code("""
    def hinge_loss(w, x):
        d = x @ w
        gap = 1.0 - d
        return jnp.sum(jnp.where(gap > 0, jnp.sqrt(gap), 0.0))

    w = jnp.array([0.5, 0.5])
    x = jnp.array([[1.0, 1.0], [0.2, 0.4], [3.0, 1.0]])   # the first point is on the margin
    print("loss:", hinge_loss(w, x))
    print("jax.grad:", jax.grad(hinge_loss)(w, x))
    print("cr.grad: ", cr.grad(hinge_loss)(w, x))
    """),
    md("""
    Both engines agree: the gradient is NaN. JAX's `jax_debug_nans` would point at the
    forward `sqrt` only if the forward value were NaN, which it is not. `check_finite=True`
    watches chainrule's backward pass and stops at the first node that turns a finite
    cotangent into a NaN:
    """),
    code("""
    try:
        cr.grad(hinge_loss, check_finite=True)(w, x)
    except cr.errors.NonFiniteGradientError as err:
        report = str(err)
    print(report)
    assert "non-finite cotangent at 'sqrt'" in report
    """),
    md("""
    The report names the primitive and the line, shows that the upstream cotangent had
    zeros (the branch not taken) and that the local derivative was infinite, and suggests
    the double-`where` fix: make the argument safe on the branch not taken as well.
    """),
    code("""
    def hinge_loss_fixed(w, x):
        d = x @ w
        gap = 1.0 - d
        safe_gap = jnp.where(gap > 0, gap, 1.0)
        return jnp.sum(jnp.where(gap > 0, jnp.sqrt(safe_gap), 0.0))

    g = cr.grad(hinge_loss_fixed, check_finite=True)(w, x)
    print("fixed gradient:", g)
    np.testing.assert_allclose(g, jax.grad(hinge_loss_fixed)(w, x), rtol=1e-12)
    assert np.all(np.isfinite(g))
    """),
    md("""
    The same check works under `jax.jit`: the compiled program raises the same report
    when it runs (through a `jax.debug.callback`). `cr.explain` shows it too, under the
    chain-rule table:
    """),
    code("""
    print(cr.explain(lambda gap: jnp.where(gap > 0, jnp.sqrt(gap), 0.0), 0.0))
    """),
    md("""
    ## 2. A vanishing gradient, layer by layer

    A deep MLP with sigmoid activations: the derivative of the sigmoid is at most 1/4, so
    the gradient shrinks at every layer on its way back. Mark each layer's activation
    with a tap and ask for the taps: the cotangent of every hidden layer, in one backward
    pass, without changing the loss's signature (with `jax.grad` you would add a zero
    "perturbation" argument per layer by hand).
    """),
    code("""
    depth, width = 12, 16
    keys = jax.random.split(jax.random.PRNGKey(0), depth + 1)
    layers = [jax.random.normal(k, (width, width)) / np.sqrt(width) for k in keys[:depth]]
    x = jax.random.normal(keys[-1], (32, width))

    def deep_net(layers, x, activation):
        h = x
        for i, w in enumerate(layers):
            h = cr.tap(activation(h @ w), f"layer {i + 1}")
        return jnp.mean(h ** 2)

    norms = {}
    for name, act in [("sigmoid", jax.nn.sigmoid), ("relu", jax.nn.relu)]:
        _, grads, taps = cr.value_and_grad(deep_net, taps=True)(layers, x, act)
        norms[name] = [float(jnp.linalg.norm(taps[f"layer {i + 1}"])) for i in range(depth)]
        # the taps are what jax.grad gives for zero perturbations at each layer
        def perturbed(eps):
            h = x
            for i, w in enumerate(layers):
                h = act(h @ w) + eps[i]
            return jnp.mean(h ** 2)
        want = jax.grad(perturbed)([jnp.zeros((32, width))] * depth)
        for i in range(depth):
            np.testing.assert_allclose(taps[f"layer {i + 1}"], want[i], rtol=1e-10, atol=1e-14)

    ratio = norms["sigmoid"][0] / norms["sigmoid"][-1]
    print(f"sigmoid: the first layer's cotangent is {ratio:.1e} times the last layer's")
    assert ratio < 1e-3
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in norms.items():
        ax.semilogy(range(1, depth + 1), values, marker="o", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("‖∂loss/∂activation‖")
    ax.set_title("gradient flow through a 12-layer MLP")
    ax.legend()
    plt.show()
    """),
    md("""
    The taps work under `jax.jit` and `jax.vmap` like any output: per-example gradients
    of an intermediate are `jax.vmap(cr.grad(loss, taps=True))`. A tap that nothing
    collects is the value itself: it adds nothing to a compiled program.

    ## 3. Hooks: edit a cotangent on its way back

    `cr.tap(h, hook=fn)` applies `fn` to the cotangent of `h` in the backward pass, like
    PyTorch's `register_hook`. Here a hook clips the gradient flowing into the last layer,
    and gives the same numbers as a hand-written `jax.custom_vjp` that does the same.
    """),
    code("""
    def clipped_net(layers, x):
        h = x
        for i, w in enumerate(layers):
            h = jax.nn.relu(h @ w)
            if i == len(layers) - 2:
                h = cr.tap(h, hook=lambda g: jnp.clip(g, -1e-3, 1e-3))
        return jnp.mean(h ** 2)

    @jax.custom_vjp
    def clip_backward(h):
        return h

    clip_backward.defvjp(lambda h: (h, None), lambda _, g: (jnp.clip(g, -1e-3, 1e-3),))

    def reference(layers, x):
        h = x
        for i, w in enumerate(layers):
            h = jax.nn.relu(h @ w)
            if i == len(layers) - 2:
                h = clip_backward(h)
        return jnp.mean(h ** 2)

    got = jax.jit(cr.grad(clipped_net))(layers, x)
    want = jax.grad(reference)(layers, x)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    print("hooked gradient == custom_vjp gradient: True")
    """),
]


def write(name: str, cells: list) -> None:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.validate(nb)
    nbformat.write(nb, os.path.join(HERE, name))


def main() -> None:
    write("01_backpropagation.ipynb", NB01)
    write("02_chain_rule.ipynb", NB02)
    write("03_implementing_backpropagation.ipynb", NB03)
    write("04_debugging_gradients.ipynb", NB04)


if __name__ == "__main__":
    main()
