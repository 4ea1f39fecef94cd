"""Bad input gets a clear error: what went wrong, where, and how to fix it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

import chainrule as cr
from chainrule import errors


def test_integer_input_names_the_argument_and_dtype():
    def loss(weights, x):
        return jnp.sum(weights * x)

    with pytest.raises(errors.InputTypeError, match=r"argument 0 \('weights'\).*int32") as e:
        cr.grad(loss)(jnp.arange(3, dtype=jnp.int32), jnp.ones(3))
    assert isinstance(e.value, TypeError)  # code catching JAX's TypeError keeps working
    assert "float" in str(e.value)


def test_integer_leaf_inside_a_pytree_names_its_path():
    with pytest.raises(errors.InputTypeError, match=r"\['layer'\]\['b'\].*int"):
        cr.grad(lambda p: jnp.sum(p["layer"]["w"]))({"layer": {"w": jnp.ones(2), "b": 3}})


def test_non_array_input():
    with pytest.raises(errors.InputTypeError, match="str.*cannot be differentiated"):
        cr.grad(lambda s: 1.0)("hello")


def test_non_scalar_output_gives_shape_and_fix():
    with pytest.raises(errors.NonScalarOutputError, match=r"shape \(32, 1\).*\.mean\(\)"):
        cr.grad(lambda w: w * jnp.ones((32, 1)))(1.0)


def test_integer_output_is_refused():
    with pytest.raises(errors.NonScalarOutputError, match="floating-point output"):
        cr.grad(lambda w: jnp.argmax(w))(jnp.ones(3))


@pytest.mark.parametrize("out", [3, True, 1 + 2j])
def test_python_number_outputs_jax_refuses_are_refused(out):
    """As `jax.grad`: a Python int or bool loss has no gradient, a complex one
    needs holomorphic=True (both raise TypeError there too)."""
    with pytest.raises(TypeError):
        jax.value_and_grad(lambda w: out)(jnp.ones(2))
    with pytest.raises(errors.NonScalarOutputError, match="Python|complex"):
        cr.value_and_grad(lambda w: out)(jnp.ones(2))


@pytest.mark.parametrize("out, holomorphic", [(3.0, False), (1 + 2j, True)])
def test_a_constant_python_number_loss_has_zero_gradient_as_in_jax(out, holomorphic):
    x = jnp.ones(2, jnp.complex64 if holomorphic else jnp.float32)
    want = jax.value_and_grad(lambda w: out, holomorphic=holomorphic)(x)
    got = cr.value_and_grad(lambda w: out, holomorphic=holomorphic)(x)
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])
    assert got[1].dtype == want[1].dtype


@pytest.mark.parametrize("argnums", [3, (0, 5), -4])
def test_bad_argnums_out_of_range(argnums):
    with pytest.raises(errors.ArgnumsError, match="positional argument"):
        cr.grad(lambda a, b, c: a * b * c, argnums=argnums)(1.0, 2.0, 3.0)
    # caught as JAX's error is caught: grad's TypeError, jacrev's ValueError
    for transform, caught in ((cr.grad, TypeError), (cr.jacrev, ValueError)):
        with pytest.raises(caught):
            transform(lambda a, b, c: a * b * c, argnums=argnums)(1.0, 2.0, 3.0)


# (True is argument 1 to JAX, as to Python: tests/test_core.py checks it is taken)
@pytest.mark.parametrize("argnums", ["0", 1.5, (), (0, 0), np.array(True), np.array([[0]])])
def test_bad_argnums_type(argnums):
    with pytest.raises(errors.ArgnumsError):
        cr.grad(lambda a, b: a * b, argnums=argnums)


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "hessian"])
def test_a_numpy_masked_array_is_refused_as_jax_refuses_it(transform):
    """Its mask would be ignored (the data under it differentiated): JAX raises
    a ValueError for masked arrays, chainrule too, saying what to pass."""
    ma = np.ma.array([1.0, 2.0, 3.0], mask=[0, 1, 0])
    f = lambda x: jnp.sum(x**2)  # noqa: E731
    call = {
        "grad": lambda m: m.grad(f)(ma),
        "vjp": lambda m: m.vjp(f, ma),
        "jacrev": lambda m: m.jacrev(f)(ma),
        "hessian": lambda m: m.hessian(f)(ma),
    }[transform]
    with pytest.raises(ValueError):
        call(jax)
    with pytest.raises(ValueError, match="masked array.*filled"):
        call(cr)


def test_non_callable():
    with pytest.raises(TypeError, match="expects a function"):
        cr.grad(3.0)


def test_has_aux_without_pair():
    with pytest.raises(errors.AuxError, match=r"pair \(output, aux\)"):
        cr.grad(lambda w: w * 2.0, has_aux=True)(1.0)


def test_vjp_cotangent_shape_mismatch():
    _, vjp_fn = cr.vjp(lambda x: x * 2.0, jnp.ones(3))
    with pytest.raises(errors.CotangentError, match=r"shape \(2,\).*shape \(3,\)"):
        vjp_fn(jnp.ones(2))


def test_vjp_cotangent_structure_mismatch():
    _, vjp_fn = cr.vjp(lambda x: (x, x), jnp.ones(3))
    with pytest.raises(errors.CotangentError, match="structure"):
        vjp_fn(jnp.ones(3))


def test_vjp_cotangent_dtype_mismatch():
    _, vjp_fn = cr.vjp(lambda x: x * 2.0, jnp.ones(3, jnp.float64))
    with pytest.raises(errors.CotangentError, match="float32.*float64"):
        vjp_fn(jnp.ones(3, jnp.float32))


def test_missing_vjp_rule_names_primitive_and_user_line():
    no_rule_p = jex_core.Primitive("no_rule_anywhere")  # (cummax, once the example, has one)
    no_rule_p.def_abstract_eval(lambda x: x)

    def loss(x):
        return jnp.sum(no_rule_p.bind(x))

    with pytest.raises(errors.NoVJPRuleError, match=r"'no_rule_anywhere'.*test_errors.py:\d+") as e:
        cr.grad(loss)(jnp.array([1.0, 3.0, 2.0]))
    assert "custom_vjp" in str(e.value)  # the fix is named


def test_python_control_flow_on_a_jnp_value_works_eagerly_and_fails_like_jax_under_jit():
    def loss(w):
        h = jnp.tanh(w)
        if h > 0:  # eagerly the value is concrete, as in PyTorch
            return h
        return -h

    for w, sign in ((1.0, 1.0), (-1.0, -1.0)):
        assert float(cr.grad(loss)(w)) == pytest.approx(
            sign * float(jax.grad(jnp.tanh)(w)), rel=1e-12
        )
    with pytest.raises(jax.errors.TracerBoolConversionError):
        jax.jit(cr.grad(loss))(1.0)


def test_numpy_conversion_of_tracer_is_refused_like_jax():
    import numpy as np

    for grad in (jax.grad, cr.grad):
        with pytest.raises(jax.errors.TracerArrayConversionError):
            grad(lambda w: jnp.sum(np.asarray(w)))(jnp.ones(2))


def test_user_errors_pass_through_unchanged():
    def loss(w):
        raise KeyError("my bug")

    with pytest.raises(KeyError, match="my bug"):
        cr.grad(loss)(1.0)


@pytest.mark.parametrize(
    "loss",
    [
        lambda w: (w @ jnp.ones((4, 2))).sum(),  # chainrule's operator fast path
        lambda w: jnp.sum(jnp.matmul(w, jnp.ones((4, 2)))),
    ],  # jax.numpy through JAX's dispatch
)
def test_shape_errors_are_typeerrors_like_jax(loss):
    with pytest.raises(TypeError, match="dot_general"):
        jax.grad(loss)(jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="dot_general"):
        cr.grad(loss)(jnp.ones((2, 3)))


_X = jnp.arange(1.0, 4.0, dtype=jnp.float32)
_A = jnp.arange(25.0, dtype=jnp.float32).reshape(5, 5)
_REFUSED_BY_LAX = {
    # a jnp-level typo: contracting dimensions of sizes (5, 1) against (1, 5)
    "tensordot": (
        lambda a: jnp.tensordot(a.reshape(5, 5, 1), a.reshape(1, 5, 5), axes=([1, 2], [0, 1])),
        _A,
    ),
    "dynamic_slice past the end": (lambda x: jax.lax.dynamic_slice(x, (0,), (5,)), _X),
    "slice past the end": (lambda x: jax.lax.slice(x, (1,), (5,)), _X),
    "add of float32 and int32": (lambda x: jax.lax.add(x, jnp.ones(3, jnp.int32)), _X),
    "concatenate of float32 and float16": (
        lambda x: jax.lax.concatenate([x, jnp.ones(3, jnp.float16)], 0),
        _X,
    ),
    "select of a (1,) mask and (3,) cases": (
        lambda x: jax.lax.select(jnp.array([True]), x, 2 * x),
        _X,
    ),
    "pad to a negative size": (lambda x: jax.lax.pad(x, 0.0, [(-4, 0, 0)]), _X),
    "dot_general of sizes 3 and 1": (
        lambda x: jax.lax.dot_general(x[None], jnp.ones((1, 4)), (((1,), (0,)), ((), ()))),
        _X,
    ),
}


@pytest.mark.parametrize("case", sorted(_REFUSED_BY_LAX))
def test_lax_shape_and_dtype_rules_hold_eagerly(case):
    """What JAX's shape and dtype rules refuse, eager chainrule refuses with
    JAX's error: its NumPy evaluation would broadcast, promote or clamp (a
    dynamic_slice past the end gave 2 elements, a tensordot a value)."""
    fun, x = _REFUSED_BY_LAX[case]
    loss = lambda x: jnp.sum(fun(x) ** 2)  # noqa: E731
    with pytest.raises((TypeError, ValueError)) as want:
        jax.value_and_grad(loss)(x)
    for transform in (cr.value_and_grad(loss), jax.jit(cr.value_and_grad(loss))):
        with pytest.raises(type(want.value)) as got:
            transform(x)
        # (the rest of the message varies with JAX's own path: eager lax.slice vs jit)
        assert str(got.value).split()[0] == str(want.value).split()[0]


@pytest.mark.parametrize(
    "bad",
    [
        jnp.ones(4, jnp.float32),  # another shape
        jnp.ones(3, jnp.int32),  # another dtype
        np.ones(3, np.int32),  # a NumPy array of another dtype
        np.ones((3, 1), np.float32),  # another rank
    ],
)
def test_a_checked_lax_call_does_not_pass_other_types(bad):
    """`check_types` remembers what it checked by operand types: a call that
    passed once does not let the same `lax` call on other operands through."""
    x = jnp.arange(1.0, 4.0, dtype=jnp.float32)
    cr.grad(lambda x: jnp.sum(jax.lax.add(x, jnp.ones(3, jnp.float32))))(x)
    cr.grad(lambda x: jnp.sum(jax.lax.add(x, np.ones(3, np.float32))))(x)
    with pytest.raises(TypeError):
        cr.grad(lambda x: jnp.sum(jax.lax.add(x, bad)))(x)


@pytest.mark.parametrize(
    "fun",
    [
        lambda x: x + x[:4],  # shapes that do not broadcast
        lambda x: x.reshape(4),
        lambda x: x.reshape(-1, 4),
        lambda x: x.reshape(-1, -1),
        lambda x: x @ x[:4],
    ],
)
def test_operators_on_tracers_raise_jaxs_error_type(fun):
    """Where JAX's operators raise TypeError (code catching it keeps working),
    chainrule's do too, not NumPy's ValueError."""
    x = jnp.ones(6)
    with pytest.raises(TypeError):
        jax.grad(lambda x: jnp.sum(fun(x)))(x)
    with pytest.raises(TypeError):
        cr.grad(lambda x: jnp.sum(fun(x)))(x)


@pytest.mark.parametrize(
    "fun",
    [
        lambda x: x.reshape(6, 1) * x.reshape(1, 6)[:, :4] * x,  # ranks 2 and 1
        lambda x: x.reshape(2, 3) + x,
        lambda x: x.reshape(3, 2) - x[:3],
    ],
    ids=["times", "plus", "minus"],
)
def test_operators_on_operands_of_different_ranks_raise_jaxs_error(fun):
    """Operands of different ranks that do not broadcast: jax.numpy's ValueError
    (`Incompatible shapes for broadcasting`), eagerly and under `jit`, where
    NumPy's evaluation once let lax raise its TypeError."""
    x = jnp.arange(1.0, 7.0)
    loss = lambda x: jnp.sum(fun(x))  # noqa: E731
    with pytest.raises(ValueError) as want:
        jax.grad(loss)(x)
    for transform in (cr.grad(loss), jax.jit(cr.grad(loss))):
        with pytest.raises(ValueError) as got:
            transform(x)
        assert str(got.value) == str(want.value)


@pytest.mark.parametrize(
    "fun",
    [
        lambda x: x * 2**40,
        lambda x: 2**40 - x,
        lambda x: x + (-(2**31) - 1),
        lambda x: x * (2**31),
        lambda x: x**2 + 2**70,
    ],
    ids=["times", "reflected", "below int32", "int32 max + 1", "far out"],
)
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_python_ints_beyond_the_default_integer_type_overflow_as_in_jax(fun, mode):
    """JAX converts a Python int to its default integer type (int32, or int64
    with 64-bit types) before promoting it, so `x * 2**40` raises OverflowError
    even for a float `x`; chainrule's operators do too, not compute a value."""
    big = lambda x: x * 2**70  # noqa: E731  (beyond int64 too)
    for grad in (jax.grad, cr.grad):
        with jax.enable_x64(True):
            g = grad(lambda x: jnp.sum(big(x)))
            with pytest.raises(OverflowError):
                (jax.jit(g) if mode == "jit" else g)(jnp.ones(3))
        with jax.enable_x64(False):
            g = grad(lambda x: jnp.sum(fun(x)))
            with pytest.raises(OverflowError):
                (jax.jit(g) if mode == "jit" else g)(jnp.ones(3, jnp.float32))
