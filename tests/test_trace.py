"""The tracer's handler registry: a custom layer kind is one registered handler, and an
unregistered one fails naming the node and the remedy."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hetmerge as hm
from hetmerge.maps import permute_state
from hetmerge.spec import SpecError
from hetmerge.trace import handler_for, _MODULE_HANDLERS


class ScaledLinear(nn.Module):
    """A Linear with a learned per-output scale, written with F.linear (parameters used outside any
    torch.nn layer, so fx alone cannot follow it)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out))
        self.scale = nn.Parameter(torch.rand(n_out) + 0.5)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * self.scale


def net():
    torch.manual_seed(0)
    return nn.Sequential(ScaledLinear(12, 16), nn.ReLU(), ScaledLinear(16, 8), nn.GELU(), nn.Linear(8, 3))


@pytest.fixture
def scaled_linear_handler():
    @hm.register_handler(ScaledLinear)
    def _scaled(tracer, node, module):
        out = tracer.linear(node, module, tracer.single_input(node, module))
        tracer.add_axis(tracer.key(str(node.target), "scale"), 0, out.group)
        tracer.layers[out.layer][1]["scale"] = tracer.key(str(node.target), "scale")
        return out
    yield _scaled
    del _MODULE_HANDLERS[ScaledLinear]


class EinsumLinear(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))

    def forward(self, x):
        return torch.einsum("ni,oi->no", x, self.weight)


def test_unregistered_custom_module_names_the_remedy():
    with pytest.raises(SpecError, match=r"node 'einsum'.*module '0'.*not supported.*register_handler"):
        hm.trace_spec(nn.Sequential(EinsumLinear(4, 6), nn.ReLU(), nn.Linear(6, 2)))


def invariant_under_random_perms(model, spec, x):
    g = torch.Generator().manual_seed(3)
    perms = {grp: torch.randperm(n, generator=g) for grp, n in spec.sizes.items()}
    m2 = copy.deepcopy(model)
    m2.load_state_dict(permute_state(spec, model.state_dict(), perms))
    torch.testing.assert_close(m2(x), model(x), rtol=1e-5, atol=1e-6)


def test_custom_module_with_functional_linear_is_traced_into():
    # F.linear(x, self.weight, self.bias) * self.scale: the get_attr nodes are followed to F.linear
    # and to the product, with no handler for ScaledLinear
    model = net().eval()
    spec = hm.trace_spec(model)
    assert spec.sizes == {"0": 16, "2": 8}
    assert sorted(spec.groups["0"]) == [("0.bias", 0), ("0.scale", 0), ("0.weight", 0), ("2.weight", 1)]
    assert spec.layers[0].params == {"weight": "0.weight", "bias": "0.bias", "norm.scale": "0.scale"}
    invariant_under_random_perms(model, spec, torch.randn(9, 12))


def test_registered_handler_traces_custom_module_as_a_leaf(scaled_linear_handler):
    model = net().eval()
    spec = hm.trace_spec(model)
    assert spec.sizes == {"0": 16, "2": 8}
    assert sorted(spec.groups["0"]) == [("0.bias", 0), ("0.scale", 0), ("0.weight", 0), ("2.weight", 1)]
    assert spec.layers[0].params["scale"] == "0.scale"
    # the handler's description is right iff permuting the groups leaves the outputs unchanged
    invariant_under_random_perms(model, spec, torch.randn(9, 12))


def test_handler_lookup_follows_the_mro():
    class MyReLU(nn.ReLU):
        pass
    assert handler_for(MyReLU()) is handler_for(nn.ReLU)
    assert handler_for(nn.TransformerDecoderLayer) is None
    assert handler_for(nn.Bilinear) is None


def test_subclass_with_its_own_forward_is_traced_into_not_given_its_base_handler():
    # a LayerNorm subclass that normalizes the channels of NCHW by permuting them last (timm's
    # LayerNorm2d) is not a LayerNorm over the last dim: the base's handler would describe it wrongly
    class LayerNorm2d(nn.LayerNorm):
        def forward(self, x):
            return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                                self.eps).permute(0, 3, 1, 2)
    assert handler_for(LayerNorm2d) is None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 5, 3), LayerNorm2d(5), nn.Conv2d(5, 2, 1)).eval()
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
    spec = hm.trace_spec(model)
    assert sorted(spec.groups["0"]) == [("0.bias", 0), ("0.weight", 0), ("1.bias", 0), ("1.weight", 0),
                                        ("2.weight", 1)]
    invariant_under_random_perms(model, spec, torch.randn(2, 1, 6, 6))


def test_register_handler_rejects_non_kinds():
    with pytest.raises(TypeError, match="not an nn.Module"):
        hm.register_handler(int)
    with pytest.raises(TypeError, match="at least one"):
        hm.register_handler()


def test_permspec_prints_a_short_summary():
    spec = hm.trace_spec(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)))
    assert repr(spec) == "PermSpec(1 free groups [0=6], 2 layers, fixed ['input', 'output'])"


def test_example_input_leaves_running_stats_untouched():
    # tracing runs example_input through the model once; in training mode that used to update the
    # BatchNorm running statistics of the user's model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hm.trace_spec(model, torch.randn(5, 1, 4, 4) * 3 + 1)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
