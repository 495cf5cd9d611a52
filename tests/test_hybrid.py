"""Hybrid models: `model.mixer = "deltanet*2+softmax"`, a layer pattern repeated over n_layer, each layer
with its own mixer, arguments and decode state (attnbench.mixers.layer_groups).

The model-level contract of tests/helpers.py, parameter matching, FLOPs and state sizes, checkpoints and
resume, sweeps, benchmarks and the errors; and the all-mixer preset (sweeps/bakeoff-all.toml) planned
mixer by mixer, each one skipped with its reason until it is registered.
"""
import tomllib
from dataclasses import replace

import pytest
import torch
from helpers import (check_batch_independent, check_causal, check_greedy_generate_same_with_and_without_cache,
                     check_logits_and_loss, check_prefill_then_decode_equals_forward, counted_forward_flops,
                     state_elements)

import attnbench
from attnbench import flops, mixers
from attnbench import sweep as sw
from attnbench.bench.shapes import resolve_shapes
from attnbench.cli import main as bench_main
from attnbench.config import CONFIGS_DIR, ModelConfig, parse_config
from attnbench.errors import ConfigError
from attnbench.files import read_jsonl
from attnbench.model import GPT
from attnbench.params import count_params, format_table, match_shape
from attnbench.report import build_report, mixer_color
from attnbench.report.colors import mixer_key
from attnbench.resolve import load_config
from attnbench.sample import load_run
from attnbench.sweep import bench_phase
from conftest import tiny_run_config
from test_model import MIXER_ARGS  # the small CPU settings of each mixer

pytestmark = pytest.mark.usefixtures("one_thread")

T = 24
HYBRID = "deltanet*2+softmax"
ARGS = {"deltanet": {"chunk_size": 16}, "softmax": {}}  # several chunks at T = 24


def tiny_hybrid(spec: str = HYBRID, n_layer: int = 3, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(mixer=spec, n_layer=n_layer, n_head=2, n_embd=32, vocab_size=50, block_size=T,
                      mixer_args=kw.pop("mixer_args", ARGS), **kw)
    return GPT(cfg).eval()


# ---------------------------------------------------------------- the pattern


def test_pattern_layers_and_file_safe_names():
    assert mixers.parse_pattern("gated_deltanet*3+softmax") == [("gated_deltanet", 3), ("softmax", 1)]
    assert mixers.parse_pattern("softmax") == [("softmax", 1)]
    assert mixers.layer_names("deltanet*2+softmax", 6) == ["deltanet", "deltanet", "softmax"] * 2
    assert mixers.layer_names("deltanet+softmax", 4) == ["deltanet", "softmax"] * 2
    assert mixers.components("deltanet+softmax+deltanet") == ["deltanet", "softmax"]
    assert mixers.file_safe("gated_deltanet*3+softmax") == "gated_deltanet_x3-softmax"
    assert mixers.file_safe("softmax") == "softmax"
    m = tiny_hybrid()
    assert [type(b.mixer).name for b in m.blocks] == ["deltanet", "deltanet", "softmax"]
    assert m.blocks[0].mixer.args.chunk_size == 16  # each layer reads its own mixer's sub-table
    assert m.blocks[0].mixer.cfg.mixer == "deltanet"


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown mixer 'deltanat'.*did you mean 'deltanet'"):
        tiny_hybrid("deltanat*2+softmax")
    with pytest.raises(ConfigError, match=r"n_layer = 4 does not fit .* multiple of 3, e.g. 3, 6, 9"):
        tiny_hybrid(n_layer=4)
    with pytest.raises(ConfigError, match=r"'nsa' is not a mixer of the layer pattern"):
        tiny_hybrid(mixer_args={**ARGS, "nsa": {"block_size": 4}})
    with pytest.raises(ConfigError, match=r"did you mean 'softmax'"):
        tiny_hybrid(mixer_args={**ARGS, "softmx": {}})
    with pytest.raises(ConfigError, match=r"own sub-table: model.mixer_args.deltanet.chunk_size"):
        tiny_hybrid(mixer_args={"chunk_size": 16})
    with pytest.raises(ConfigError, match=r"chunk_sise.*deltanet"):
        tiny_hybrid(mixer_args={"deltanet": {"chunk_sise": 16}})
    with pytest.raises(ConfigError, match="NAME\\*COUNT"):
        mixers.parse_pattern("deltanet*0+softmax")
    with pytest.raises(ConfigError, match=r"n_layer = 6 does not fit"):
        match_shape("gated_deltanet*3+softmax", "10.7M", n_layer=6)


def test_config_files_and_overrides_nest_per_mixer_args():
    cfg = parse_config({"model": {"mixer": HYBRID, "n_layer": 3, "n_embd": 32, "n_head": 2,
                                  "mixer_args": {"deltanet": {"chunk_size": 32}}}},
                       ["--model.mixer_args.deltanet.use_gate=true", "--model.mixer_args.softmax.attn_dropout=0"])
    # raw values, coerced by each mixer's Args when the model is built
    assert cfg.model.mixer_args == {"deltanet": {"chunk_size": 32, "use_gate": "true"}, "softmax": {"attn_dropout": "0"}}
    cfg = parse_config({"model": {"mixer": "nsa", "mixer_args": {"block_size": 16}}}, ["--model.mixer_args.window_size=8"])
    assert cfg.model.mixer_args == {"block_size": 16, "window_size": "8"}  # a plain mixer as before


# ---------------------------------------------------------------- the model-level contract


def _registered(spec: str) -> None:
    missing = [n for n in dict.fromkeys(part.split("*")[0] for part in spec.split("+")) if n not in mixers.available()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not registered in this checkout (not merged into it yet)")


@pytest.mark.parametrize("spec, n_layer", [(HYBRID, 3), ("mamba2+swa", 2), ("gated_deltanet*3+softmax", 4)])
def test_model_level_contract(spec, n_layer):
    """The checks tests/test_model.py runs on every mixer, on hybrids (each mixer with its tiny CPU args)."""
    _registered(spec)
    m = tiny_hybrid(spec, n_layer, mixer_args={n: MIXER_ARGS.get(n, {}) for n in mixers.components(spec)})
    check_logits_and_loss(m, T)
    check_causal(m, T)
    check_batch_independent(m, T)
    check_prefill_then_decode_equals_forward(m, T)
    check_greedy_generate_same_with_and_without_cache(m, 40)


def test_decode_keeps_one_state_per_layer_of_its_own_kind():
    m = tiny_hybrid()
    cache = m.new_cache(1, T)
    kinds = [type(s).__name__ for s in cache.states]
    assert kinds[0] == kinds[1] != kinds[2]
    assert kinds[2] == type(tiny_hybrid("softmax", n_layer=1, mixer_args={}).new_cache(1, T).states[0]).__name__


# ---------------------------------------------------------------- matching, FLOPs, state


@pytest.mark.parametrize("spec, n_layer", [("gated_deltanet*3+softmax", 8), ("gated_deltanet*3+softmax", 4),
                                           (HYBRID, 3)])
def test_parameter_matching_within_1pct(spec, n_layer):
    m = match_shape(spec, "10.7M", n_layer=n_layer)
    assert abs(m.deviation) <= 0.01 and m.within
    assert m.n_params == count_params(m.model_cfg) == GPT(m.model_cfg).num_params()
    assert set(m.per_mixer) == set(mixers.components(spec))
    for name, p in m.per_mixer.items():  # each mixer's own head dim rules (GatedDeltaNet: multiples of 16)
        if name == "gated_deltanet" and "head_dim" in m.model_cfg.mixer_args[name]:
            assert m.model_cfg.mixer_args[name]["head_dim"] % 16 == 0
    assert spec in format_table([m])


def test_fixed_args_of_a_hybrid_are_kept():
    m = match_shape("gated_deltanet*3+softmax", "10.7M", n_layer=8,
                    mixer_args={"gated_deltanet": {"head_dim": 48, "chunk_size": 32}})
    assert m.model_cfg.mixer_args["gated_deltanet"] == {"head_dim": 48, "chunk_size": 32}
    assert m.within


@pytest.fixture(scope="module", params=[("gated_deltanet*3+softmax", 4), ("mamba2+swa", 2)], ids=lambda p: p[0])
def matched(request):
    spec, n_layer = request.param
    _registered(spec)
    return match_shape(spec, "10.7M", n_layer=n_layer).model_cfg


@pytest.mark.parametrize("Tc", [64, 256])
def test_flops_match_the_flop_counter(matched, Tc):
    cfg = replace(matched, block_size=Tc, backend="torch", dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    measured = counted_forward_flops(model, torch.randint(0, cfg.vocab_size, (1, Tc)))
    predicted = flops.model_flops_per_token(cfg, Tc, torch_path=True)["total"] * Tc
    assert abs(predicted / measured - 1) < 0.05, (predicted, measured)
    # the mixer part is the sum of each layer's own mixer
    layers = mixers.layer_names(cfg.mixer, cfg.n_layer)
    one = {n: flops.model_flops_per_token(replace(mixers.layer_config(cfg, n), n_layer=1), Tc)["mixer"] for n in layers}
    assert flops.model_flops_per_token(cfg, Tc)["mixer"] == sum(one[n] for n in layers)


def test_decode_state_elements_equal_a_filled_cache(matched):
    cfg = replace(matched, block_size=64, backend="torch")
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    for n in (1, 40):
        cache = model.new_cache(1, n)
        with torch.no_grad():
            model(torch.randint(0, cfg.vocab_size, (1, n)), cache=cache)
        assert state_elements(cache.states) == flops.decode_state_elements(cfg, n)
    assert flops.decode_state_elements(cfg, 40) > flops.decode_state_elements(cfg, 1)  # the softmax layer's cache


# ---------------------------------------------------------------- training, checkpoints, sweeps, benchmarks


def _hybrid_run(tiny_data, out, **over):
    return tiny_run_config(tiny_data, out, **{"model.mixer": HYBRID, "model.n_layer": 3,
                                              "model.mixer_args": ARGS, "optim.lr_decay_iters": 20, **over})


def test_checkpoint_save_and_resume(tiny_data, tmp_path):
    """10 steps, then --resume to 20: the same losses as 20 steps straight; the run loads for sampling."""
    straight = attnbench.train(_hybrid_run(tiny_data, tmp_path / "a", **{"train.max_iters": 20}))
    out = tmp_path / "b"
    attnbench.train(_hybrid_run(tiny_data, out, **{"train.max_iters": 10}))
    resumed = attnbench.train(_hybrid_run(tiny_data, out, **{"train.max_iters": 20}), {"resume": True})
    assert resumed["steps"] == 20 and resumed["final_val_loss"] == straight["final_val_loss"]
    a = [r["loss"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    b = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert a == b
    model, cfg = load_run(out)[:2]
    assert cfg.model.mixer == HYBRID and [type(b.mixer).name for b in model.blocks][-1] == "softmax"
    # the report: a row per hybrid, after the plain mixers, its name escaped for markdown
    attnbench.train(tiny_run_config(tiny_data, tmp_path / "c", **{"train.max_iters": 10}))
    text = build_report(tmp_path, tmp_path / "report").read_text()
    assert "| deltanet\\*2+softmax |" in text
    assert sorted(["deltanet*2+softmax", "softmax", "zzz"], key=mixer_key) == ["softmax", "zzz", "deltanet*2+softmax"]
    assert mixer_color(HYBRID) == mixer_color(HYBRID)  # a stable colour by name


def test_sweep_plans_a_hybrid_with_file_safe_ids_and_component_args(tiny_data, tmp_path):
    import tomli_w

    (tmp_path / "base.toml").write_text(tomli_w.dumps(tiny_run_config(tiny_data, tmp_path / "unused")))
    (tmp_path / "deltanet.toml").write_text('[model]\nmixer = "deltanet"\n[model.mixer_args]\nchunk_size = 16\n')
    (tmp_path / "sweep.toml").write_text(f"""
base_config = "base.toml"
param_budget = "500k"
mixers = ["softmax", "{HYBRID}"]
[mixer_overrides."{HYBRID}"]
"model.n_layer" = 3
"model.mixer_args.softmax.attn_dropout" = 0.0
[bench]
enabled = false
""")
    runs = sw.plan(sw.load_sweep(tmp_path / "sweep.toml"), tmp_path / "out")
    hyb = next(r for r in runs if r.mixer == HYBRID)
    assert hyb.run_id.startswith("deltanet_x2-softmax-lr") and "*" not in hyb.run_id and "+" not in hyb.run_id
    model = hyb.config["model"]
    assert model["n_layer"] == 3 and model["mixer_args"]["deltanet"]["chunk_size"] == 16  # from deltanet.toml
    assert model["mixer_args"]["softmax"] == {"attn_dropout": 0.0}  # from the override
    assert abs(hyb.match["deviation"]) <= 0.01
    # the bench phase builds exactly the trained shape: its --set arguments reach every sub-table
    sets = bench_phase._shape_sets(model)
    assert f"{HYBRID}.deltanet.chunk_size=16" in sets and f"{HYBRID}.softmax.attn_dropout=0.0" in sets
    shape = resolve_shapes([HYBRID], match=False, sets=[s for s in sets if s != "--set"])[0]
    for name in ("deltanet", "softmax"):  # the same arguments (the bundled config's defaults spelled out or not)
        args = mixers.get(name).Args.from_dict
        assert args(shape.cfg.mixer_args[name], name) == args(model["mixer_args"][name], name)
    assert shape.cfg.n_embd == model["n_embd"]
    assert GPT(shape.cfg).num_params() == hyb.match["n_params"]


def test_bench_shape_of_a_hybrid_from_the_mixers_config_files():
    """`attnbench bench --mixers PATTERN`: the softmax config's model with each mixer's own args, matched."""
    s = resolve_shapes(["gated_deltanet*3+softmax"], budget="10.7M")[0]
    assert s.cfg.mixer_args["gated_deltanet"]["expand_v"] == 1.0  # configs/gated_deltanet.toml
    assert s.cfg.n_layer == 8  # the softmax config's 6 layers rounded up to the 4-layer pattern
    assert abs(s.n_params_matched / 10.7e6 - 1) <= 0.01
    assert resolve_shapes(["deltanet*2+softmax"], match=False)[0].cfg.n_layer == 6


def test_benchmarks_build_a_hybrid_by_name(tmp_path):
    """latency (with its graph-safety check), memory and throughput on a tiny hybrid: rows named by the pattern."""
    out = tmp_path / "all.jsonl"
    rc = bench_main(["bench", "all", "--mixers", HYBRID, "--device", "cpu", "--no_match", "--set", "n_layer=3",
                     "--set", "n_embd=32", "--set", "n_head=2", "--set", f"{HYBRID}.deltanet.chunk_size=16",
                     "--prompt_lens", "8", "--decode_steps", "3", "--decode_warmup", "1", "--prefill_repeats", "1",
                     "--start", "16", "--max_len", "32", "--no_isolate", "--contexts", "16", "--tokens_per_batch", "32",
                     "--steps", "1", "--warmup_steps", "1", "--json", str(out)])
    assert rc == 0
    rows = read_jsonl(out)
    assert {r["bench"] for r in rows} == {"latency", "memory", "throughput"}
    assert {r["mixer"] for r in rows} == {HYBRID}
    assert all(r["shape"]["mixer_args"]["deltanet"]["chunk_size"] == 16 for r in rows if "shape" in r)


# ---------------------------------------------------------------- the all-mixer preset

PRESET = CONFIGS_DIR / "sweeps" / "bakeoff-all.toml"
PRESET_MIXERS = sw.expand_mixers(tomllib.loads(PRESET.read_text())["mixers"])


def test_preset_lists_every_mixer_and_two_hybrids():
    plain = [m for m in PRESET_MIXERS if not mixers.is_hybrid(m)]
    assert set(plain) >= {"softmax", "deltanet", "gated_deltanet", "gated_deltaproduct", "nsa", "mamba2", "gla",
                          "kda", "swa"}
    assert set(mixers.available()) <= set(plain), "a registered mixer is missing from bakeoff-all"
    assert [m for m in PRESET_MIXERS if mixers.is_hybrid(m)] == ["gated_deltanet*3+softmax", "mamba2+swa"]
    bakeoff = tomllib.loads((CONFIGS_DIR / "sweeps" / "bakeoff.toml").read_text())
    preset = tomllib.loads(PRESET.read_text())
    for key in ("param_budget", "base_config", "dataset", "learning_rates", "seeds", "overrides", "bench"):
        assert preset[key] == bakeoff[key], key


@pytest.mark.parametrize("mixer", PRESET_MIXERS)
def test_preset_plans_each_mixer_within_1pct(mixer, tmp_path):
    """Each run of the preset gets a shape within 1% of the budget (a mixer not yet registered is skipped)."""
    import tomli_w

    _registered(mixer)
    tree = tomllib.loads(PRESET.read_text())  # the preset with this one mixer (load_sweep checks every name)
    tree["mixers"] = [mixer]
    tree["mixer_overrides"] = {k: v for k, v in tree.get("mixer_overrides", {}).items() if k == mixer}
    (tmp_path / "one.toml").write_text(tomli_w.dumps(tree))
    s = sw.load_sweep(tmp_path / "one.toml")
    runs = sw.plan(s, tmp_path, load_data=False)
    assert len(runs) == 1 and abs(runs[0].match["deviation"]) <= 0.01, runs[0].match
    if mixer == "gated_deltanet*3+softmax":
        assert runs[0].config["model"]["n_layer"] == 8
    else:
        assert runs[0].config["model"]["n_layer"] == 6
    load_config(runs[0].config)  # a valid, resolved config


@pytest.mark.parametrize("preset, depth", [("recall", 2), ("lengthgen", 6)])
def test_recall_and_lengthgen_presets_take_every_mixer_and_hybrid(preset, depth, tmp_path):
    """`attnbench run --preset recall|lengthgen --mixers all`: every registered mixer and both hybrids plan
    without an edit to the preset; a hybrid whose pattern does not fit the preset's depth trains at the next
    multiple of its length."""
    s = sw.load_sweep(f"sweeps/{preset}")
    sw.set_mixers(s, ["all", *s.variants])  # lengthgen's softmax_nope variant stays
    runs = sw.plan(s, tmp_path, load_data=False)
    assert {r.mixer for r in runs} == set(mixers.everything())
    n_layer = {r.mixer: r.config["model"]["n_layer"] for r in runs}
    assert n_layer["gated_deltanet*3+softmax"] == -(-depth // 4) * 4
    assert all(n == depth for m, n in n_layer.items() if m != "gated_deltanet*3+softmax")


def test_mixers_option_replaces_the_list_and_names_a_bad_mixer(tmp_path, capsys):
    s = sw.load_sweep("sweeps/lengthgen")
    sw.set_mixers(s, ["deltanet,softmax_nope"])
    assert s.mixers == ["deltanet", "softmax_nope"] and set(s.mixer_overrides) <= {"deltanet", "softmax_nope"}
    with pytest.raises(ConfigError, match="gated_deltanet"):
        sw.set_mixers(s, ["gated_deltanett"])
