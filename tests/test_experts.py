"""MoSLoRA adapters on the fused experts of tiny mixture-of-experts models built from configs."""

import json
import warnings

import pytest
import torch

import moslora_ext
from moslora_ext.ops import experts as expert_ops
from moslora_ext.layers.experts import Experts
from moslora_ext.formats.peft_lora_experts import PEFT_REMAPPED_LEAF_NAMES
from moslora_ext.layers.routers import RouterWeight
from conftest import CUDA_SKIP
from reference import assert_close_to_reference

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=32)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=12, head_dim=8),
    "olmoe": lambda: transformers.OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, eos_token_id=1,
                                              pad_token_id=0),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **COMMON, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=12, first_k_dense_replace=1,
        n_shared_experts=1, n_group=2, topk_group=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, rope_scaling=None),
    "gpt_oss": lambda: transformers.GptOssConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                                 layer_types=["full_attention"] * 2),
}
KINDS = list(CONFIGS)


def tiny(kind, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]()).eval()


def ids(seed=0):
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def add_all_linear(model, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return moslora_ext.add_adapters(model, "all-linear", **{"r": 2, "lora_alpha": 4, **settings})


def perturb_B(model, std=0.3, seed=3):
    """A trained-looking adapter: every lora_B (of every adapter) drawn at random."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in moslora_ext.adapted_layers(model).values():
            for name, p in layer.adapters.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=std)


def saved_peft_adapter(kind, config, path, seed):
    """PEFT's adapter with ``config`` on the tiny ``kind``, every lora_B drawn at random, saved to
    ``path``; its logits."""
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(tiny(kind), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    peft_model.save_pretrained(path)
    return peft_model.eval()(ids()).logits


def merged_reference(model, adapted):
    """``model`` (a fresh copy of the base) with each adapter's ΔW added in plain PyTorch."""
    with torch.no_grad():
        for name, layer in moslora_ext.adapted_layers(adapted).items():
            if isinstance(layer, Experts):
                for parameter, a in layer.active.items():
                    delta = a.config.scale * torch.einsum("eor,ers,esi->eoi", a.lora_B, a.lora_mixer, a.lora_A)
                    getattr(model.get_submodule(name), parameter).add_(
                        delta.transpose(1, 2) if layer.is_transposed else delta)
            else:
                a = layer.active
                model.get_submodule(name).weight.add_(a.config.scale * a.lora_B @ a.lora_mixer @ a.lora_A)
    return model


# --- the operator ------------------------------------------------------------------------------


def expert_case(dtype=torch.float64, counts=(3, 0, 4), r=2, d=5, k=6, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    e, s = len(counts), sum(counts)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_()  # noqa: E731
    return (make(s, k), make(s, d), torch.tensor(counts, device=device).cumsum(0), make(e, r, d), make(e, r, r),
            make(e, k, r))


def reference_experts(base, x, offsets, A, M, B, scale):
    out, first = [], 0
    for e, end in enumerate(offsets.tolist()):
        out.append(base[first:end] + scale * x[first:end] @ A[e].T @ M[e].T @ B[e].T)
        first = end
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_expert_op_matches_a_per_expert_reference_with_gradients(dtype, device):
    case = expert_case(dtype, device=device)
    y = expert_ops.add_experts_moslora(*case, scale=0.7)
    y_ref = reference_experts(*case, 0.7)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [case[i] for i in (0, 1, 3, 4, 5)], grad)
    want = torch.autograd.grad(y_ref, [case[i] for i in (0, 1, 3, 4, 5)], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)
    assert got[2][1].abs().sum() == 0  # the expert no row was routed to gets no gradient


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_expert_op_with_a_large_scale_in_half_precision_stays_finite(dtype, device):
    """s = 64 and an input feature near the dtype's largest value / 20: s·U
    overflows the dtype, y and the gradients do not (as PEFT LoRA's dense
    layer, test_peft_route.py): the scale is applied in the GEMMs' accumulators."""
    base, x, offsets, A, M, B = (t.detach() for t in expert_case(counts=(3, 4), r=4, d=16, k=8))
    x[:, 0] = torch.finfo(dtype).max / 20
    A.mul_(0.1)[:, :, 0] = 0.5  # U ≈ x[:, 0] / 2
    B.mul_(0.01)
    M.copy_(torch.eye(4))
    grad = torch.randn_like(base) * 1e-3  # dB = s·Gᵀ U: within the dtype's range

    def run(function, to):
        inputs = [t.to(to, copy=True).requires_grad_() for t in (base, x, A, M, B)]
        y = function(*inputs[:2], offsets.to(to.device), *inputs[2:], 64.0)
        y.backward(grad.to(to))
        return [y.detach(), *(t.grad for t in inputs)]

    expected = run(reference_experts, torch.empty((), dtype=torch.float64))
    assert expected[0].abs().max() > 1000
    for got, want in zip(run(expert_ops.add_experts_moslora, torch.empty((), dtype=dtype, device=device)), expected,
                         strict=True):
        assert got.isfinite().all()
        assert_close_to_reference(got, want, dtype)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_expert_op_gradcheck_and_opcheck(dropout_p, device):
    base, x, offsets, A, M, B = expert_case(device=device)
    seed = torch.tensor([11]) if dropout_p else None
    op = torch.ops.moslora_ext.experts_forward
    assert torch.autograd.gradcheck(lambda *t: op(t[0], t[1], offsets, *t[2:], 0.7, dropout_p, seed)[0],
                                    (base, x, A, M, B))
    torch.library.opcheck(op, (base, x, offsets, A, M, B, 0.7, dropout_p, seed))
    grad = torch.randn_like(base)
    u = op(base, x, offsets, A, M, B, 0.7, dropout_p, seed)[1]
    torch.library.opcheck(torch.ops.moslora_ext.experts_backward,
                          (grad, x, offsets, A, M, B, u, 0.7, dropout_p, seed, [True, True, True, True]))


def test_expert_op_compiles_without_graph_breaks(device):
    # fullgraph=True fails on a graph break: on torch 2.11, Dynamo cannot trace
    # torch.amp.is_autocast_available, which the op's autocast check must not call in a traced frame.
    case = expert_case(torch.float32, device=device)
    compiled = torch.compile(expert_ops.add_experts_moslora, fullgraph=True, backend="aot_eager")
    y = compiled(*case, scale=0.7)
    torch.testing.assert_close(y, reference_experts(*case, 0.7), atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(y.square().sum(), case[3:])
    want = torch.autograd.grad(reference_experts(*case, 0.7).square().sum(), case[3:])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


EXPERT_COUNTS = {  # rows per expert: one expert; 8 with empty ones among them; 64, most of them empty
    "E=1": (5,), "E=8": (3, 0, 4, 0, 0, 6, 1, 0), "E=64": tuple((e * 7) % 5 if e % 3 else 0 for e in range(64))}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("counts", EXPERT_COUNTS.values(), ids=EXPERT_COUNTS.keys())
def test_expert_op_matches_a_per_expert_reference_for_any_number_of_experts(counts, dtype, device):
    """float32 runs torch's grouped GEMM, float64 the loop over experts (torch's grouped GEMM has no
    float64); r = 3 and d = 5 give rows that grouped GEMM cannot read in place (16-byte strides)."""
    case = expert_case(dtype, counts=counts, r=3, d=5, k=6, device=device)
    y = expert_ops.add_experts_moslora(*case, scale=0.7)
    grad = torch.randn_like(y)
    got = [y, *torch.autograd.grad(y, [case[i] for i in (0, 1, 3, 4, 5)], grad)]
    wide = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in case]
    y_ref = reference_experts(*wide, 0.7)
    want = [y_ref, *torch.autograd.grad(y_ref, [wide[i] for i in (0, 1, 3, 4, 5)], grad.double())]
    for g, w in zip(got, want, strict=True):
        assert_close_to_reference(g, w, dtype)
    empty = torch.tensor(counts, device=device) == 0
    for g in got[3:]:  # experts no row was routed to get zero gradients
        assert g[empty].abs().sum() == 0


def test_expert_op_runs_on_fake_tensors_forward_and_backward():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        case = expert_case(torch.float32, counts=(3, 0, 4, 5))
        y = expert_ops.add_experts_moslora(*case, scale=0.7, dropout_p=0.1)
        grads = torch.autograd.grad(y.sum(), [case[i] for i in (1, 3, 4, 5)])
    assert y.shape == (12, 6) and [tuple(g.shape) for g in grads] == [(12, 5), (4, 2, 5), (4, 2, 2), (4, 6, 2)]


def gemm_calls_of_a_training_step(experts, r=4, d=16, k=16, rows_each=4):
    """The outermost GEMM operators (those not inside another) that one forward and backward of the
    expert op with ``experts`` experts issues, counted by the torch profiler."""
    from torch.profiler import profile

    base, x, offsets, A, M, B = expert_case(torch.float32, counts=(rows_each,) * experts, r=r, d=d, k=k)
    gemms = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::_grouped_mm"}
    expert_ops.add_experts_moslora(base, x, offsets, A, M, B, 0.7).sum().backward()  # chooses the path
    with profile() as prof:
        expert_ops.add_experts_moslora(base, x, offsets, A, M, B, 0.7).sum().backward()

    def inside_a_gemm(event):
        parent = event.cpu_parent
        while parent is not None and parent.name not in gemms:
            parent = parent.cpu_parent
        return parent is not None

    return sum(e.name in gemms and not inside_a_gemm(e) for e in prof.events())


def test_expert_op_issues_as_many_gemms_for_64_experts_as_for_2():
    """One grouped pass: the GEMM calls of a step do not grow with the number of experts (each is one
    kernel on a GPU). The per-expert loop issued six per expert."""
    assert 0 < gemm_calls_of_a_training_step(2) == gemm_calls_of_a_training_step(64)


@CUDA_SKIP
def test_expert_op_reads_no_offsets_on_the_host_on_a_gpu():
    """A host read of the routing offsets is a device sync, which the sync debug mode turns into an
    error (bfloat16: the dtype torch's grouped GEMM kernels take on every GPU they support)."""
    case = [t.detach().to("cuda", torch.bfloat16 if t.is_floating_point() else t.dtype).requires_grad_(
        t.is_floating_point()) for t in expert_case(torch.float32, counts=(16, 0, 32, 16), r=8, d=64, k=64)]
    expert_ops.add_experts_moslora(*case, scale=0.7).sum().backward()  # the first call chooses the path
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        expert_ops.add_experts_moslora(*case, scale=0.7).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_expert_op_refuses_double_backward(device):
    """A second backward through the expert op's backward gave zero gradients
    (its backward op has no derivative) where the per-expert reference gives
    non-zero ones: refused, as the dense op refuses it."""
    case = expert_case(device=device)
    grad_B, = torch.autograd.grad(reference_experts(*case, 0.7).square().sum(), case[5], create_graph=True)
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(grad_B.square().sum(), (case[1], case[3])))
    y = expert_ops.add_experts_moslora(*case, scale=0.7)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(y.square().sum(), case[5], create_graph=True)


def test_an_adapted_moe_model_compiles_as_one_graph_like_its_base():
    # transformers' grouped experts forward stays in one graph (histc, not bincount); the adapted one must
    # too. (Forward only: on CPU, transformers 5.17's grouped GEMM fallback does not compile its backward.)
    model = add_all_linear(tiny("mixtral"), mixer_init="orthogonal")
    perturb_B(model)
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids()).logits
        torch.testing.assert_close(got, model(ids()).logits, atol=1e-5, rtol=1e-5)


def test_expert_dropout_masks_differ_between_experts():
    # Two experts with identical rows and identity factors, so y is the dropped x itself: one seed per
    # call, one mask over all routed rows, each row its own.
    eye = torch.eye(64).expand(2, 64, 64).contiguous()
    y = expert_ops.add_experts_moslora(torch.zeros(8, 64), torch.ones(8, 64), torch.tensor([4, 8]), eye, eye, eye,
                                       1.0, dropout_p=0.5)
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(y[:4], y[4:])


def test_expert_op_refuses_bad_offsets():
    base, x, _, A, M, B = expert_case()
    with pytest.raises(ValueError, match="offsets must end at the number of rows of x"):
        expert_ops.add_experts_moslora(base, x, torch.tensor([3, 3, 5]), A, M, B, 1.0)


# --- selection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_all_linear_selects_what_peft_selects_with_the_experts_and_routers(kind):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(tiny(kind), peft.LoraConfig(target_modules="all-linear", r=2))
    peft_targets = {n.removeprefix("base_model.model.").replace(".base_layer", "").rsplit(".lora_A", 1)[0]
                    for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    model = tiny(kind)
    routers = {n for n, m in model.named_modules() if "Router" in type(m).__name__}
    experts = {n for n, m in model.named_modules() if type(m).__name__.endswith("Experts")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left out on these models
        moslora_ext.add_adapters(model, "all-linear", r=2)
    layers = moslora_ext.adapted_layers(model)
    # PEFT's selection, with GPT-OSS's experts and router (PEFT's all-linear skips them) and the linear
    # layers PEFT's MoE conversion drops (DeepSeek-V3's dense MLP and shared experts).
    dropped = {n for n in layers if isinstance(layers[n], moslora_ext.Linear)
               and n.rsplit(".", 1)[-1] in PEFT_REMAPPED_LEAF_NAMES}
    assert set(layers) == peft_targets | experts | routers | dropped
    assert bool(dropped) == (kind == "deepseek_v3") and bool(experts - peft_targets) == (kind == "gpt_oss")
    assert all(set(layers[name].active) == {"gate_up_proj", "down_proj"} for name in experts)
    assert all(isinstance(layers[name], RouterWeight) for name in routers)


def test_target_parameters_selects_one_parameter_and_refuses_others_by_name():
    model = moslora_ext.add_adapters(tiny("mixtral"), target_parameters=["mlp.experts.down_proj"], r=2)
    layers = moslora_ext.adapted_layers(model)
    assert len(layers) == 2 and all(set(layer.active) == {"down_proj"} for layer in layers.values())
    model = tiny("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*neither fused expert"):
        moslora_ext.add_adapters(model, target_parameters=["q_proj.weight", "gate_up_proj"])
    with pytest.raises(ValueError, match=r"\['nonexistent'\] match no parameter"):
        moslora_ext.add_adapters(model, target_parameters=["nonexistent"])
    assert not moslora_ext.adapted_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", KINDS)
def test_target_parameters_take_router_weights_as_peft_does(kind, tmp_path):
    # The same target list as PEFT's (and the PEFT route's): the router's weight adapts the router.
    peft = pytest.importorskip("peft")
    router = {"gpt_oss": "mlp.router.weight"}.get(kind, "mlp.gate.weight")
    targets = ["mlp.experts.down_proj", router]
    model = moslora_ext.add_adapters(tiny(kind), target_parameters=targets, r=2, lora_alpha=4)
    routers = [name for name, layer in moslora_ext.adapted_layers(model).items() if isinstance(layer, RouterWeight)]
    assert routers and all(name + ".weight" in dict(tiny(kind).named_parameters()) for name in routers)
    perturb_B(model)
    moslora_ext.save_peft_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny(kind), tmp_path).eval()
    torch.testing.assert_close(theirs(ids()).logits, model(ids()).logits, atol=1e-5, rtol=1e-5)
    moslora_ext.add_adapters(model, target_parameters=targets, r=2, adapter_name="second")  # adapted routers too
    assert all(list(model.get_submodule(name).adapters) == ["default", "second"] for name in routers)


def tiny_phimoe():
    torch.manual_seed(0)
    return transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**COMMON, num_local_experts=4,
                                                                    num_experts_per_tok=2))


def test_no_match_error_lists_only_layers_that_take_adapters():
    # Phimoe's router is an nn.Linear subclass with a forward of its own, refused: it must not be offered.
    with pytest.raises(ValueError, match="matches no module") as error:
        moslora_ext.add_adapters(tiny_phimoe(), ["nonexistent"])
    message = str(error.value)
    assert "'router'" not in message and "'q_proj'" in message and "'gate_up_proj'" in message


def test_all_linear_names_the_router_weights_it_cannot_adapt():
    with pytest.warns(UserWarning, match=r"leaves out 2 parameters.*model\.layers\.0\.mlp\.router\.weight"):
        model = moslora_ext.add_adapters(tiny_phimoe(), "all-linear", r=2)
    assert not any("router" in name for name in moslora_ext.adapted_layers(model))


def test_a_second_all_linear_adapter_warns_of_nothing_and_reaches_the_experts():
    model = add_all_linear(tiny("mixtral"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first adapter's own 3-D tensors are not parameters left out
        moslora_ext.add_adapters(model, "all-linear", r=2, adapter_name="other")
    assert list(model.model.layers[0].mlp.experts.adapters) == ["default", "other"]


# --- forward, training, merging -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_add_train_save_load_merge(kind, tmp_path):
    model = add_all_linear(tiny(kind), mixer_init="orthogonal", lora_dropout=0.1)
    perturb_B(model)
    model.eval()
    logits = model(ids()).logits
    reference = merged_reference(tiny(kind), model)
    torch.testing.assert_close(logits, reference(ids()).logits, atol=1e-5, rtol=1e-5)
    # Train (dropout on): the loss falls and only adapter tensors change.
    model.train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids(), labels=ids()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(frozen[k], v) for k, v in model.state_dict().items() if k in frozen)
    model.eval()
    trained = model(ids()).logits
    moslora_ext.save_adapter(model, tmp_path / "ours")
    loaded = moslora_ext.load_adapter(tiny(kind), tmp_path / "ours")
    torch.testing.assert_close(loaded(ids()).logits, trained, atol=0, rtol=0)
    # Merge in place into the fused parameters, unmerge, then merge_and_unload.
    experts = next(layer for layer in moslora_ext.adapted_layers(model).values() if isinstance(layer, Experts))
    storage, original = experts.gate_up_proj.data_ptr(), experts.gate_up_proj.detach().clone()
    moslora_ext.merge_adapters(model, safe=True)
    assert experts.gate_up_proj.data_ptr() == storage
    torch.testing.assert_close(model(ids()).logits, trained, atol=1e-5, rtol=1e-5)
    moslora_ext.unmerge_adapters(model)
    torch.testing.assert_close(experts.gate_up_proj, original, atol=1e-6, rtol=0)
    base_class = type(experts.base_experts)
    plain = moslora_ext.merge_and_unload(model)
    assert not moslora_ext.adapted_layers(plain)
    assert type(plain.get_submodule(next(n for n, m in plain.named_modules() if isinstance(m, base_class)))) is base_class
    torch.testing.assert_close(plain(ids()).logits, trained, atol=1e-5, rtol=1e-5)


def test_float32_adapters_on_a_bfloat16_model():
    model = add_all_linear(tiny("mixtral").to(torch.bfloat16))
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.bfloat16
    assert experts.active["gate_up_proj"].lora_A.dtype == torch.float32
    model(ids()).logits.float().sum().backward()
    assert experts.active["gate_up_proj"].lora_A.grad.dtype == torch.float32


def test_named_adapters_and_the_trainer_checkpoint_path(tmp_path):
    model = add_all_linear(tiny("qwen3_moe"))
    moslora_ext.add_adapters(model, target_parameters=["mlp.experts.down_proj"], r=3, adapter_name="second")
    perturb_B(model)
    first = model(ids()).logits
    model.save_pretrained(tmp_path)  # what the HF Trainer's checkpoints hold
    moslora_ext.set_adapter(model, "second")
    second = model(ids()).logits
    assert not torch.allclose(first, second)
    for name, want in (("default", first), ("second", second)):
        loaded = moslora_ext.load_adapter(tiny("qwen3_moe"), tmp_path, adapter_name=name)
        torch.testing.assert_close(loaded(ids()).logits, want, atol=0, rtol=0)
    with moslora_ext.disable_adapters(model):
        torch.testing.assert_close(model(ids()).logits, tiny("qwen3_moe")(ids()).logits, atol=0, rtol=0)


def test_a_trainer_resuming_from_a_checkpoint_restores_the_expert_and_router_adapters(tmp_path):
    # Mixtral's checkpoints name its mlp block_sparse_moe; the Trainer resumes with a plain load_state_dict.
    pytest.importorskip("accelerate")
    rows = torch.cat([ids(seed) for seed in range(4)])

    def trainer(model):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=2, learning_rate=1e-2,
                                              per_device_train_batch_size=2, report_to=[], use_cpu=True,
                                              disable_tqdm=True)
        return transformers.Trainer(model=model, args=args,
                                    train_dataset=[{"input_ids": row, "labels": row} for row in rows])

    model = add_all_linear(tiny("mixtral")).train()
    trainer(model).train()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    resumed = add_all_linear(tiny("mixtral")).train()
    trainer(resumed).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))  # no step left: it only loads
    restored = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert restored.keys() == trained.keys() and any(".mlp.gate." in n for n in restored)
    assert [n for n in trained if not torch.equal(restored[n], trained[n])] == []


# --- PEFT interop ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_peft_target_parameters_adapters_load_with_peft_logits(kind, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    want = saved_peft_adapter(kind, config, tmp_path, seed=2)
    ours = moslora_ext.load_peft_adapter(tiny(kind), tmp_path)
    torch.testing.assert_close(ours(ids()).logits, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, tiny(kind)(ids()).logits, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_save_peft_adapter_is_loaded_by_peft_with_our_logits(kind, tmp_path):
    # DeepSeek-V3's dense MLP and shared experts are named like the experts PEFT's MoE conversion remaps.
    peft = pytest.importorskip("peft")
    model = add_all_linear(tiny(kind), mixer_init="orthogonal", lora_dropout=0.05)
    perturb_B(model)
    ours = model(ids()).logits
    with pytest.warns(UserWarning, match="writes lora_dropout 0 .*trained with 0.05"):
        moslora_ext.save_peft_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny(kind), tmp_path).eval()
    torch.testing.assert_close(theirs(ids()).logits, ours, atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert any(name.endswith("experts.gate_up_proj") for name in config["target_parameters"])
    # and back: the same logits with identity frozen mixers
    again = moslora_ext.load_peft_adapter(tiny(kind), tmp_path)
    torch.testing.assert_close(again(ids()).logits, ours, atol=1e-5, rtol=1e-5)


def test_peft_layout_before_0_19_1_is_read(tmp_path):
    """PEFT < 0.19.1 read an (E, out, in) parameter as (E, in, out): lora_A (E·r, out), lora_B (in, r·E)."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    config = peft.LoraConfig(r=2, lora_alpha=4, target_parameters=["mlp.experts.gate_up_proj"])
    peft_model = peft.get_peft_model(tiny("mixtral"), config)
    perturb = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=perturb) * 0.3)
    want = peft_model.eval()(ids()).logits
    peft_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    old = {}
    for key in tensors:  # the same ΔW_e = B_e A_e = (A_eᵀ B_eᵀ)ᵀ in the old layout
        prefix, kind = key.rsplit(".lora_", 1)
        e, r = 4, 2
        A = tensors[prefix + ".lora_A.weight"].reshape(e, r, -1)
        B = tensors[prefix + ".lora_B.weight"].reshape(-1, r, e).permute(2, 0, 1)
        old[key] = (B.transpose(1, 2).reshape(e * r, -1) if kind.startswith("A")
                    else A.permute(2, 1, 0).reshape(-1, r * e)).contiguous()
    save_file(old, tmp_path / "adapter_model.safetensors")
    ours = moslora_ext.load_peft_adapter(tiny("mixtral"), tmp_path)
    torch.testing.assert_close(ours(ids()).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3"])
def test_peft_all_linear_adapters_load_with_peft_logits(kind, tmp_path):
    # Router weights (gate.weight) and gate_up_proj at twice the rank (PEFT's rank_pattern for fused experts).
    peft = pytest.importorskip("peft")
    want = saved_peft_adapter(kind, peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"), tmp_path, seed=6)
    ours = moslora_ext.load_peft_adapter(tiny(kind), tmp_path)
    layers = moslora_ext.adapted_layers(ours)
    assert any(isinstance(layer, RouterWeight) for layer in layers.values())
    torch.testing.assert_close(ours(ids()).logits, want, atol=1e-5, rtol=1e-5)
    # and back to PEFT: gate_up_proj's rank 4 among rank-2 layers goes in rank_pattern
    moslora_ext.save_peft_adapter(ours, tmp_path / "back")
    assert set(json.loads((tmp_path / "back" / "adapter_config.json").read_text())["rank_pattern"].values()) == {4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(tiny(kind), tmp_path / "back").eval()
    torch.testing.assert_close(again(ids()).logits, want, atol=1e-5, rtol=1e-5)


def test_peft_rank_and_alpha_patterns_apply_to_expert_parameters(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                             rank_pattern={"gate_up_proj": 4}, alpha_pattern={"gate_up_proj": 3})
    want = saved_peft_adapter("qwen3_moe", config, tmp_path, seed=4)
    ours = moslora_ext.load_peft_adapter(tiny("qwen3_moe"), tmp_path)
    experts = ours.model.layers[0].mlp.experts
    assert (experts.active["gate_up_proj"].config.r, experts.active["down_proj"].config.r) == (4, 2)
    assert experts.active["gate_up_proj"].config.scale == 3 / 4
    torch.testing.assert_close(ours(ids()).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("patterns", [{"alpha_pattern": {"mlp.gate": 3}}, {"rank_pattern": {"mlp.gate": 3}},
                                      {"alpha_pattern": {"mlp.gate.weight": 3}, "rank_pattern": {"gate.weight": 3}},
                                      {"alpha_pattern": {"q_proj.weight": 3}}, {"alpha_pattern": {"q_proj": 3}}])
def test_peft_patterns_match_the_names_peft_matches(patterns, tmp_path):
    # PEFT matches a target_parameters entry by <module>.<parameter> (the router's gate.weight), a
    # target_modules layer by its module name: a pattern naming the other is ignored, as by PEFT.
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], **patterns,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.gate.weight"])
    want = saved_peft_adapter("mixtral", config, tmp_path, seed=7)
    ours = moslora_ext.load_peft_adapter(tiny("mixtral"), tmp_path)
    torch.testing.assert_close(ours(ids()).logits, want, atol=1e-5, rtol=1e-5)


def test_peft_target_parameters_on_another_module_are_refused_by_name(tmp_path):
    # PEFT adapts an embedding's stored (num_embeddings, dim) tensor as a matrix; our Embedding layer does not.
    peft = pytest.importorskip("peft")
    saved_peft_adapter("mixtral", peft.LoraConfig(r=2, target_parameters=["embed_tokens.weight"]), tmp_path, seed=1)
    model = tiny("mixtral")
    with pytest.raises(ValueError, match=r"adapts model\.embed_tokens\.weight, the weight of a torch\.nn\.Embedding"):
        moslora_ext.load_peft_adapter(model, tmp_path)
    assert not moslora_ext.adapted_layers(model)


def test_save_peft_adapter_of_expert_parameters_only(tmp_path):
    # No target_modules: written as [], since for None PEFT would put in its default targets (q_proj, v_proj).
    peft = pytest.importorskip("peft")
    model = moslora_ext.add_adapters(tiny("mixtral"), target_parameters=["mlp.experts.gate_up_proj"], r=2,
                                     mixer_init="orthogonal")
    perturb_B(model)
    moslora_ext.save_peft_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny("mixtral"), tmp_path).eval()
    torch.testing.assert_close(theirs(ids()).logits, model(ids()).logits, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) and not isinstance(m, peft.tuners.lora.ParamWrapper)
                   for m in theirs.modules())


def test_training_merged_expert_and_router_layers_says_that_they_are_merged():
    model = moslora_ext.add_adapters(tiny("mixtral"), ["experts", "gate"], r=2)
    moslora_ext.merge_adapters(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train()(ids())
    merged = {str(w.message).split("this ")[1].split("'s")[0] for w in caught if "unmerge before training" in
              str(w.message)}
    assert merged == {"Experts", "RouterWeight"}


def test_safe_merge_refuses_a_non_finite_expert_and_leaves_the_weights_bit_identical():
    model = moslora_ext.add_adapters(tiny("gpt_oss"), target_parameters=["gate_up_proj", "down_proj"], r=2)
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.active["down_proj"].lora_B[1].fill_(float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="safe merge refused"):
        moslora_ext.merge_adapters(model, safe=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(layer.merged for layer in moslora_ext.adapted_layers(model).values())


def test_mixed_adapter_batches_are_refused_on_expert_layers():
    model = add_all_linear(tiny("mixtral"))
    # ValueError on both routes: PEFT's ParamWrapper refuses them so (test_peft_experts)
    with pytest.raises(ValueError, match=r"mixed-adapter batches\) is not supported on \['Experts', "
                                         r"'RouterWeight'\] layers"):
        model(ids(), adapter_names=["default", "__base__"])
