"""The engine's structure: one run of the user's code, one way in, one-way imports.

* Run once: in an eager `cr.grad`/`cr.value_and_grad`/`cr.vjp` call the
  user's function runs exactly once, and once per trace under `jax.jit`,
  whatever it is written with.
* Python control flow on values works eagerly in `jax.numpy` code, with the
  results `jax.grad` gives for the branch taken; under `jax.jit` it raises
  JAX's own error type.
* The engine's modules import one way (checked on the source, function-level
  imports included).
"""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chainrule as cr
import chainrule.numpy as cnp

ENGINE = pathlib.Path(cr.__file__).parent / "engine"


# --- run once ---------------------------------------------------------------------------


@jax.custom_jvp
def _soft_abs(x):
    return jnp.sqrt(x * x + 1.0)


_soft_abs.defjvps(lambda g, ans, x: g * x / ans)


@jax.custom_vjp
def _clipped_sin(x):
    return jnp.sin(x)


_clipped_sin.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)), lambda c, g: (jnp.clip(g * c, -1, 1),))


@jax.jit
def _jitted_helper(w, x):
    return jnp.tanh(x @ w)


STYLES = {
    "operators": lambda w, x: ((x @ w) * (x @ w)).sum() / 2.0 - w.mean(),
    "chainrule.numpy": lambda w, x: cnp.sum(cnp.tanh(cnp.matmul(x, w))),
    "jax.numpy and jax.nn": lambda w, x: jnp.mean(jax.nn.softplus(x @ w) + jax.nn.relu(w).sum()),
    "mixed": lambda w, x: cnp.sum(jnp.sin(x @ w) * (w**2).sum()) + jax.nn.gelu(w).mean(),
    "custom_jvp": lambda w, x: jnp.sum(_soft_abs(x @ w)),
    "custom_vjp": lambda w, x: jnp.sum(_clipped_sin(x @ w)),
    "jit-decorated helper": lambda w, x: jnp.sum(_jitted_helper(w, x) ** 2),
}

W = np.linspace(-1.0, 1.0, 6).reshape(3, 2)
X = np.linspace(-2.0, 2.0, 12).reshape(4, 3)


def _counted(f):
    calls = []

    def loss(w, x):
        calls.append(1)
        return f(w, x)

    return loss, calls


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("transform", ["grad", "value_and_grad", "vjp"])
def test_the_function_runs_once_per_eager_call(style, transform):
    loss, calls = _counted(STYLES[style])
    if transform == "vjp":
        out, vjp_fn = cr.vjp(loss, W, X)
        got = vjp_fn(jnp.ones_like(out))[0]
        want = jax.vjp(STYLES[style], W, X)[1](jnp.ones_like(out))[0]
    else:
        got = getattr(cr, transform)(loss)(W, X)
        want = getattr(jax, transform)(STYLES[style])(W, X)
    assert len(calls) == 1
    for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("style", list(STYLES))
def test_the_function_runs_once_per_trace_under_jit(style):
    loss, calls = _counted(STYLES[style])
    step = jax.jit(cr.grad(loss))
    first = step(W, X)
    step(W, X)  # cached: no new trace
    assert len(calls) == 1
    np.testing.assert_allclose(first, jax.grad(STYLES[style])(W, X), rtol=1e-12, atol=1e-14)


def test_side_effects_and_input_mutation_happen_once():
    rng = np.random.default_rng(0)
    drawn = []
    batches = iter([np.array([1.0, 2.0]), np.array([3.0, 4.0])])

    def loss(p):
        noise = rng.normal()
        drawn.append(noise)
        x = next(batches)
        p["w"] = p["w"] * 2.0  # mutates the dict the function was given
        return jnp.sum(p["w"] * x) + 0.0 * noise

    params = {"w": jnp.array([1.0, 1.0])}
    value, g = cr.value_and_grad(loss)(params)
    assert len(drawn) == 1 and next(batches).tolist() == [3.0, 4.0]
    assert float(value) == 6.0 and g["w"].tolist() == [2.0, 4.0]
    assert params["w"].tolist() == [1.0, 1.0]  # the caller's dict is untouched


# --- Python control flow on values ------------------------------------------------------


def _branchy(w):
    h = jnp.tanh(w)
    if jnp.sum(h) > 0:
        return jnp.sum(h**2)
    return -jnp.sum(h)


def _newton_sqrt(a):
    x = a
    while jnp.abs(x * x - a) > 1e-10:
        x = 0.5 * (x + a / x)
    return x


def _loop(w, n):
    out = w
    for _ in range(int(n)):
        out = jnp.sin(out)
    return out.sum()


@pytest.mark.parametrize("w", [np.array([0.3, 0.5]), np.array([-0.3, -0.5])])
def test_if_on_a_jnp_value_takes_the_branch_jax_takes(w):
    taken = (lambda w: jnp.sum(jnp.tanh(w) ** 2)) if np.tanh(w).sum() > 0 else None
    taken = taken or (lambda w: -jnp.sum(jnp.tanh(w)))
    np.testing.assert_allclose(cr.grad(_branchy)(w), jax.grad(taken)(w), rtol=1e-12)


def test_while_on_a_float_of_a_value_runs_eagerly():
    # d sqrt(a)/da = 1 / (2 sqrt(a)); the unrolled Newton iterations give it
    np.testing.assert_allclose(cr.grad(_newton_sqrt)(2.0), 0.5 / np.sqrt(2.0), rtol=1e-8)


def test_for_over_an_int_of_a_value():
    w = np.array([0.2, 0.4])
    got = cr.grad(_loop)(w, jnp.asarray(3))
    want = jax.grad(lambda w: jnp.sin(jnp.sin(jnp.sin(w))).sum())(w)
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize(
    "fun,error",
    [
        (_branchy, jax.errors.TracerBoolConversionError),
        (_newton_sqrt, jax.errors.ConcretizationTypeError),
    ],
)
def test_under_jit_python_control_flow_raises_jaxs_error(fun, error):
    with pytest.raises(error):  # the reference
        jax.jit(jax.grad(fun))(0.5)
    with pytest.raises(error) as e:
        jax.jit(cr.grad(fun))(0.5)
    frames = [f.name for f in e.traceback]
    assert fun.__name__ in frames, "the traceback shows the user's line"


def test_a_leaked_tracer_raises_jaxs_unexpected_tracer_error():
    leaked = []
    cr.grad(lambda w: (leaked.append(w * 2.0), w.sum())[1])(np.array([1.0, 2.0]))
    with pytest.raises(jax.errors.UnexpectedTracerError):
        cr.grad(lambda v: (v * leaked[0]).sum())(np.array([1.0, 2.0]))


def test_tracers_are_jax_arrays_like_jax_tracers():
    seen = []

    def loss(x):
        seen.append(isinstance(x, jax.Array))
        return (x * x).sum() if isinstance(x, jax.Array) else 0.0 * x.sum()

    np.testing.assert_allclose(cr.grad(loss)(np.array([1.0, 2.0])), [2.0, 4.0])
    assert seen == [True]


# --- one-way imports --------------------------------------------------------------------


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ENGINE.parent.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path, package: str) -> set[str]:
    """Every chainrule.engine module `path` imports, at any depth (functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith("chainrule.engine"))
    return found


def _engine_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ENGINE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in _imports(path, package) if m in modules and m != name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_engine_imports_are_acyclic():
    graph = _engine_graph()
    # The package's own __init__ re-exports its families; only edges *into* a
    # package from its own members would be cycles, so they are checked too.
    assert "chainrule.engine.core" in graph and "chainrule.engine.rules.calls" in graph
    assert _find_cycle(graph) is None, f"import cycle: {' -> '.join(_find_cycle(graph))}"


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_readme_order_of_the_engine_holds():
    order = ["host", "core", "linearity", "rules", "debugging", "arrays", "transforms", "forward"]
    graph = _engine_graph()
    rank = {m: i for i, m in enumerate(order)}

    def layer(module: str) -> int:
        part = module.split(".")[2] if module.count(".") >= 2 else ""
        return rank.get(part, -1)

    for module, deps in graph.items():
        for dep in deps:
            if layer(module) >= 0 and layer(dep) >= 0:
                assert layer(dep) <= layer(module), f"{module} imports {dep}, against the order"


def test_no_methods_are_attached_to_classes_from_outside():
    for path in ENGINE.rglob("*.py"):
        assert "setattr(" not in path.read_text(), f"{path.name} uses setattr"


def test_import_leaves_jax_backends_alone():
    """`import chainrule` must not initialise JAX's backends: afterwards JAX can
    still be configured (e.g. simulated CPU devices for `chainrule train --devices 2`)."""
    import subprocess
    import sys

    script = (
        "import chainrule, chainrule.numpy, chainrule.nn, chainrule.train\n"
        "import jax\n"
        "jax.config.update('jax_num_cpu_devices', 4)\n"
        "assert len(jax.devices()) == 4, jax.devices()\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
