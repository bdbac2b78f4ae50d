"""`kasmina.wrap` on real architectures (issue #10), each built from a tiny config with random
weights: the all-dormant wrapped model is the bare one bit for bit, it trains, and a seed on
one of its layers trains with it. Then the rules of what wrap chooses and skips."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys

import kasmina
import pytest
import torch
import torch.nn.functional as F
from kasmina import KasminaConfig, KasminaLayer, SeedStage
from kasmina.wrap import check_unique_ids, default_targets, name_layers
from torch import nn

# transformers' own deprecation notices while it builds a model are its business, not ours.
hf_warnings = pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers",
                                         "ignore::FutureWarning:transformers")
VOCAB, SEQ = 100, 8


def ids(model: nn.Module) -> list[str]:
    return [layer.layer_id for layer in kasmina.seed_layers(model)]


def check_exact_then_train(model: nn.Module, forward, loss_fn, **wrap_kwargs) -> nn.Module:
    """Wrap `model`; its all-dormant output equals a copy of the bare model's bit for bit (eval,
    grad on so torch takes its plain paths in both), and it trains 3 host steps; then a seed of
    the first layer goes to TRAINING and its blueprint learns over 3 more steps."""
    reference = copy.deepcopy(model).eval()
    kasmina.wrap(model, seeds_per_layer=4, **wrap_kwargs)
    layers = kasmina.seed_layers(model)
    assert layers, "wrap put no seed layer into the model"
    model.eval()
    assert torch.equal(forward(model), forward(reference))

    model.train()
    optimizer = torch.optim.Adam(kasmina.host_parameters(model), lr=1e-3)

    def train_step() -> float:
        loss = loss_fn(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for layer in layers:
            layer.step(loss.detach())
        return float(loss.detach())

    losses = [train_step() for _ in range(3)]
    layer = layers[0]
    layer.germinate(0, "residual_mlp")
    layer.transition(0, SeedStage.TRAINING, force=True)
    host = {id(p) for p in kasmina.host_parameters(model)}
    blueprint = [p for p in model.parameters() if id(p) not in host]
    assert blueprint, "the seed has no parameters outside host_parameters"
    before = [p.detach().clone() for p in blueprint]
    losses += [train_step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(b, p) for b, p in zip(before, blueprint, strict=True)), \
        "the TRAINING seed's blueprint did not change: the seed layer was never called"
    assert layer.stage_of(0) == SeedStage.TRAINING
    return model


# ---------------------------------------------------------------- torch.nn.TransformerEncoder
def encoder() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=64, dropout=0.0,
                                       batch_first=True)
    return nn.TransformerEncoder(block, num_layers=2)


def test_transformer_encoder_wraps_its_linears_and_skips_attention_out_proj(caplog):
    x, target = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    with caplog.at_level(logging.INFO, logger="kasmina"):
        model = check_exact_then_train(encoder(), lambda m: m(x),
                                       lambda m: F.mse_loss(m(x), target))
    assert ids(model) == [f"layers.{i}.{n}" for i in (0, 1) for n in ("linear1", "linear2")]
    assert type(model.layers[0].self_attn.out_proj) is nn.modules.linear.\
        NonDynamicallyQuantizableLinear
    skips = [r.getMessage() for r in caplog.records if "out_proj" in r.getMessage()]
    assert skips == ["kasmina.wrap: skipped 2 MultiheadAttention.out_proj (its parent reads the "
                     "weight directly; seeds there would never run)"]  # one line, not one a module


def test_the_fused_path_guard_is_on_exactly_in_eval_mode():
    """The hook that keeps torch's fused encoder path off is there in eval mode only (it costs
    every training call host time), also for a model wrapped while in eval mode."""
    from kasmina.host import no_fused_fast_path
    model = kasmina.wrap(encoder().eval(), seeds_per_layer=4)
    layers = kasmina.seed_layers(model)

    def guards() -> list[int]:
        return [list(layer._forward_pre_hooks.values()).count(no_fused_fast_path)
                for layer in layers]
    assert guards() == [1] * len(layers)
    model.train()
    assert guards() == [0] * len(layers)
    model.eval()
    model.eval()
    assert guards() == [1] * len(layers)
    dual = kasmina.DualPathLayer(nn.Linear(8, 8).eval(), 2)  # (the migration's layer alike)
    assert list(dual._forward_pre_hooks.values()) == [no_fused_fast_path]
    assert not dual.train()._forward_pre_hooks


def test_transformer_encoder_inference_runs_the_seeds():
    """eval + no_grad is where torch's fused encoder path would read linear1.weight itself (and
    the nested-tensor path with a padding mask): a grafting seed must change that output."""
    model = kasmina.wrap(encoder(), seeds_per_layer=4, config=KasminaConfig(ramp_steps=2))
    assert model.use_nested_tensor is False
    x = torch.randn(3, 5, 32)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    model.eval()
    with torch.no_grad():
        before, before_padded = model(x), model(x, src_key_padding_mask=pad)
    layer = model.layers[1].linear1
    layer.germinate(0, "residual_mlp")
    for stage in (SeedStage.TRAINING, SeedStage.GRAFTING):
        layer.transition(0, stage, force=True)
    model.train()
    for _ in range(2):  # alpha ramps to 1; no host optimizer: only the seed can change the output
        model(x).square().mean().backward()
        layer.step()
    assert float(layer.alpha[0]) == 1.0
    model.eval()
    with torch.no_grad():
        after, after_padded = model(x), model(x, src_key_padding_mask=pad)
    assert torch.isfinite(after).all() and torch.isfinite(after_padded).all()
    assert not torch.equal(after, before)
    assert not torch.equal(after_padded, before_padded)


# ---------------------------------------------------------------- Hugging Face models
def token_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def gpt2():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=2 * SEQ, n_embd=32, n_layer=2,
                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


@hf_warnings
def test_gpt2_wraps_conv1d_and_keeps_the_tied_head(caplog):
    from transformers.pytorch_utils import Conv1D

    assert Conv1D in default_targets()
    batch = token_batch()
    with caplog.at_level(logging.INFO, logger="kasmina"):
        model = check_exact_then_train(gpt2(), lambda m: m(batch).logits,
                                       lambda m: m(batch, labels=batch).loss)
    assert ids(model) == [f"transformer.h.{i}.{n}" for i in (0, 1)
                          for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert model.transformer.h[0].mlp.c_fc.num_seeds == 4
    # Tied to the embeddings: skipped by default (Hugging Face's tie_weights and save_pretrained
    # find the tied weight by its path), one line saying so, and the tie holds.
    assert not isinstance(model.lm_head, KasminaLayer)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert any("skipped 1 GPT2LMHeadModel.lm_head (its weight is tied to transformer.wte.weight"
               in r.getMessage() for r in caplog.records)


@hf_warnings
def test_gpt2_tied_head_named_in_target_modules_is_wrapped_and_stays_tied():
    batch = token_batch()
    model = check_exact_then_train(gpt2(), lambda m: m(batch).logits,
                                   lambda m: m(batch, labels=batch).loss,
                                   target_modules=["lm_head", "mlp.c_fc"])
    assert set(ids(model)) == {"lm_head", "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}
    assert isinstance(model.lm_head, KasminaLayer)
    assert model.lm_head.host.weight is model.transformer.wte.weight  # trained as one matrix


@hf_warnings
def test_bert_sequence_classifier_with_an_exclude_regex():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=2 * SEQ, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batch, labels = token_batch(), torch.tensor([0, 2])
    model = check_exact_then_train(transformers.BertForSequenceClassification(cfg),
                                   lambda m: m(batch).logits,
                                   lambda m: m(batch, labels=labels).loss,
                                   exclude=r".*attention\.self\.(query|key)")
    per_block = ["attention.self.value", "attention.output.dense", "intermediate.dense",
                 "output.dense"]
    assert ids(model) == [f"bert.encoder.layer.{i}.{n}" for i in (0, 1) for n in per_block] + [
        "bert.pooler.dense", "classifier"]
    assert model.classifier.num_seeds == 3  # clamped to the 3 labels


@hf_warnings
def test_llama_with_peft_style_target_modules():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=2 * SEQ)
    batch = token_batch()
    model = check_exact_then_train(transformers.LlamaForCausalLM(cfg), lambda m: m(batch).logits,
                                   lambda m: m(batch, labels=batch).loss,
                                   target_modules=["q_proj", "v_proj", "mlp.down_proj"])
    assert ids(model) == [f"model.layers.{i}.{n}" for i in (0, 1)
                          for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert model.model.layers[0].self_attn.v_proj.num_seeds == 4  # 16 features (1 kv head)


# ---------------------------------------------------------------- a CNN
def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_cnn_keeps_its_convolutions_and_seeds_the_head():
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    model = check_exact_then_train(cnn(), lambda m: m(x), lambda m: F.cross_entropy(m(x), y))
    assert ids(model) == ["6"]
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Conv2d


def test_target_modules_naming_a_module_that_cannot_host_seeds_raises_and_changes_nothing():
    model = cnn()
    with pytest.raises(TypeError, match=r"target_modules names '2': a Conv2d cannot host seeds"):
        kasmina.wrap(model, target_modules=["6", "2"])
    assert not kasmina.seed_layers(model)  # checked before anything was replaced


# ---------------------------------------------------------------- what wrap chooses
class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc": nn.Linear(4, 4), "myfc": nn.Linear(4, 4),
                           "fc2": nn.Linear(4, 4)}) for _ in range(2))
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize(("kwargs", "wrapped"), [
    ({}, ["blocks.0.fc", "blocks.0.myfc", "blocks.0.fc2", "blocks.1.fc", "blocks.1.myfc",
          "blocks.1.fc2", "head"]),
    ({"target_modules": ["fc"]}, ["blocks.0.fc", "blocks.1.fc"]),  # suffixes at "." only
    ({"target_modules": ["1.fc", "head"]}, ["blocks.1.fc", "head"]),
    ({"target_modules": r"blocks\.\d\.(my)?fc"}, ["blocks.0.fc", "blocks.0.myfc", "blocks.1.fc",
                                                  "blocks.1.myfc"]),
    ({"target_modules": r"fc"}, None),  # a regex is matched against the whole path
    ({"exclude": ["fc", "head"]}, ["blocks.0.myfc", "blocks.0.fc2", "blocks.1.myfc",
                                   "blocks.1.fc2"]),
    ({"exclude": r"blocks\.0\..*"}, ["blocks.1.fc", "blocks.1.myfc", "blocks.1.fc2", "head"]),
    ({"target_modules": ["fc", "fc2"], "exclude": ["0.fc"]}, ["blocks.0.fc2", "blocks.1.fc",
                                                             "blocks.1.fc2"]),
])
def test_target_modules_and_exclude_match_like_peft(kwargs, wrapped):
    model = Tower()
    if wrapped is None:
        with pytest.raises(ValueError, match="wrapped no module of Tower"):
            kasmina.wrap(model, **kwargs)
        return
    kasmina.wrap(model, seeds_per_layer=2, **kwargs)
    assert ids(model) == wrapped


def test_targets_and_target_modules_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        kasmina.wrap(Tower(), targets=(nn.Linear,), target_modules=["fc"])


class ReadsWeight(nn.Module):
    """A parent that computes with its child's weight instead of calling it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.called = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.called(F.linear(x, self.proj.weight, self.proj.bias))


class ReadsDtype(nn.Module):
    """A parent that reads its child's weight only for its dtype (T5's feed-forward does)."""

    def __init__(self) -> None:
        super().__init__()
        self.wo = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(x.to(self.wo.weight.dtype))


def test_children_their_parent_reads_directly_are_skipped_with_one_line_per_kind(caplog):
    model = nn.Sequential(ReadsWeight(), ReadsWeight(), ReadsDtype(),
                          nn.LinearCrossEntropyLoss(4, 3))
    with caplog.at_level(logging.INFO, logger="kasmina"):
        kasmina.wrap(model, seeds_per_layer=2)
    wrapped = ["0.called", "1.called"]
    if hasattr(KasminaLayer, "weight"):  # a seed layer answers .weight: the dtype read works
        wrapped.append("2.wo")
    assert ids(model) == wrapped
    x = torch.randn(3, 4)
    assert model[2](x).shape == (3, 4) and model[1](model[0](x)).shape == (3, 4)
    lines = [r.getMessage() for r in caplog.records]
    assert "kasmina.wrap: skipped 2 ReadsWeight.proj (its parent reads the weight directly; "\
           "seeds there would never run)" in lines
    assert any(line.startswith("kasmina.wrap: skipped 1 LinearCrossEntropyLoss.linear (its "
                               "parent reads the weight directly") for line in lines)
    assert len([line for line in lines if "ReadsWeight" in line]) == 1


def test_a_module_at_two_paths_is_skipped(caplog):
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))
    with caplog.at_level(logging.INFO, logger="kasmina"):
        kasmina.wrap(model, seeds_per_layer=2)
    assert ids(model) == ["3"] and model[0] is shared and model[2] is shared
    assert [r.getMessage() for r in caplog.records] == [
        "kasmina.wrap: skipped 1 Linear (the same module sits at 2 paths; one seed layer cannot "
        "have two ids)"]


def test_lazy_linear_without_a_shape_raises():
    with pytest.raises(TypeError, match="has no shape yet"):
        kasmina.wrap(nn.Sequential(nn.LazyLinear(4)))


def test_wrap_does_not_import_transformers():
    code = ("import sys, kasmina, torch; kasmina.wrap(torch.nn.Sequential(torch.nn.Linear(2, 4)),"
            " seeds_per_layer=2); assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- ids and host parameters
def test_name_layers_gives_blocks_wrapped_one_by_one_their_root_paths():
    root = nn.Sequential(nn.ModuleDict({"fc": nn.Linear(4, 4)}),
                         nn.ModuleDict({"fc": nn.Linear(4, 4)}))
    for block in root:
        kasmina.wrap(block, seeds_per_layer=2)
    assert ids(root) == ["fc", "fc"]
    with pytest.raises(ValueError, match=r"ids collide: 'fc' \(2 layers\).*name_layers"):
        check_unique_ids(kasmina.seed_layers(root))
    layers = name_layers(root)
    assert [layer.layer_id for layer in layers] == ["0.fc", "1.fc"] == ids(root)
    assert kasmina.name_layers is name_layers and kasmina.check_unique_ids is check_unique_ids
    check_unique_ids(layers)


def test_host_parameters_leaves_out_what_blueprint_parameters_names():
    model = kasmina.wrap(nn.Sequential(nn.Linear(4, 8)), seeds_per_layer=2)
    layer = model[0]
    layer.germinate(0, "residual_mlp")
    everything = {id(p) for p in model.parameters()}
    blueprint = {id(p) for p in (layer.blueprint_parameters() if hasattr(
        layer, "blueprint_parameters") else layer.banks.parameters())}
    assert blueprint and {id(p) for p in kasmina.host_parameters(model)} == everything - blueprint
    assert {id(p) for p in kasmina.host_parameters(model)} == {id(layer.host.weight),
                                                                id(layer.host.bias)}
