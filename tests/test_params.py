"""Parameter matching (attnbench/params/, attnbench/params_cli.py): exact counts, the search, the CLI and n_embd = "match"."""
import json
from dataclasses import replace

import pytest
import torch

from attnbench import mixers
from attnbench.cli import main
from attnbench.config import ModelConfig, RunConfig
from attnbench.resolve import load_config
from attnbench.errors import ConfigError
from attnbench.model import GPT
from attnbench.params import count_params, match_all, match_shape, parse_budget, softmax_width

MIXERS = mixers.available()
BUDGET = 10_700_000


@pytest.fixture(scope="module")
def matches():
    return match_all("10.7M")


def built_count(cfg: ModelConfig) -> int:
    torch.manual_seed(0)
    return sum(p.numel() for p in GPT(cfg).parameters())


@pytest.mark.parametrize("text, n", [("10.7M", 10_700_000), ("10700000", 10_700_000), ("1.5e7", 15_000_000),
                                     ("850k", 850_000), ("2.5m", 2_500_000), ("1_000_000", 1_000_000),
                                     (3e6, 3_000_000), (12345, 12345)])
def test_parse_budget(text, n):
    assert parse_budget(text) == n


@pytest.mark.parametrize("bad", ["", "ten", "10.7Q", "-5M", "0", True])
def test_parse_budget_rejects(bad):
    with pytest.raises(ConfigError, match="budget"):
        parse_budget(bad)


@pytest.mark.parametrize("mixer", MIXERS)
def test_count_params_equals_built_model_small(mixer):
    # odd corners: biases, no position table, an untied-looking small vocab; a valid shape from the search
    m = match_shape(mixer, "300k", n_layer=2, base=ModelConfig(bias=True, pos_emb="none", vocab_size=50, block_size=32))
    cfg = m.model_cfg
    assert cfg.n_layer == 2 and cfg.bias and cfg.pos_emb == "none"
    assert count_params(cfg) == built_count(cfg) == m.n_params


def test_matched_counts_equal_built_models_and_stay_within_1pct(matches):
    ms = matches
    assert [m.mixer for m in ms] == sorted(MIXERS, key=lambda n: (n != "softmax", n))
    for m in ms:
        cfg = m.model_cfg
        assert cfg.n_layer == 6 and cfg.mixer == m.mixer
        assert m.n_params == built_count(cfg), m.mixer  # the whole GPT, built for real on the CPU
        assert m.deviation == pytest.approx(m.n_params / BUDGET - 1)
        assert abs(m.deviation) <= 0.01, (m.mixer, m.deviation)
        assert m.kernel_ok, m.mixer
        assert cfg.n_embd % cfg.n_head == 0


def test_softmax_gets_the_nanogpt_shape(matches):
    soft = next(m for m in matches if m.mixer == "softmax")
    assert (soft.model_cfg.n_embd, soft.model_cfg.n_head, soft.head_dim) == (384, 6, 64)
    assert soft.n_params == 10_745_088
    assert 380 < softmax_width(BUDGET) < 386


def test_head_dims_stay_near_the_baseline(matches):
    for m in matches:
        assert 48 <= m.head_dim <= 80, (m.mixer, m.head_dim)
        assert 0.85 < m.model_cfg.n_embd / 384 < 1.15, (m.mixer, m.model_cfg.n_embd)


@pytest.mark.skipif("nsa" not in MIXERS, reason="nsa mixer not registered")
def test_nsa_gets_an_fla_shape(matches):
    m = next(m for m in matches if m.mixer == "nsa")
    cfg = m.model_cfg
    G = cfg.n_head // m.kv_heads
    assert G >= 16 and G & (G - 1) == 0  # FLA: query heads per KV head a power of two >= 16
    assert cfg.n_head in (16, 32) and m.kv_heads in (1, 2)
    assert m.head_dim % 16 == 0 and m.head_dim <= 256


@pytest.mark.parametrize("mixer", [m for m in ("gated_deltanet", "nsa") if m in MIXERS])
def test_fixed_mixer_args_are_kept(mixer):
    m = match_shape(mixer, BUDGET, mixer_args={"head_dim": "32"})  # a CLI string, coerced
    assert m.model_cfg.mixer_args["head_dim"] == 32 and m.head_dim == 32
    assert abs(m.deviation) <= 0.01 and m.n_params == count_params(m.model_cfg)


@pytest.mark.parametrize("budget, n_layer", [("3M", 4)])
def test_other_budgets_within_1pct(budget, n_layer):
    for m in match_all(budget, n_layer=n_layer):
        assert m.model_cfg.n_layer == n_layer
        assert abs(m.deviation) <= 0.01, (budget, m.mixer, m.deviation)
        assert m.n_params == count_params(m.model_cfg)


def test_closest_shape_when_the_band_is_out_of_reach():
    # softmax's count depends only on the width: at 200k and 2 layers even widths step by ~5%
    base = ModelConfig(block_size=64)
    m = match_shape("softmax", "200k", n_layer=2, base=base)
    best = min(abs(count_params(replace(base, n_layer=2, n_embd=d, n_head=1)) / 200_000 - 1) for d in range(60, 110, 2))
    assert abs(m.deviation) == pytest.approx(best) and not m.within


def test_match_errors_name_the_problem():
    with pytest.raises(ConfigError, match="sofmax"):
        match_shape("sofmax", BUDGET)
    if "deltanet" in MIXERS:
        with pytest.raises(ConfigError, match="pos_emb"):
            match_shape("deltanet", BUDGET, base=ModelConfig(pos_emb="rope"))


# ---------------------------------------------------------------- config: n_embd = "match"


def test_config_match_resolves_and_saves_concrete_shape(tmp_path, matches):
    mixer = "gated_deltanet" if "gated_deltanet" in MIXERS else "softmax"
    p = tmp_path / "m.toml"
    p.write_text(f'[model]\nmixer = "{mixer}"\nn_layer = 6\nn_embd = "match"\nparam_budget = "10.7M"\n')
    cfg = load_config(p)
    want = next(m for m in matches if m.mixer == mixer)
    assert (cfg.model.n_embd, cfg.model.n_head, cfg.model.mixer_args) == \
        (want.model_cfg.n_embd, want.model_cfg.n_head, want.model_cfg.mixer_args)
    assert isinstance(cfg.model.n_embd, int) and cfg.model.param_budget == "10.7M"
    cfg.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["n_embd"] == cfg.model.n_embd and saved["model"]["param_budget"] == "10.7M"
    again = RunConfig.from_dict(saved)  # concrete: no new search, same model
    assert again.model == cfg.model
    assert count_params(cfg.model) == want.n_params


def test_config_match_overrides_and_errors():
    cfg = load_config("configs/shakespeare_char.toml", ["--n_embd=match", "--param_budget=1.5e7"])
    assert cfg.model.n_embd == match_shape("softmax", 15_000_000).model_cfg.n_embd
    with pytest.raises(ConfigError) as e:
        load_config("configs/shakespeare_char.toml", ["--n_embd=match"])
    assert "model.n_embd" in str(e.value) and "model.param_budget" in str(e.value)
    with pytest.raises(ConfigError, match="model.param_budget"):
        load_config("configs/shakespeare_char.toml", ["--n_embd=match", "--param_budget=lots"])
    with pytest.raises(ConfigError, match="'match'"):
        load_config("configs/shakespeare_char.toml", ["--n_embd=mtach", "--param_budget=1M"])
    # a budget next to a concrete width is only recorded
    cfg = load_config("configs/shakespeare_char.toml", ["--param_budget=10.7M"])
    assert cfg.model.n_embd == 384 and cfg.model.param_budget == "10.7M"


# ---------------------------------------------------------------- CLI


def test_cli_table_and_json(capsys, tmp_path):
    assert main(["params", "--budget", "10.7M", "--mixers", "softmax"]) == 0
    out = capsys.readouterr().out
    assert "softmax" in out and "10,745,088" in out and "+0.42%" in out and "head dim" in out
    assert main(["params", "--budget", "10.7M", "--mixers", "softmax", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["mixer"] == "softmax" and rows[0]["params"] == 10_745_088 and rows[0]["n_embd"] == 384
    f = tmp_path / "m.json"
    two = ",".join(MIXERS[:2])
    assert main(["params", "--budget", "850k", "--n_layer", "4", "--mixers", two, "--json", str(f)]) == 0
    rows = json.loads(f.read_text())
    assert [r["mixer"] for r in rows] == MIXERS[:2]
    assert all(abs(r["deviation"]) <= 0.01 and r["n_layer"] == 4 and r["budget"] == 850_000 for r in rows)


@pytest.mark.skipif(len(MIXERS) < 2, reason="needs a second mixer")
def test_cli_flops(capsys):
    pair = ",".join(["softmax", next(m for m in MIXERS if m != "softmax")])
    assert main(["params", "--budget", "10.7M", "--mixers", pair, "--flops", "--T", "256,8192"]) == 0
    out = capsys.readouterr().out
    assert "T=8192" in out and "cheaper than softmax from T" in out
    assert main(["params", "--budget", "10.7M", "--mixers", pair, "--flops", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["mixer"] for r in out["matches"]] == pair.split(",")
    assert [(r["mixer"], r["T"]) for r in out["flops"]] == [(m, T) for m in pair.split(",") for T in (256, 8192)]
    assert out["flops"][-1]["crossover_T"] is not None


def test_cli_flags_out_of_band_and_bad_budget(capsys):
    assert main(["params", "--budget", "200k", "--n_layer", "2", "--block_size", "64", "--mixers", "softmax"]) == 1
    assert "outside 1%" in capsys.readouterr().out
    assert main(["params", "--budget", "lots"]) == 2
    assert "budget" in capsys.readouterr().err


def test_search_falls_back_to_direct_counts_for_non_quadratic_mixers():
    """A mixer whose size is not quadratic in the width is searched by direct builds, still exactly."""
    import torch.nn as nn

    from attnbench.mixers.base import Mixer, MixerArgs

    class Odd(Mixer):
        Args = MixerArgs

        def __init__(self, cfg, layer_idx):
            super().__init__(cfg, layer_idx)
            self.w = nn.Parameter(torch.empty(int(cfg.n_embd ** 2.5) // 64))  # d^2.5: no quadratic fits

    mixers._REGISTRY["_odd_test"] = Odd  # registered for this test only (test_model collects at import)
    Odd.name = "_odd_test"
    try:
        base = ModelConfig(block_size=64)
        m = match_shape("_odd_test", "2M", n_layer=2, base=base)
        assert m.n_params == count_params(m.model_cfg) and abs(m.deviation) <= 0.01
        counts = {d: count_params(replace(base, mixer="_odd_test", n_layer=2, n_embd=d, n_head=1))
                  for d in range(200, 500, 2)}
        in_band = [d for d, c in counts.items() if abs(c / 2e6 - 1) <= 0.01]
        assert m.model_cfg.n_embd in in_band
        # brute force over (width, heads) in the band: no head dim nearer 64 was missed
        best = min(abs(d // h - 64) for d in in_band for h in range(1, 33) if d % h == 0)
        assert abs(m.head_dim - 64) == best
    finally:
        del mixers._REGISTRY["_odd_test"]
