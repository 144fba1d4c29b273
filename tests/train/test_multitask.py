"""Multi-task fine-tuning: the model (one trunk, a head per task), the add rule on the trunk's
gradient (unit scale at init for 1, 2 and 4 tasks), sampling frequencies, task specs, and a
weight-0 task leaving the other's training exactly as alone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from unitscale_jax import nn as unn
from unitscale_jax import ops
from unitscale_jax.analysis import activation_stats
from unitscale_jax.train import multitask as mt
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.finetune import TRUNK
from unitscale_jax.train.tasks import SequenceClassification

V = 512
CFG = unn.TransformerConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=2, max_seq_len=32,
                            rope=True, scan_layers=False)


def _batch(seed, kind, n_out, rows=16, seq=32):
    r = np.random.default_rng(seed)
    batch = {"ids": r.integers(0, V, (rows, seq)).astype(np.int32),
             "mask": np.ones((rows, seq), bool), "valid": np.ones(rows, bool)}
    if kind == "classify":
        batch["labels"] = r.integers(0, n_out, rows).astype(np.int32)
    else:
        batch["labels"] = r.integers(0, n_out, (rows, seq)).astype(np.int32)
        batch["where"] = np.ones((rows, seq), bool)
    return batch


def _heads(n):
    """n taggers (a per-token loss: unit-scaled gradients at init, as the MLM loss; a
    classifier's pooled loss gives the trunk smaller ones, alone as in a multi-task model)."""
    return {f"t{i}": ("tag", 3 + i) for i in range(n)}


def _trunk_grad_rms(n, scale_trunk=True):
    heads = _heads(n)
    task = mt.MultiTask(heads, scale_trunk=scale_trunk)
    model = task.make_model(CFG, nnx.Rngs(0))
    batch = {name: _batch(10 + i, k, c, seq=16) for i, (name, (k, c)) in enumerate(heads.items())}
    stats = activation_stats(lambda m, b: task.loss(m, b, None)[0], model, batch,
                             include_params=True)
    trunk = [g for k, (_, g) in stats.items()
             if k.startswith("param/") and k.split("/")[1] in TRUNK]
    return float(np.sqrt(np.mean(np.square(trunk)))), trunk


def test_trunk_grad_scale_is_the_add_rule():
    a, b = jnp.ones((4, 4)), jnp.ones((4, 4))
    g = jax.grad(lambda x: jnp.sum(ops.add(x, b)))(a)  # ops.add: y = 2^-1/2 (a + b)
    assert unn.trunk_grad_scale([1.0, 1.0]) == pytest.approx(float(g[0, 0]))
    assert unn.trunk_grad_scale([1.0]) == 1.0
    assert unn.trunk_grad_scale([1.0, 0.0]) == 1.0
    assert unn.trunk_grad_scale([1, 1, 1, 1]) == pytest.approx(0.5)
    assert unn.trunk_grad_scale([3.0, 4.0]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="one > 0"):
        unn.trunk_grad_scale([0.0, 0.0])


def test_trunk_gradient_unit_scaled_at_init_for_1_2_4_tasks():
    rms = {}
    for n in (1, 2, 4):
        rms[n], trunk = _trunk_grad_rms(n)
        assert all(0.5 <= g <= 2.5 for g in trunk), (n, trunk)  # every trunk parameter ~unit
    for n in (2, 4):
        assert 0.75 <= rms[n] / rms[1] <= 1.33, rms
    plain, _ = _trunk_grad_rms(4, scale_trunk=False)  # the unscaled sum grows as sqrt(n)
    assert 1.6 <= plain / rms[1] <= 2.5, (plain, rms)


def test_heads_are_separate_readouts():
    task = mt.MultiTask({"a": ("classify", 2), "b": ("tag", 5)})
    model = task.make_model(CFG, nnx.Rngs(0))
    flat = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert {"head_a/kernel", "head_b/kernel"} <= flat
    assert not any(k.startswith(("cls_head", "token_head", "readout")) for k in flat)
    infos = dict(nnx.to_flat_state(unn.param_info(model)))
    assert infos[("head_a", "kernel")].type == "output"
    batch = {"a": _batch(0, "classify", 2), "b": _batch(1, "tag", 5)}
    assert task.predict(model, batch["a"], "a").shape == (16,)
    assert task.predict(model, batch["b"], "b").shape == (16, 32)
    sums = task.eval_sums(model, batch)
    assert set(sums) == {"a_loss", "b_loss"} and int(sums["b_loss"][1]) == 16 * 32
    with pytest.raises(ValueError, match="no head 'c'"):
        model.view("c")


def test_weight_zero_task_leaves_the_other_as_if_alone():
    """With the other weight 0 the multi-task loss, gradients and updates of task a equal a
    single-task run's, step after step (same trunk, same head, same batches)."""
    single_task = SequenceClassification(3)
    single = single_task.make_model(CFG, nnx.Rngs(0))
    task = mt.MultiTask({"a": ("classify", 3), "b": ("tag", 4)}, {"a": 1.0, "b": 0.0})
    multi = task.make_model(CFG, nnx.Rngs(1))
    s_pure = nnx.to_pure_dict(nnx.state(single, nnx.Param))
    m_params = nnx.to_pure_dict(nnx.state(multi, nnx.Param))
    m_params.update({k: s_pure[k] for k in TRUNK if k in s_pure},
                    head_a=s_pure["cls_head"])
    s_graph, _ = nnx.split(single, nnx.Param)
    m_graph, _ = nnx.split(multi, nnx.Param)
    tx = optax.adam(1e-2)

    def step(graph, t, params, opt, batch):
        loss_fn = lambda p: t.loss(nnx.merge(graph, p), batch, None)[0]  # noqa: E731
        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    s_p, m_p = s_pure, m_params
    s_opt, m_opt = tx.init(s_p), tx.init(m_p)
    for k in range(3):
        a, b = _batch(100 + k, "classify", 3), _batch(200 + k, "tag", 4)
        s_p, s_opt, s_loss = step(s_graph, single_task, s_p, s_opt, a)
        m_p, m_opt, m_loss = step(m_graph, task, m_p, m_opt, {"a": a, "b": b})
        assert float(m_loss) == pytest.approx(float(s_loss), rel=1e-6), k
    for name in (k for k in TRUNK if k in s_p):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                     s_p[name], m_p[name])
    np.testing.assert_allclose(s_p["cls_head"]["kernel"], m_p["head_a"]["kernel"], rtol=1e-5,
                               atol=1e-6)


def test_sampling_probabilities():
    sizes = {"a": 100, "b": 300, "c": 600}
    p = mt.sampling_probabilities(sizes)
    assert p == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    t = mt.sampling_probabilities(sizes, temperature=2.0)
    z = sum(n ** 0.5 for n in sizes.values())
    assert t == pytest.approx({k: n ** 0.5 / z for k, n in sizes.items()})
    assert mt.sampling_probabilities(sizes, 1e6) == pytest.approx({k: 1 / 3 for k in sizes},
                                                                  abs=1e-4)
    assert mt.sampling_probabilities(sizes, weights={"b": 0.0}) == pytest.approx(
        {"a": 1 / 7, "b": 0.0, "c": 6 / 7})


class _Rows:
    """An endless iterator of 8-row batches counting how often it was drawn."""

    def __init__(self):
        self.drawn = 0

    def __next__(self):
        self.drawn += 1
        return {"ids": np.zeros((8, 4), np.int32), "valid": np.ones(8, bool)}

    def get_state(self):
        return {"drawn": self.drawn}

    def set_state(self, state):
        self.drawn = state["drawn"]


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_sampled_row_frequencies(temperature):
    sizes = {"a": 50, "b": 150, "c": 800}
    probs = mt.sampling_probabilities(sizes, temperature)
    batches = mt.MultiTaskBatches({n: _Rows() for n in sizes}, probs, batch_size=8, seed=3)
    rows = {n: 0 for n in sizes}
    steps = 2000
    for _ in range(steps):
        step = next(batches)
        assert sum(int(b["valid"].sum()) for b in step.values()) == 8
        for n, b in step.items():
            rows[n] += int(b["valid"].sum())
            assert not b["valid"][int(b["valid"].sum()):].any()  # the first rows are kept
    for n in sizes:
        assert rows[n] / (8 * steps) == pytest.approx(probs[n], abs=0.015), (n, rows, probs)
    state = batches.get_state()
    again = mt.MultiTaskBatches({n: _Rows() for n in sizes}, probs, batch_size=8, seed=3)
    again.set_state(state)
    nxt, resumed = next(batches), next(again)
    for n in sizes:
        np.testing.assert_array_equal(nxt[n]["valid"], resumed[n]["valid"])


def test_task_specs_parse():
    s = mt.parse_task_spec("sst2=classify:data/sst2")
    assert (s.name, s.kind, str(s.path)) == ("sst2", "classify", "data/sst2")
    assert mt.parse_task_spec("ner=tag:C:/x").path.as_posix() == "C:/x"
    assert mt.is_multitask_spec("a=tag:x") and not mt.is_multitask_spec("classify")
    assert mt.parse_task_weights(["b=0.5"], ["a", "b"]) == {"a": 1.0, "b": 0.5}
    assert mt.parse_sampling("proportional") == 1.0
    assert mt.parse_sampling("temperature:2.5") == 2.5


@pytest.mark.parametrize("spec, needle", [
    ("sst2classify:x", "does not parse"), ("sst2=classify", "does not parse"),
    ("sst2=regress:x", "kind 'regress'"), ("2x=tag:x", "must be a word"),
    ("a=tag:", "no PATH")])
def test_bad_task_spec(spec, needle):
    with pytest.raises(UsageError, match=needle) as e:
        mt.parse_task_spec(spec)
    assert "\n" not in str(e.value) and "NAME=KIND:PATH" in str(e.value)


@pytest.mark.parametrize("call, needle", [
    (lambda: mt.parse_task_specs(["a=tag:x", "a=classify:y"]), "more than once"),
    (lambda: mt.parse_task_weights(["a"], ["a"]), "does not parse"),
    (lambda: mt.parse_task_weights(["z=1"], ["a"]), "no task 'z'"),
    (lambda: mt.parse_task_weights(["a=-1"], ["a"]), ">= 0"),
    (lambda: mt.parse_task_weights(["a=0"], ["a"]), "every task has weight 0"),
    (lambda: mt.parse_sampling("temperature:0"), "does not parse"),
    (lambda: mt.parse_sampling("uniform"), "does not parse")])
def test_bad_weights_and_sampling(call, needle):
    with pytest.raises(UsageError, match=needle):
        call()


def test_mlm_auxiliary_head_is_the_vocabulary_readout():
    task = mt.MultiTask({"a": ("classify", 2), "aux": ("mlm", V)}, {"a": 1.0, "aux": 0.5})
    model = task.make_model(CFG, nnx.Rngs(0))
    tops = {p[0] for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert "readout" in tops and "head_aux" not in tops and "head_a" in tops
    r = np.random.default_rng(0)
    ids = r.integers(0, V, (4, 32)).astype(np.int32)
    where = r.random((4, 32)) < 0.15
    mlm = {"ids": ids, "labels": ids, "where": where, "valid": np.ones((4, 32), bool)}
    batch = {"a": _batch(0, "classify", 2, rows=4), "aux": mlm}
    loss, count = task.loss(model, batch, None)
    la, na = task.task_loss(model, "a", batch["a"], None)
    lm = model.mlm_loss(ids, ids, where, mask=mlm["valid"])
    assert float(loss) == pytest.approx(float(la) + 0.5 * float(lm), rel=1e-5)
    assert int(count) == int(na) + int(where.sum())
    kept = mt.keep_rows(mlm, 1)  # MLM rows drop out of the scored positions, not the mask
    assert kept["valid"].all() and kept["where"][1:].sum() == 0
    np.testing.assert_array_equal(kept["where"][0], where[0])
    with pytest.raises(ValueError, match="one mlm head at most"):
        unn.MultiTaskEncoder(CFG, rngs=nnx.Rngs(0), heads={"x": ("mlm", V), "y": ("mlm", V)})
