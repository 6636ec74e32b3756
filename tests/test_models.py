"""The backbone registry and pre-logits embeddings."""

from __future__ import annotations

import pytest
import torch

from bench.errors import BadInput
from bench.models import create_model, embed, list_models, model_info


@pytest.fixture(autouse=True)
def _one_thread():
    # One intra-op thread: on a shared 2-core machine more threads make these tiny models slower, not faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_registry_holds_timm_and_monai_networks():
    names = list_models()
    for required in ("resnet18", "efficientnet_b0", "convnext_atto", "resnet10t", "densenet121"):
        assert required in names
    assert model_info("densenet121").family == "monai"
    assert model_info("resnet18").family == "timm"


def test_unknown_model_is_bad_input_listing_known_names():
    with pytest.raises(BadInput) as e:
        create_model("resnet999", 3, 1)
    msg = str(e.value)
    assert "'resnet999'" in msg
    for name in list_models():
        assert name in msg


@pytest.mark.parametrize("bad", [{"num_classes": 1, "in_chans": 1}, {"num_classes": 3, "in_chans": 2}])
def test_bad_shapes_are_bad_input(bad):
    with pytest.raises(BadInput, match="resnet10t"):
        create_model("resnet10t", **bad)


@pytest.mark.parametrize(
    "name,in_chans",
    [
        (n, 1)
        for n in (
            "resnet10t",
            "resnet18",
            "efficientnet_b0",
            "convnext_atto",
            "densenet121",
            "mobilenetv3_small_050",
        )
    ]
    + [("resnet10t", 3), ("densenet121", 3)],
)
def test_logits_shape_and_embedding_is_the_classifier_input(name, in_chans):
    torch.manual_seed(0)
    model = create_model(name, 4, in_chans).eval()
    x = torch.randn(2, in_chans, 32, 32)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 4)
    z = embed(model, x)
    assert z.ndim == 2 and z.shape[0] == 2
    # The embedding is exactly what the last linear layer sees: applying it reproduces the logits.
    head = model.class_layers.out if name == "densenet121" else model.get_classifier()
    with torch.no_grad():
        assert torch.allclose(head(z), logits, atol=1e-5)
    assert z.shape[1] == head.in_features


def test_models_are_built_without_pretrained_weights_deterministically():
    torch.manual_seed(1)
    a = create_model("resnet10t", 3, 1)
    torch.manual_seed(1)
    b = create_model("resnet10t", 3, 1)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert a.bench_spec == {"name": "resnet10t", "num_classes": 3, "in_chans": 1}
