"""The ids the runtime puts on the bus: one rule (oona.ids) checked at attach, so a job Tamiyo
would refuse fails at once; and every id real wrapped models produce (Hugging Face module paths,
torch.compile's `_orig_mod.` prefix, a model that is itself one seed layer) passes Tamiyo's own
checks of what it reads, on the reports and events the runtime really published."""

from __future__ import annotations

import asyncio
import uuid

import kasmina
import oona
import pytest
import torch
from kasmina.wrap import ROOT_LAYER_ID, name_layers
from oona import streams
from oona.contracts import EpochEvent, LayerHealthReport
from tamiyo.validation import check_epoch_event, check_report
from torch import nn

hf_warnings = pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers",
                                         "ignore::FutureWarning:transformers")
# Nothing listens there: a check that let an id through would fail on the bus instead, with a
# ConnectionError, not the ValueError these tests expect.
NO_BUS = oona.BusSettings.from_dsn("redis://127.0.0.1:1/0")


@pytest.mark.parametrize("job_id", ["a/b", "job 1", "jöb", "{job}", "", "-job", ".job",
                                    "job@host", "j" * 129])
def test_attach_refuses_a_job_id_tamiyo_would_refuse(job_id):
    model = kasmina.wrap(nn.Sequential(nn.Linear(4, 8)), seeds_per_layer=2)
    with pytest.raises(ValueError, match=r"^job_id .* is not an id: 1-128 characters"):
        kasmina.attach(model, job_id, NO_BUS)


def test_attach_refuses_a_layer_id_tamiyo_would_refuse():
    model = kasmina.wrap(nn.ModuleDict({"my fc": nn.Linear(4, 8)}), seeds_per_layer=2)
    with pytest.raises(ValueError, match=r"layer_id 'my fc' is not an id.*rename the module"):
        kasmina.attach(model, "job-1", NO_BUS)


def _llama() -> nn.Module:
    import transformers

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))


def _gpt2() -> nn.Module:
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0))




@hf_warnings
# Importing torch.compile's machinery on this torch (as in test_kernels.py).
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method. is deprecated:DeprecationWarning")
def test_every_id_real_models_put_on_the_bus_passes_tamiyo(oona_redis_url, drain_stream):
    torch.manual_seed(0)
    compiled = torch.compile(kasmina.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
                                                        nn.Linear(8, 3)), seeds_per_layer=2))
    name_layers(compiled)  # as a controller given the compiled model names its layers
    models = {
        "llama": kasmina.wrap(_llama(), seeds_per_layer=4),
        "gpt2": kasmina.wrap(_gpt2(), seeds_per_layer=4),
        "compiled": compiled,
        # A model that is itself one seed layer: from `wrap`, and built by hand (id "").
        "wrapped-linear": kasmina.wrap(nn.Linear(8, 8), seeds_per_layer=2),
        "bare-layer": kasmina.KasminaLayer(nn.Linear(8, 8), 2),
    }
    run = uuid.uuid4().hex[:8]
    jobs = {name: f"ids:{name}_{run}" for name in models}  # ':' and '_' as any caller may use
    settings = oona.BusSettings.from_dsn(oona_redis_url)
    for name, model in models.items():
        runtime = kasmina.attach(model, jobs[name], settings, mode="max")
        try:
            runtime.end_epoch(0.5)
        finally:
            runtime.close()
    reports, events = ([m for m in asyncio.run(drain_stream(oona_redis_url, stream, cls))
                        if m.job_id in jobs.values()]
                       for stream, cls in ((streams.TELEMETRY_SEED_HEALTH, LayerHealthReport),
                                           (streams.EPOCH_EVENTS, EpochEvent)))
    for report in reports:
        check_report(report)
    for event in events:
        check_epoch_event(event)
    layers = {name: [r.layer_id for r in reports if r.job_id == job]
              for name, job in jobs.items()}
    assert layers["wrapped-linear"] == layers["bare-layer"] == [ROOT_LAYER_ID] == ["root"]
    assert layers["compiled"] == ["_orig_mod.0", "_orig_mod.2"]
    assert "model.layers.1.self_attn.q_proj" in layers["llama"] and len(layers["llama"]) == 15
    assert "transformer.h.1.attn.c_attn" in layers["gpt2"] and len(layers["gpt2"]) == 8
    assert len(events) == 3 * len(models), "started, one epoch ended, finished: each job"
