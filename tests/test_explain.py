"""`cr.explain`: the chain-rule table of the tutorials, as numbers and as text, HTML and DOT."""

import os
import re
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chainrule as cr
from chainrule import explanation as explain_module
from chainrule.explanation import Explanation, GraphvizNotFoundError


def linear_loss(w, x, y):
    y_hat = w * x
    s = y_hat - y
    return s**2


def relu_net(w1, w2, x, target):
    z1 = w1 * x
    a1 = jax.nn.relu(z1)
    y = w2 * a1
    return (y - target) ** 2


def mlp_loss(params, x, y):
    z1 = x @ params["w1"].T + params["b1"]
    h = jax.nn.relu(z1)
    pred = h @ params["w2"].T + params["b2"]
    return jnp.mean((pred - y) ** 2)


def mlp_point():
    """Linear(10, 5) -> ReLU -> Linear(5, 1) with PyTorch's init bounds, batch 32 (float32)."""
    rng = np.random.default_rng(0)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    bound1, bound2 = 1 / np.sqrt(10), 1 / np.sqrt(5)
    params = {
        "w1": f32(rng.uniform(-bound1, bound1, (5, 10))),
        "b1": f32(rng.uniform(-bound1, bound1, (5,))),
        "w2": f32(rng.uniform(-bound2, bound2, (1, 5))),
        "b2": f32(rng.uniform(-bound2, bound2, (1,))),
    }
    return params, f32(rng.standard_normal((32, 10))), f32(rng.standard_normal((32, 1)))


# --- the video's walk-through: w=1, x=1, y=2 ------------------------------------------


def test_linear_case_rows_are_the_walk_through():
    e = cr.explain(lambda w, x, y: (w * x - y) ** 2, 1.0, 1.0, 2.0, names=["ŷ", "s", "loss"])
    assert isinstance(e, Explanation)
    # Backward order: output first, the differentiated input last.
    assert [r.name for r in e.rows] == ["loss", "s", "ŷ", "w"]
    loss, s, y_hat, w = e.rows
    # Step 1, forward: ŷ = w·x = 1, s = ŷ - y = -1, loss = s² = 1.
    assert (y_hat.expr, float(y_hat.value)) == ("w · x", 1.0)
    assert (s.expr, float(s.value)) == ("ŷ - y", -1.0)
    assert (loss.expr, float(loss.value)) == ("s²", 1.0)
    # Step 2, local gradients: ∂loss/∂s = 2s = -2, ∂s/∂ŷ = 1, ∂ŷ/∂w = x = 1.
    assert [(x.input, x.formula, float(x.local)) for x in loss.edges] == [("s", "2·s", -2.0)]
    assert [(x.input, x.formula, float(x.local)) for x in s.edges] == [("ŷ", "1", 1.0)]
    assert [(x.input, x.formula, float(x.local)) for x in y_hat.edges] == [("w", "x", 1.0)]
    # Step 3, backward: upstream × local, from the output to w.
    assert [float(r.upstream) for r in e.rows] == [1.0, -2.0, -2.0, -2.0]
    assert float(loss.edge("s").gradient) == -2.0
    assert float(s.edge("ŷ").gradient) == -2.0
    assert float(y_hat.edge("w").gradient) == -2.0
    # x and y are constants: their edges are not followed, as in the video.
    assert [n for n, _ in e.constants] == ["x", "y"]
    assert [x.input for x in s.edges] == ["ŷ"]
    assert float(e.grads) == -2.0 and float(e.value) == 1.0


def test_linear_case_text_reads_like_the_video():
    e = cr.explain(lambda w, x, y: (w * x - y) ** 2, 1.0, 1.0, 2.0, names=["ŷ", "s", "loss"])
    text = str(e)
    flat = re.sub(r" +", " ", text)
    for expected in [
        "ŷ = w · x = 1",
        "s = ŷ - y = -1",
        "loss = s² = 1",
        "∂loss/∂s = 2·s = -2",
        "∂s/∂ŷ = 1",
        "∂ŷ/∂w = x = 1",
        "∂loss/∂ŷ = -2 × 1 = -2",
        "∂loss/∂w = -2 × 1 = -2",
        "gradient: ∂loss/∂w = -2",
    ]:
        assert expected in flat, f"{expected!r} not in\n{text}"
    assert repr(e) == text


def test_names_from_the_source_and_the_signature():
    e = cr.explain(linear_loss, 1.0, 1.0, 2.0)
    assert [r.name for r in e.rows] == ["linear_loss", "s", "y_hat", "w"]
    assert [r.source.split(" ")[-1] for r in e.rows[:-1]] == ["(linear_loss)"] * 3
    assert re.search(r"test_explain\.py:\d+", e.rows[1].source)
    assert "s = y_hat - y" in str(e)  # the user's source line is shown
    renamed = cr.explain(linear_loss, 1.0, 1.0, 2.0, names={"y_hat": "ŷ", "linear_loss": "L"})
    assert [r.name for r in renamed.rows] == ["L", "s", "ŷ", "w"]
    assert renamed.row("s").expr == "ŷ - y"
    with pytest.raises(ValueError, match="not nodes of this function"):
        cr.explain(linear_loss, 1.0, 1.0, 2.0, names={"nope": "x"})
    with pytest.raises(ValueError, match="one name"):
        cr.explain(linear_loss, 1.0, 1.0, 2.0, names=["a", "b", "c", "d"])


def test_explain_matches_grad_and_differentiates_argnums():
    e = cr.explain(linear_loss, 1.0, 1.0, 2.0, argnums=(0, 1, 2))
    assert [float(g) for g in e.grads] == [-2.0, -2.0, 2.0]
    assert [r.name for r in e.inputs] == ["w", "x", "y"]
    assert e.constants == ()
    assert [x.input for x in e.row("s").edges] == ["y_hat", "y"]
    assert float(e.row("s").edge("y").local) == -1.0


def test_repeated_use_accumulates_the_upstream_gradient():
    e = cr.explain(lambda x: x * x + x, 3.0)
    assert float(e.grads) == 7.0
    mul = e.forward[0]
    assert [(x.input, float(x.local), float(x.gradient)) for x in mul.edges] == [
        ("x", 3.0, 3.0),
        ("x", 3.0, 3.0),
    ]
    assert float(e.row("x").upstream) == 7.0  # 3 + 3 + 1


def test_explain_stays_callable_after_importing_its_module():
    import chainrule.explanation  # noqa: F401

    assert cr.explain is explain_module.explain
    assert float(cr.explain(lambda w: w * 2.0, 1.0).grads) == 2.0
    assert float(cr.explain(lambda w: w * 3.0, 1.0).grads) == 3.0


# --- the ReLU tutorial: x=2, w1=0.5, w2=1.5, target=3 ------------------------------------


def test_relu_tutorial():
    e = cr.explain(relu_net, 0.5, 1.5, 2.0, 3.0, argnums=(0, 1, 2))
    dw1, dw2, dx = (float(g) for g in e.grads)
    assert (dw1, dw2, dx) == (-9.0, -3.0, -2.25)
    assert float(e.value) == 2.25
    assert [r.name for r in e.forward] == ["z1", "a1", "y", "t1", "relu_net"]
    a1 = e.row("a1")
    assert a1.op == "relu" and a1.expr == "relu(z1)"
    assert [(x.formula, float(x.local)) for x in a1.edges] == [("1[z1>0]", 1.0)]
    assert float(a1.upstream) == -4.5
    y = e.row("y")
    assert float(y.edge("w2").gradient) == -3.0 and float(y.edge("a1").gradient) == -4.5
    z1 = e.row("z1")
    assert float(z1.edge("w1").local) == 2.0 and float(z1.edge("w1").gradient) == -9.0
    assert float(z1.edge("x").gradient) == -2.25
    flat = re.sub(r" +", " ", e.to_text(width=140))  # wide enough not to wrap cells
    assert "∂relu_net/∂w1 = -4.5 × 2 = -9" in flat
    ref = jax.grad(relu_net, argnums=(0, 1, 2))(0.5, 1.5, 2.0, 3.0)
    assert [float(g) for g in ref] == [dw1, dw2, dx]


def test_relu_at_zero_sends_no_gradient_like_pytorch():
    e = cr.explain(relu_net, 0.0, 1.5, 2.0, 3.0)
    assert float(e.row("a1").edges[0].local) == 0.0
    assert float(e.grads) == 0.0


# --- local derivatives come from the rule table, kinks included -----------------------------


def kinks(x, y):
    a = jnp.abs(x)
    m = jnp.maximum(x, y)
    n = jnp.minimum(x, y)
    return a + m + n


def test_abs_at_zero_and_max_min_ties_are_shown_as_the_rules_compute_them():
    e = cr.explain(kinks, 0.0, 0.0, argnums=(0, 1))
    edges = lambda name: [(x.input, x.formula, float(x.local)) for x in e.row(name).edges]
    # abs'(0) = +1, as the rule (and jax.grad) computes, not sign(0) = 0.
    assert edges("a") == [("x", "1 if x≥0 else -1", 1.0)]
    # A tie splits the gradient half and half between the operands.
    assert edges("m") == [
        ("x", "1 if x>y else 0.5 if x=y else 0", 0.5),
        ("y", "1 if y>x else 0.5 if x=y else 0", 0.5),
    ]
    assert edges("n") == [
        ("x", "1 if x<y else 0.5 if x=y else 0", 0.5),
        ("y", "1 if y<x else 0.5 if x=y else 0", 0.5),
    ]
    flat = re.sub(r" +", " ", e.to_text(width=200))  # wide enough not to wrap cells
    assert "∂a/∂x = (1 if x≥0 else -1) = 1" in flat
    assert "∂m/∂x = (1 if x>y else 0.5 if x=y else 0) = 0.5" in flat
    assert "∂n/∂y = (1 if y<x else 0.5 if x=y else 0) = 0.5" in flat
    assert "∂kinks/∂x = 1 × 1 = 1" in flat and "∂kinks/∂x = 1 × 0.5 = 0.5" in flat
    # The printed locals are the gradient: 1 + ½ + ½ to x, ½ + ½ to y.
    assert [float(g) for g in e.grads] == [2.0, 1.0]
    assert [float(g) for g in jax.grad(kinks, argnums=(0, 1))(0.0, 0.0)] == [2.0, 1.0]
    # Away from the kinks, the same formulas pick a side.
    e = cr.explain(kinks, -1.0, 2.0, argnums=(0, 1))
    assert [float(x.local) for r in ("a", "m", "n") for x in e.row(r).edges] == [-1, 0, 1, 1, 0]


def test_a_custom_jvp_function_named_like_jax_nn_shows_its_own_rule():
    """`relu`'s formula is shown only for a function whose rule computes it."""

    @jax.custom_jvp
    @jax.jit
    def relu(x):
        return jnp.maximum(x, 0.0)

    relu.defjvps(lambda g, ans, x: g * (x >= 0))  # 1 at 0, unlike jax.nn.relu

    e = cr.explain(lambda x: relu(x) * 2.0, 0.0)
    (edge,) = e.row("t1").edges
    assert edge.formula == "ḡ ↦ relu's custom_jvp rule" and float(edge.local) == 1.0
    e = cr.explain(lambda x: jax.nn.relu(x) * 2.0, 0.0)
    (edge,) = e.row("t1").edges
    assert (edge.formula, float(edge.local)) == ("1[x>0]", 0.0)


# --- an MLP: arrays are summarised and the table fits 100 columns --------------------------


def test_mlp_table_is_readable_and_fits_100_columns():
    params, x, y = mlp_point()
    e = cr.explain(mlp_loss, params, x, y)
    text = str(e)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100, text
    assert len(lines) < 160
    names = [r.name for r in e.rows]
    assert {"mlp_loss", "pred", "h", "z1", "w1", "b1", "w2", "b2"} <= set(names)
    h = e.row("h")
    assert h.op == "relu" and h.value.shape == (32, 5) and h.upstream.shape == (32, 5)
    assert h.edges[0].formula == "1[z1>0]" and h.edges[0].local is None
    assert "f32[32,5]" in text and "‖‖" in text and "μ" in text
    # Summaries, not the 320 numbers of x: no line lists more than a few numbers.
    assert all(len(re.findall(r"-?\d+\.\d+", line)) <= 6 for line in lines)
    ref = jax.jit(jax.grad(mlp_loss))(params, x, y)
    for k in params:
        np.testing.assert_allclose(e.grads[k], ref[k], rtol=1e-5, atol=1e-6)
        assert e.row(k).op == "input"
        np.testing.assert_allclose(e.row(k).upstream, ref[k], rtol=1e-5, atol=1e-6)
    for width in (80, 120):
        assert max(len(line) for line in e.to_text(width).splitlines()) <= width


# --- HTML and Graphviz ----------------------------------------------------------------------


def test_html_rendering():
    e = cr.explain(linear_loss, 1.0, 1.0, 2.0, names={"y_hat": "ŷ", "linear_loss": "<L>"})
    page = e._repr_html_()
    assert page.count("<table") == 1 and page.count("<tr>") == 1 + len(e.rows)
    assert "&lt;L&gt;" in page and "<L>" not in page  # names are escaped
    assert "∂s/∂ŷ = 1" in page and "∂&lt;L&gt;/∂w = -2" in page
    params, x, y = mlp_point()
    assert "f32[32,5]" in cr.explain(mlp_loss, params, x, y)._repr_html_()


def test_dot_output(tmp_path):
    e = cr.explain(lambda w, x, y: (w * x - y) ** 2, 1.0, 1.0, 2.0, names=["ŷ", "s", "loss"])
    dot = e.to_dot()
    assert dot.startswith("digraph explain {") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    nodes = dict(re.findall(r'^  (\w+) \[.*label="([^"]*)"\];$', dot, re.M))
    assert nodes["n0"] == "w = 1\\n∂loss/∂w = -2"
    assert "ŷ = w · x\\n= 1\\n∂loss/∂ŷ = -2" in nodes.values()
    assert "loss = s²\\n= 1\\n∂loss/∂loss = 1" in nodes.values()
    assert "x = 1\\n(constant)" in nodes.values() and "y = 2\\n(constant)" in nodes.values()
    edges = re.findall(r'^  (\w+) -> (\w+) \[label="([^"]*)"\];$', dot, re.M)
    labels = sorted(label for _, _, label in edges)
    assert labels == [
        "∂loss/∂s = 2·s = -2\\n∂loss/∂s += -2",
        "∂s/∂ŷ = 1\\n∂loss/∂ŷ += -2",
        "∂ŷ/∂w = x = 1\\n∂loss/∂w += -2",
    ]
    assert len(re.findall(r"-> \w+ \[style=dashed", dot)) == 2  # x and y, not followed
    path = tmp_path / "graph.dot"
    e.save(path)
    assert path.read_text("utf-8") == dot
    with pytest.raises(ValueError, match="extension"):
        e.save(tmp_path / "graph.txt")
    if explain_module.shutil.which("dot"):  # Graphviz present: the DOT text must also render
        assert "</svg>" in e.to_svg()


def test_rendering_without_graphviz_says_how_to_fix_it(monkeypatch, tmp_path):
    monkeypatch.setattr(explain_module.shutil, "which", lambda name: None)
    e = cr.explain(linear_loss, 1.0, 1.0, 2.0)
    with pytest.raises(GraphvizNotFoundError, match="apt-get install graphviz"):
        e.to_svg()
    with pytest.raises(GraphvizNotFoundError, match="graph.dot"):
        e.save(tmp_path / "graph.png")
    assert not (tmp_path / "graph.png").exists()


def test_rendering_pipes_the_dot_text_to_graphviz(monkeypatch, tmp_path):
    fake = tmp_path / "dot"  # stands in for Graphviz: echoes its format and input
    fake.write_text('#!/bin/sh\necho "<svg format=$1>"\ncat\necho "</svg>"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(explain_module.shutil, "which", lambda name: os.fspath(fake))
    e = cr.explain(linear_loss, 1.0, 1.0, 2.0)
    svg = e.to_svg()
    assert svg.startswith("<svg format=-Tsvg>") and e.to_dot() in svg
    e.save(tmp_path / "graph.png")
    assert (tmp_path / "graph.png").read_bytes().startswith(b"<svg format=-Tpng>")


# --- errors --------------------------------------------------------------------------------


def test_explain_needs_a_scalar_and_runs_eagerly():
    with pytest.raises(TypeError, match="scalar"):
        cr.explain(lambda w: w * jnp.ones(3), 1.0)
    with pytest.raises(TypeError, match="eagerly"):
        jax.jit(lambda w: cr.explain(linear_loss, w, 1.0, 2.0).value)(1.0)


def test_explain_shows_a_tap_under_its_name():
    def loss(w, x):
        h = cr.tap(w * x, "hidden")
        return (h - 2.0) ** 2

    e = cr.explain(loss, 1.0, 1.0)
    row = e.row("hidden")
    assert (row.op, row.expr, float(row.upstream)) == ("tap", "tap(t1)", -2.0)
    assert [(x.formula, float(x.local)) for x in row.edges] == [("1", 1.0)]
    assert e.nan_report is None and "NaN provenance" not in e.to_text()


def test_explain_reports_where_the_first_nan_came_from():
    def trap(x):
        return jnp.where(x > 0, jnp.sqrt(x), 0.0)

    e = cr.explain(trap, 0.0)
    assert "non-finite cotangent at 'sqrt'" in e.nan_report
    assert "double-where" in e.nan_report
    assert "NaN provenance" in e.to_text() and "NaN provenance" in e._repr_html_()
    with pytest.raises(cr.errors.NonFiniteGradientError) as info:
        cr.grad(trap, check_finite=True)(0.0)
    assert str(info.value) == e.nan_report  # the same report as check_finite's


def test_explain_a_scan_and_a_two_output_custom_vjp():
    from jax import lax

    def f(x):
        c, ys = lax.scan(lambda c, xi: (c * xi + 1.0, c), 1.0, x)
        return c + jnp.sum(ys)

    x = jnp.arange(1.0, 4.0)
    e = cr.explain(f, x)
    np.testing.assert_allclose(e.grads, jax.grad(f)(x), rtol=1e-6)
    text = e.to_text()
    assert "scan(1, x)" in text and "outputs)" in text and "no dependence" not in text

    @jax.custom_vjp
    def two(x):
        return jnp.sin(x), jnp.cos(x)

    two.defvjp(
        lambda x: ((jnp.sin(x), jnp.cos(x)), x),
        lambda x, g: (g[0] * jnp.cos(x) - g[1] * jnp.sin(x),),
    )
    e2 = cr.explain(lambda x: sum(two(x)), 0.5)
    assert float(e2.grads) == pytest.approx(float(jax.grad(lambda x: sum(two(x)))(0.5)))
