"""`attnbench sample`: text from a trained run; the cached and uncached paths agree; bad folders are clear errors."""
import attnbench
from attnbench.cli import main
from attnbench.sample import sample
from conftest import tiny_run_config


def test_sample_from_a_run(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    attnbench.train(tiny_run_config(tiny_data, out, **{"train.max_iters": 10}))
    a = sample(str(out), start="ROMEO:", num_samples=2, max_new_tokens=40, temperature=0, device="cpu")
    b = sample(str(out), start="ROMEO:", num_samples=2, max_new_tokens=40, temperature=0, device="cpu",
               use_cache=False)
    assert a == b and all(t.startswith("ROMEO:") and len(t) == len("ROMEO:") + 40 for t in a)
    assert main(["sample", f"--out_dir={out}", "--start=KING:", "--num_samples=2", "--max_new_tokens=15",
                 "--device=cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("KING:") == 2 and printed.count("---------------") == 2


def test_sample_errors(tiny_data, tmp_path, capsys):
    assert main(["sample", f"--out_dir={tmp_path}", "--device=cpu"]) == 2
    assert "not a run folder" in capsys.readouterr().err
    out = tmp_path / "run"
    attnbench.train(tiny_run_config(tiny_data, out, **{"train.max_iters": 2, "train.eval_interval": 2}))
    assert main(["sample", f"--out_dir={out}", "--start=ROMEO§", "--device=cpu"]) == 2
    assert "§" in capsys.readouterr().err  # the unknown character is named
